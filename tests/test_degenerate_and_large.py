"""Degenerate points warn and give finite minimum-norm (or one-sided) derivatives; large
sparse problems differentiate through a sparse factorization."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import torchdiffopt as tdo
from helpers import forward_derivative as forward




def test_degenerate_vertex_gives_the_unique_primal_derivative():
    # three constraints active at a 2-D vertex: x ≥ a, y ≥ b, x + y ≥ a + b
    m = tdo.Model()
    x, y = m.variable(name="x"), m.variable(name="y")
    a, b = m.parameter(1.0, name="a"), m.parameter(2.0, name="b")
    m.constraint(x >= a)
    m.constraint(y >= b)
    m.constraint(x + y >= a + b)
    m.minimize(x + 2 * y)
    with pytest.warns(tdo.DegenerateSolutionWarning, match="singular"):
        m.optimize()
    # the multipliers are not unique, the primal move is: x = a, y = b
    assert forward(m, a, x) == pytest.approx(1.0)
    assert m.get_forward_variable(y) == pytest.approx(0.0, abs=1e-12)
    assert np.isfinite(m.get_forward_objective())
    assert m.get_forward_objective() == pytest.approx(1.0)  # f* = a + 2b
    # reverse mode uses the same (symmetric) pseudo-inverse: adjoint identity holds
    m.empty_input_sensitivities()
    m.set_reverse_variable(x, 0.3)
    m.set_reverse_variable(y, -1.1)
    m.reverse_differentiate()
    jv = 0.3 * forward(m, b, x) - 1.1 * m.get_forward_variable(y)
    assert m.get_reverse_parameter(b) == pytest.approx(jv)


def test_redundant_equalities():
    m = tdo.Model()
    x = m.variable(2, name="x")
    b = m.parameter(1.0, name="b")
    m.constraint(x.sum() == b)
    m.constraint(2 * x.sum() == 2 * b)
    m.minimize(tdo.sum_squares(x))
    with pytest.warns(tdo.DegenerateSolutionWarning, match="singular"):
        m.optimize()
    np.testing.assert_allclose(m.value(x), [0.5, 0.5])
    np.testing.assert_allclose(forward(m, b, x), [0.5, 0.5])


def test_weakly_active_constraint_gives_one_sided_derivative():
    # min (x - 1)²  s.t.  x ≤ p  at p = 1: binding with a zero multiplier
    m = tdo.Model()
    x = m.variable(name="x")
    p = m.parameter(1.0, name="p")
    m.constraint(x <= p)
    m.minimize((x - 1) ** 2)
    with pytest.warns(tdo.DegenerateSolutionWarning, match="weakly active"):
        m.optimize()
    # kept binding: the left derivative, x(p - h) = p - h
    assert forward(m, p, x) == pytest.approx(1.0)


def test_flat_lp_direction_is_reported():
    m = tdo.Model()
    x, y = m.variable(lb=0, ub=1, name="x"), m.variable(lb=0, ub=1, name="y")
    c = m.parameter(1.0, name="c")
    m.minimize(c * x)
    # y is free in [0, 1]: the solver's vertex puts it on a bound with a zero multiplier
    with pytest.warns(tdo.DegenerateSolutionWarning, match="weakly active.*variable bound"):
        m.optimize()
    d = forward(m, c, y)
    assert np.isfinite(d)


def test_sparse_qp_with_ten_thousand_variables():
    """min ½ Σ d_i x_i² - cᵀx  s.t.  x_i - x_{i+1} ≤ h_i,  0 ≤ x ≤ 10 (chain, sparse KKT)."""
    n = 10_000
    rng = np.random.default_rng(0)
    d = rng.uniform(1, 2, n)
    D = sp.eye(n - 1, n, format="csr") - sp.eye(n - 1, n, k=1, format="csr")
    m = tdo.Model()  # "auto" sends a QP this large to SCS, then the KKT polish
    x = m.variable(n, lb=0.0, ub=10.0, name="x")
    c = m.parameter(rng.uniform(-1, 5, n), name="c")
    h = m.parameter(rng.uniform(0.0, 1.0, n - 1), name="h")
    con = m.constraint(D @ x <= h)
    m.minimize(0.5 * tdo.sum(d * x * x) - c @ x)
    m.optimize()
    kkt = m._sensitivity.solved().kkt
    assert kkt._system._dense is False  # sparse LU, no dense n×n matrix
    assert 0 < kkt.active.sum() < n - 1

    # KKT residual of the polished point
    xs = m.value(x)
    lam = -np.asarray(m.dual(con))  # multipliers of D x <= h
    grad = d * xs - c.value + D.T @ lam
    free = (xs > 1e-9) & (xs < 10 - 1e-9)
    assert np.abs(grad[free]).max() < 1e-9

    v, w = rng.normal(size=n), rng.normal(size=n)
    dx = forward(m, c, x, v)
    m.empty_input_sensitivities()
    m.set_reverse_variable(x, w)
    m.reverse_differentiate()
    assert w @ dx == pytest.approx(m.get_reverse_parameter(c) @ v, rel=1e-10)
    # a coordinate with no active constraint around it moves by v_i / d_i
    i = int(np.flatnonzero(free & ~np.r_[kkt.active, False] & ~np.r_[False, kkt.active])[0])
    assert dx[i] == pytest.approx(v[i] / d[i], rel=1e-9)


def test_degeneracy_warnings_point_at_the_callers_line():
    """Raised deep inside a layer's autograd Function, the warning names the user's file."""
    import warnings

    Q = torch.eye(2, dtype=torch.float64)
    p = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    # the two rows x1 <= 0.5 and x1 + 0 x2 <= 0.5 coincide: singular KKT system
    G = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    h = torch.tensor([0.5, 0.5], dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tdo.functional.qp(Q, p, G=G, h=h)
    degenerate = [w for w in caught if issubclass(w.category, tdo.DegenerateSolutionWarning)]
    assert degenerate and all(w.filename == __file__ for w in degenerate)


def test_pseudo_inverse_on_coupled_rows_equals_the_full_one():
    """Singular symmetric matrices whose other rows are unit rows (as the batched KKT
    systems decouple inactive constraints): the pseudo-inverse from the coupled block alone
    equals torch's full one."""
    from torchdiffopt.linalg.factorization import symmetric_pseudo_inverse

    gen = torch.Generator().manual_seed(0)
    N, Ks = 12, []
    for k in range(3, 9):  # a different number of coupled rows per member
        A = torch.randn(k, 2, dtype=torch.float64, generator=gen)
        K = torch.eye(N, dtype=torch.float64)
        idx = torch.randperm(N, generator=gen)[:k]
        K[idx.unsqueeze(-1), idx] = A @ A.T  # rank 2 < k: singular
        Ks.append(K)
    Ks = torch.stack(Ks)
    expected = torch.linalg.pinv(Ks, hermitian=True)
    got = symmetric_pseudo_inverse(Ks, 1e3 * torch.finfo(torch.float64).eps * N)
    assert (got - expected).abs().max() < 1e-12


def test_kkt_pseudo_inverse_shortcut_equals_the_full_one(monkeypatch):
    """The shortcuts for K = [[γI, Gᵀ], [G, D]] (γ = 0: an LP, γ > 0: a ridge-smoothed
    LP; G with dependent rows, as at a degenerate vertex; D = 1 on the zero rows of G) equal
    torch's pseudo-inverse of the whole matrix, in a batch that also holds a QP member with
    another P, which goes the general way: the Gram matrix's eigendecomposition where G has
    rank < n, the normal equations where G has full column rank (the LP vertex of W3), no
    SVD."""
    import torchdiffopt.backends.batched_quadratic as bq
    from torchdiffopt.backends.batched_quadratic import KKTBlocks, _kkt_pseudo_inverse

    gen = torch.Generator().manual_seed(1)
    n, k = 5, 9
    Ks = []
    svd_calls = []
    for gamma, full_rank in ((0.0, False), (0.0, True), (0.2, False), (0.2, True),
                             (3.0, False), (None, False)):
        G = torch.randn(k, n, dtype=torch.float64, generator=gen)
        G[-2:] = 0.0                      # two unused slots
        G[3] = G[0] + G[1]                # a dependent row
        if not full_rank:
            G[:, 0] = 0.0                 # rank < n: a null space for γI to act on
        D = torch.diag((G == 0).all(-1).to(torch.float64))
        if gamma is None:                 # a general PSD P of rank 1
            v = torch.randn(n, 1, dtype=torch.float64, generator=gen)
            P = v @ v.T
        else:
            P = gamma * torch.eye(n, dtype=torch.float64)
        Ks.append(torch.cat((torch.cat((P, G.T), 1), torch.cat((G, D), 1)), 0))
    Ks = torch.stack(Ks)
    expected = torch.linalg.pinv(Ks, hermitian=True)
    rtol = 1e3 * torch.finfo(torch.float64).eps * (n + k)
    svd = bq._svd_kkt_pseudo_inverse

    def counted(G, *args):
        svd_calls.append(len(G))
        return svd(G, *args)
    monkeypatch.setattr(bq, "_svd_kkt_pseudo_inverse", counted)
    mixed = _kkt_pseudo_inverse(KKTBlocks.of_dense(Ks, n), rtol)
    assert (mixed.dense() - expected).abs().max() < 1e-10
    # rank-deficient G with dependent rows: every member here is singular
    assert mixed.singular.tolist() == [True] * 6
    # a batch of P = γI members only: K⁺ in factored form, applied to right-hand sides
    # (also under vmap) and as a matrix
    scalar = _kkt_pseudo_inverse(KKTBlocks.of_dense(Ks[:5], n), rtol)
    assert isinstance(scalar, bq.ScalarKKTPseudoInverse)
    assert (scalar.dense() - expected[:5]).abs().max() < 1e-10
    rhs = torch.randn(2, 5, n + k, 3, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(torch.func.vmap(lambda r: scalar @ r)(rhs),
                               expected[:5] @ rhs, rtol=0, atol=1e-10)
    assert svd_calls == []


def test_kkt_pseudo_inverse_takes_the_svd_where_the_gram_matrix_cannot_resolve_G():
    """Singular values of G at 1e-4 and 1e-7 of the largest square to 1e-8 and 1e-14. The
    first the Gram matrix resolves (on this machine's LAPACK its pseudo-inverse passes the
    Penrose check; either way the result equals torch's pseudo-inverse of K); the second
    falls below its round-off, is dropped although the SVD's cutoff keeps it, and that
    member takes the SVD: its block ``G⁺`` of ``K⁺``
    equals torch's pseudo-inverse of G (K's own pair eigenvalue, near 1e-14, is beyond an
    eigendecomposition's resolution)."""
    import torchdiffopt.backends.batched_quadratic as bq

    gen = torch.Generator().manual_seed(2)
    n, k, gamma = 5, 9, 0.2
    Ks, Gs = [], []
    for small in (0.0, 1e-4, 1e-7):
        G = torch.randn(k, n, dtype=torch.float64, generator=gen)
        G[:, 0] = small * torch.randn(k, dtype=torch.float64, generator=gen)
        G[-2:] = 0.0
        G[3] = G[0] + G[1]
        D = torch.diag((G == 0).all(-1).to(torch.float64))
        P = gamma * torch.eye(n, dtype=torch.float64)
        Ks.append(torch.cat((torch.cat((P, G.T), 1), torch.cat((G, D), 1)), 0))
        Gs.append(G)
    Ks = torch.stack(Ks)
    svd_calls = []
    svd = bq._svd_kkt_pseudo_inverse

    def counted(G, *args):
        svd_calls.extend(G[:, :, 0].abs().amax(-1).tolist())  # column 0 says which member
        return svd(G, *args)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bq, "_svd_kkt_pseudo_inverse", counted)
        X = bq._kkt_pseudo_inverse(bq.KKTBlocks.of_dense(Ks, n),
                                   1e3 * torch.finfo(torch.float64).eps * (n + k))
    X = X.dense()
    # the 1e-7 member takes the SVD (its dropped direction has ‖G v‖ far above the cutoff);
    # whether the 1e-4 one passes the Penrose check depends on the LAPACK build's eigh
    assert any(0 < c < 1e-6 for c in svd_calls) and all(c > 0 for c in svd_calls)
    expected = torch.linalg.pinv(Ks[:2], hermitian=True)
    error = (X[:2] - expected).abs().amax((-2, -1)) / expected.abs().amax((-2, -1))
    assert (error < 1e-8).all()
    G_pinv = torch.linalg.pinv(Gs[2], rtol=1e-12)
    assert (X[2, :n, n:] - G_pinv).abs().max() <= 1e-6 * G_pinv.abs().max()


def test_active_set_factorization_schur_members_and_the_rest():
    """K = [[P, Gᵀ], [G, D]] with D = 1 on unused slots: members with P ≻ 0 and independent
    used rows are solved by the Schur complement of P (two Cholesky factorizations), members
    with more active rows than variables by the pseudo-inverse directly (K is singular), the
    others (an LP vertex, a dependent active row, a singular P that makes K nonsingular) by
    LU or the pseudo-inverse. Every member's solution equals torch's pseudo-inverse applied
    to the right-hand sides, and the singular flags equal DenseFactorization's."""
    from torchdiffopt.backends.batched_quadratic import (INVERSE_MIN_COLUMNS,
                                                         ActiveSetFactorization, KKTBlocks,
                                                         _kkt_pseudo_inverse)
    from torchdiffopt.folding import solve_columns
    from torchdiffopt.linalg.factorization import DenseFactorization

    gen = torch.Generator().manual_seed(2)
    n, k = 5, 7
    Ks, useds = [], []
    rows = {"qp": 3, "lp": 5, "dependent": 3, "singular_P": 4, "qp_no_rows": 0, "many": 6}
    kinds = ("qp", "qp", "lp", "dependent", "singular_P", "qp_no_rows", "many")
    for kind in kinds:
        L = torch.randn(n, n, dtype=torch.float64, generator=gen)
        P = L @ L.T + 0.1 * torch.eye(n, dtype=torch.float64)
        if kind == "lp":
            P = torch.zeros(n, n, dtype=torch.float64)
        if kind == "singular_P":            # rank 2, ≻ 0 on the null space of 4 rows
            v = torch.randn(n, 2, dtype=torch.float64, generator=gen)
            P = v @ v.T
        used = (torch.arange(k) < rows[kind]).to(torch.float64)
        G = torch.randn(k, n, dtype=torch.float64, generator=gen) * used[:, None]
        if kind == "dependent":
            G[2] = G[0] - 2 * G[1]
        D = torch.diag(1.0 - used)
        Ks.append(torch.cat((torch.cat((P, G.T), 1), torch.cat((G, D), 1)), 0))
        useds.append(used)
    K, used = torch.stack(Ks), torch.stack(useds)
    rtol = 1e3 * torch.finfo(torch.float64).eps * (n + k)
    pinv = lambda Ks, r: _kkt_pseudo_inverse(KKTBlocks.of_dense(Ks, n), r)  # noqa: E731
    factor = ActiveSetFactorization(KKTBlocks.of_dense(K, n), _kkt_pseudo_inverse)
    # the ways in order: Schur complement, LU, pseudo-inverse
    assert [idx.tolist() for idx, _ in factor._ways] == [[0, 1, 5], [2, 3, 4], [6]]
    dense = DenseFactorization(K, pseudo_inverse=pinv)
    assert factor.singular.tolist() == dense.singular.tolist()
    assert factor.singular.tolist() == [False, False, False, True, False, False, True]
    rhs = torch.randn(len(K), n + k, 3, dtype=torch.float64, generator=gen)
    expected = torch.linalg.pinv(K, hermitian=True, rtol=rtol) @ rhs
    torch.testing.assert_close(factor.solve(rhs), expected, atol=1e-9, rtol=1e-9)
    # under vmap, folded into the columns (solve_columns): the same solutions
    stacked = torch.stack((rhs, 2.0 * rhs))
    torch.testing.assert_close(
        torch.func.vmap(lambda r: solve_columns(factor.solve, r))(stacked),
        torch.stack((expected, 2.0 * expected)), atol=1e-9, rtol=1e-9)
    # many columns: the Schur members through the explicit inverse, the same solutions
    wide = torch.randn(len(K), n + k, INVERSE_MIN_COLUMNS, dtype=torch.float64, generator=gen)
    schur = factor._ways[0][1].__self__
    assert schur._inverse is None
    torch.testing.assert_close(factor.solve(wide),
                               torch.linalg.pinv(K, hermitian=True, rtol=rtol) @ wide,
                               atol=1e-9, rtol=1e-9)
    assert schur._inverse is not None
    Ks = K[[0, 1, 5]]
    torch.testing.assert_close(schur.inverse() @ Ks, torch.eye(n + k, dtype=torch.float64)
                               .expand_as(Ks), atol=1e-11, rtol=0)


def test_schur_solves_are_accurate_for_ill_conditioned_P():
    """P with condition 1e5 (OptNet's Q = LLᵀ + 1e-3·I reaches 1e5–1e7) and multipliers
    1e3 times the primal values: the Schur complement's rounding error grows with κ(P)
    (unrefined, its primal part is 10–70× less accurate than an LU of K here); its one
    refinement step against K brings it within 2× of a backward-stable LU solve (on
    1.5× on one LAPACK build, below 1× on another) and at least 5× below the
    unrefined solve (30×). Reference: LU solves refined three times."""
    from torchdiffopt.backends.batched_quadratic import (ActiveSetFactorization, KKTBlocks,
                                                         _SchurComplement)

    gen = torch.Generator().manual_seed(3)
    B, n, k = 16, 20, 8
    V, _ = torch.linalg.qr(torch.randn(B, n, n, dtype=torch.float64, generator=gen))
    spectrum = torch.logspace(0, -5, n, dtype=torch.float64).expand(B, n)
    P = V @ torch.diag_embed(spectrum) @ V.mT
    G = torch.randn(B, k, n, dtype=torch.float64, generator=gen)
    zeros = torch.zeros(B, k, k, dtype=torch.float64)
    K = torch.cat((torch.cat((P, G.mT), -1), torch.cat((G, zeros), -1)), -2)
    z = torch.cat((torch.randn(B, n, 1, dtype=torch.float64, generator=gen),
                   1e3 * torch.randn(B, k, 1, dtype=torch.float64, generator=gen)), 1)
    rhs = K @ z
    factor = ActiveSetFactorization(KKTBlocks(P, G, torch.ones(B, k, dtype=torch.float64)),
                                    pseudo_inverse=None)
    (members, solve), = factor._ways                  # one way for the whole batch:
    assert members is None and isinstance(solve.__self__, _SchurComplement)  # the Schur one
    lu, piv = torch.linalg.lu_factor(K)
    ref = torch.linalg.lu_solve(lu, piv, rhs)
    for _ in range(3):
        ref = ref + torch.linalg.lu_solve(lu, piv, rhs - K @ ref)

    def primal_error(solution):
        return float((solution - ref)[:, :n].abs().amax() / ref[:, :n].abs().amax())
    refined = primal_error(factor.solve(rhs))
    unrefined = primal_error(solve.__self__._apply(rhs))
    lu_error = primal_error(torch.linalg.lu_solve(lu, piv, rhs))
    assert refined <= 2.0 * lu_error and refined <= unrefined / 5


def test_ridge_members_the_schur_complement_rejects_go_to_the_pseudo_inverse():
    """``P = γI``, γ > 0, few rows (k ≤ n): a member with exactly dependent rows (singular)
    and one with rows dependent to 1e-7 (regular, but its complement's pivots fail the
    test) take the pseudo-inverse without an LU; the singular flag follows the rank the
    pseudo-inverse kept, and both solutions equal torch's pseudo-inverse (the inverse for
    the regular one). A third, well-conditioned member keeps the Schur complement."""
    from torchdiffopt.backends.batched_quadratic import (ActiveSetFactorization, KKTBlocks,
                                                         _kkt_pseudo_inverse)

    gen = torch.Generator().manual_seed(4)
    n, k, gamma = 6, 4, 0.3
    Ks = []
    for dependence in (0.0, 1e-7, None):
        G = torch.randn(k, n, dtype=torch.float64, generator=gen)
        if dependence is not None:
            G[2] = G[0] + G[1] + dependence * torch.randn(n, dtype=torch.float64,
                                                          generator=gen)
        P = gamma * torch.eye(n, dtype=torch.float64)
        Ks.append(torch.cat((torch.cat((P, G.T), 1),
                             torch.cat((G, torch.zeros(k, k, dtype=torch.float64)), 1)), 0))
    K = torch.stack(Ks)
    ridge = torch.tensor([True, True, True])
    factor = ActiveSetFactorization(KKTBlocks.of_dense(K, n), _kkt_pseudo_inverse,
                                    pinv_unless_schur=ridge)
    assert [idx.tolist() for idx, _ in factor._ways] == [[2], [0, 1]]
    assert factor.singular.tolist() == [True, False, False]
    rhs = torch.randn(3, n + k, 2, dtype=torch.float64, generator=gen)
    expected = torch.linalg.pinv(K, hermitian=True, rtol=1e-13) @ rhs
    got = factor.solve(rhs)
    torch.testing.assert_close(got[[0, 2]], expected[[0, 2]], rtol=0, atol=1e-9)
    # the nearly dependent member (condition near 1e14): the inverse, backward stable
    # (residual at round-off of |K| |z|) and agreeing with LU to the condition's accuracy
    residual = (K[1] @ got[1] - rhs[1]).abs().max()
    assert float(residual) <= 1e-12 * float(K[1].abs().max() * got[1].abs().max())
    lu = torch.linalg.solve(K[1], rhs[1])
    assert float((got[1] - lu).abs().max()) <= 1e-3 * float(lu.abs().max())


def test_singular_flags_do_not_depend_on_the_batch_neighbours():
    """The regular, nearly dependent ridge member of the test above keeps ``singular`` False
    when a general member with more used rows than variables (singular, pseudo-inverse as
    well) shares its batch: the mixed pseudo-inverse carries the ridge members' flags."""
    from torchdiffopt.backends.batched_quadratic import (ActiveSetFactorization, KKTBlocks,
                                                         _kkt_pseudo_inverse)

    gen = torch.Generator().manual_seed(4)
    n, k = 6, 8
    G = torch.randn(2, k, n, dtype=torch.float64, generator=gen)
    used = torch.ones(2, k, dtype=torch.float64)
    used[0, 4:] = 0.0  # the ridge member: 4 rows, the third dependent to 1e-7
    G[0, 4:] = 0.0
    G[0, 2] = G[0, 0] + G[0, 1] + 1e-7 * torch.randn(n, dtype=torch.float64, generator=gen)
    L = torch.randn(n, n, dtype=torch.float64, generator=gen)
    P = torch.stack((0.3 * torch.eye(n, dtype=torch.float64),
                     L @ L.T + torch.eye(n, dtype=torch.float64)))
    K = KKTBlocks(P, G, used)
    factor = ActiveSetFactorization(K, _kkt_pseudo_inverse,
                                    pinv_unless_schur=torch.tensor([True, False]))
    assert [idx for idx, _ in factor._ways] == [None]  # both by the pseudo-inverse
    assert factor.singular.tolist() == [False, True]
    rhs = torch.randn(2, n + k, 1, dtype=torch.float64, generator=gen)
    z = factor.solve(rhs)
    residual = (K @ z - rhs)[0].abs().max()  # backward stable, as K is regular
    assert float(residual) <= 1e-12 * float(K.dense()[0].abs().max() * z[0].abs().max())
