"""TriangularElimination (linalg/elimination.py) and the blocks that the conic backend reads
off its programs for it (ResidualJacobians.eliminated): solves against dense ones, member by
member."""

import numpy as np
import pytest
import torch

import torchdiffopt as tdo
from torchdiffopt.backends.batched_conic import (BlockDiagonalD, ConicPattern, DenseSystems,
                                                 ResidualJacobians)
from torchdiffopt.backends.cones import ConeDims, projection_derivative
from torchdiffopt.linalg.elimination import TriangularElimination
from torchdiffopt.linalg.factorization import DenseFactorization

F64 = torch.float64


def dense_solve(M, rhs, transpose):
    """``M⁻¹ rhs`` (``M⁻ᵀ``) for ``rhs (B, N, k)``, one member at a time."""
    return torch.stack([torch.linalg.solve(Mb.mT if transpose else Mb, r)
                        for Mb, r in zip(M, rhs)])


@pytest.mark.parametrize("transpose", [False, True])
def test_permuted_block_triangular_matrices_are_solved_exactly(transpose):
    """Random ``M̃ = [[T_F, 0, 0], [M_SF, M_SS, 0], [M_LF, M_LS, T_L]]`` with diagonal
    ``T``s, scattered into ``M`` by a random row and column order per member."""
    g = torch.Generator().manual_seed(0)
    B, N, k_F, k_L = 5, 12, 3, 4
    s = N - k_F - k_L
    Mt = torch.randn(B, N, N, generator=g, dtype=F64)
    Mt[:, :k_F, k_F:] = 0.0
    Mt[:, k_F:k_F + s, k_F + s:] = 0.0
    for lo, size in ((0, k_F), (k_F + s, k_L)):
        block = Mt[:, lo:lo + size, lo:lo + size]
        block.copy_(torch.diag_embed(torch.rand(B, size, generator=g, dtype=F64) + 0.5))
    Mt[:, k_F:k_F + s, k_F:k_F + s] += 4 * torch.eye(s, dtype=F64)
    rows = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    cols = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    M = torch.empty_like(Mt)
    for b in range(B):  # M[rows[b]][:, cols[b]] = M̃[b]
        M[b][rows[b][:, None], cols[b][None, :]] = Mt[b]
    F, S, L = slice(0, k_F), slice(k_F, k_F + s), slice(k_F + s, N)
    lu = TriangularElimination(rows, cols, Mt[:, F, F].diagonal(dim1=1, dim2=2), Mt[:, S, F],
                               Mt[:, S, S], Mt[:, L, F], Mt[:, L, S],
                               Mt[:, L, L].diagonal(dim1=1, dim2=2))
    assert not lu.singular.any()
    rhs = torch.randn(B, N, 3, generator=g, dtype=F64)
    torch.testing.assert_close(lu.solve(rhs, transpose), dense_solve(M, rhs, transpose),
                               rtol=1e-12, atol=1e-12)


# A program with bounds on x_0 … x_4 (unit rows of A: the elimination's pairs), a second
# bound on x_0, two dense inequalities and a second-order cone, over 10 variables (at most
# 9 active constraints: M is regular where no two active bounds fix the same variable)
n, CONES = 10, {"z": 1, "l": 8, "q": [3]}
m = ConeDims.from_dict(CONES).size


def bounded_jacobians(V, valid, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = V.shape[0]
    A = torch.zeros(B, m, n, dtype=F64)
    A[:, 0] = torch.randn(B, n, generator=g, dtype=F64)              # zero cone: dense row
    A[:, 1:6, :5] = -torch.eye(5, dtype=F64) * (1 + torch.rand(B, 5, 1, generator=g, dtype=F64))
    A[:, 6, 0] = 2.0                                                 # a second bound on x_0
    A[:, 7:9] = torch.randn(B, 2, n, generator=g, dtype=F64)        # dense inequalities
    A[:, 9:] = torch.randn(B, 3, n, generator=g, dtype=F64)         # second-order cone
    L = torch.randn(B, n, n, generator=g, dtype=F64)
    P = L @ L.mT + torch.eye(n, dtype=F64)
    return ResidualJacobians.of_entries(dense_pattern(), P.reshape(B, -1), A.reshape(B, -1),
                                        BlockDiagonalD.at(V, CONES, "cpu"), valid)


def dense_pattern() -> ConicPattern:
    """Every entry of ``A (m, n)`` and ``P (n, n)`` stored."""
    rows, cols = np.divmod(np.arange(n * n), n)
    a_rows, a_cols = np.divmod(np.arange(m * n), n)
    return ConicPattern(n, m, a_rows, a_cols, rows, cols)


def changed(J: ResidualJacobians) -> ResidualJacobians:
    """``J`` after its dense ``A`` was edited in place, built again from its entries (what
    was read off them, the rows with a single nonzero, is read again)."""
    B = J.A.shape[0]
    return ResidualJacobians.of_entries(dense_pattern(), J.P.reshape(B, -1),
                                        J.A.reshape(B, -1), J.D, J.valid)


def signed_points(signs):
    """Points ``v`` whose nonnegative rows have the given signs (``D_ii = 1`` where
    positive), a random zero row and cone block."""
    rng = np.random.default_rng(3)
    V = rng.normal(size=(len(signs), m))
    V[:, 1:9] = np.abs(V[:, 1:9]) * np.asarray(signs)
    return V


def test_orders_of_residual_map_jacobians_are_triangular_and_solve_exactly():
    # nonnegative rows 1-8: bounds on x_0 … x_4, a second bound on x_0, two dense rows
    signs = [[1, 1, -1, 1, -1, 1, 1, -1],    # x_0's bounds both active: pairs x_1, x_3
             [1, 1, 1, -1, 1, -1, -1, -1],   # pairs x_0, x_1, x_2, x_4
             [-1, 1, 1, 1, 1, 1, -1, 1],     # pairs x_1 … x_4 and x_0 by its second bound
             [1, -1, 1, 1, -1, -1, -1, -1]]  # a failed member
    valid = torch.tensor([True, True, True, False])
    J = bounded_jacobians(signed_points(signs), valid)
    lu = J.eliminated()
    rows, cols = lu.rows, lu.cols
    k_F, s, k_L = lu.sizes
    # the fewest pairs (member 0's two) and inactive rows (member 2's two)
    assert (k_F, k_L) == (2, 4)
    M = J.dense()
    F, S, L = slice(0, k_F), slice(k_F, k_F + s), slice(k_F + s, n + m)
    for b in range(4):  # the failed member too: the identity in its natural order
        Mt = M[b][rows[b][:, None], cols[b][None, :]]
        assert Mt[:k_F, k_F:].abs().max() == 0
        assert Mt[:-k_L, -k_L:].abs().max() == 0
        for T in (Mt[:k_F, :k_F], Mt[-k_L:, -k_L:]):
            assert (T - torch.diag(T.diagonal())).abs().max() == 0
            assert T.diagonal().abs().min() > 0
        # the blocks read off P, A and D are those of the dense M
        assert torch.equal(lu.t_F[b], Mt[F, F].diagonal())
        assert torch.equal(lu.t_L[b], Mt[L, L].diagonal())
        for block, where in ((lu.M_SF, (S, F)), (lu.M_LF, (L, F)), (lu.M_LS, (L, S))):
            torch.testing.assert_close(block[b], Mt[where], rtol=0, atol=1e-15)
    assert 0 not in cols[0, :k_F].tolist()
    assert torch.equal(rows[3], torch.arange(n + m)) and torch.equal(cols[3], rows[3])
    assert DenseSystems(J).singular.tolist() == [True, False, False, False]
    # member 0's M is singular (two active bounds fix x_0 twice): the whole matrix's
    # pseudo-inverse serves the batch; without it the elimination does
    assert isinstance(DenseSystems(J)._lu, DenseFactorization)
    J = bounded_jacobians(signed_points(signs[1:]), valid[1:])
    systems = DenseSystems(J)
    assert isinstance(systems._lu, TriangularElimination)
    rhs = torch.randn(3, 2, n + m, generator=torch.Generator().manual_seed(1), dtype=F64)
    M = J.dense()
    for transpose in (False, True):
        torch.testing.assert_close(systems.solve(rhs, transpose),
                                   dense_solve(M, rhs.mT, transpose).mT,
                                   rtol=1e-11, atol=1e-11)


def test_without_eliminable_unknowns_the_whole_matrix_is_factorized():
    """Every nonnegative row active and dense (no bounds): nothing to eliminate (the cone's
    point in the polar cone, ``D = 0`` there, keeps the 9 active rows regular)."""
    V = signed_points([[1] * 8] * 2)
    V[:, 9:] = [-2.0, 0.1, 0.1]
    J = bounded_jacobians(V, torch.tensor([True, True]))
    J.A[:, 1:7] = torch.randn(2, 6, n, generator=torch.Generator().manual_seed(2), dtype=F64)
    J = changed(J)
    assert J.eliminated() is None
    systems = DenseSystems(J)
    assert isinstance(systems._lu, DenseFactorization)
    rhs = torch.randn(2, 1, n + m, dtype=F64)
    torch.testing.assert_close(systems.solve(rhs), dense_solve(J.dense(), rhs.mT, False).mT)


def test_a_singular_member_falls_back_to_the_whole_matrix():
    """Two identical active dense rows make ``M`` singular: the member is flagged, and the
    solves are those of DenseFactorization (the pseudo-inverse)."""
    V = signed_points([[1, 1, 1, -1, -1, -1, 1, 1]] * 2)
    J = bounded_jacobians(V, torch.tensor([True, True]))
    J.A[1, 8] = J.A[1, 7]  # rows n + 7, n + 8 of member 1's M: [-A_7, 0] twice
    J = changed(J)
    assert J.eliminated() is not None
    systems = DenseSystems(J)
    assert isinstance(systems._lu, DenseFactorization)
    assert systems.singular.tolist() == [False, True]


def _portfolio_layer(rng, assets, solver="scs"):
    S = np.vstack((rng.normal(scale=0.1, size=(3, assets)),
                   np.diag(rng.uniform(0.05, 0.2, assets))))
    model = tdo.Model(solver=solver, backend="conic")
    w = model.variable(assets, lb=0.0, name="w")
    returns = model.parameter(np.zeros(assets), name="mu")
    model.constraint(tdo.norm2(S @ w) <= 0.1)
    model.constraint(w.sum() == 1)
    model.maximize(returns @ w)
    return tdo.Layer(model, parameters=[returns], outputs=w)


@pytest.mark.parametrize("cones", [{"z": 1, "l": 8, "q": [3, 4, 3], "s": [2], "ep": 1},
                                   {"l": 7, "q": [5], "ed": 2, "p": [0.3, -0.6]}])
def test_elimination_over_every_cone_kind_solves_like_the_whole_matrix(cones):
    """Bounds on x_0 … x_4 beside dense rows and cones of every kind, in groups whose rows
    are one run and groups whose rows are not, and a failed member: the blocks read off
    ``P``, ``A`` and ``D`` solve as the dense ``M`` does, in both orientations."""
    dims = ConeDims.from_dict(cones)
    g = torch.Generator().manual_seed(7)
    B, n_x, m_c = 4, 30, dims.size
    free = dims.z
    A = torch.randn(B, m_c, n_x, generator=g, dtype=F64)
    A[:, free:free + 5] = 0.0
    A[:, free:free + 5, :5] = -torch.eye(5, dtype=F64) * (
        1 + torch.rand(B, 5, 1, generator=g, dtype=F64))
    L = torch.randn(B, n_x, n_x, generator=g, dtype=F64)
    P = L @ L.mT + torch.eye(n_x, dtype=F64)
    V = np.random.default_rng(8).normal(size=(B, m_c))
    V[:, free:free + dims.l] = np.abs(V[:, free:free + dims.l])  # active: D_ii = 1
    V[:, free + 5] = -1.0                                         # an inactive dense row
    valid = torch.tensor([True, False, True, True])
    rows, cols = np.divmod(np.arange(n_x * n_x), n_x)
    a_rows, a_cols = np.divmod(np.arange(m_c * n_x), n_x)
    pattern = ConicPattern(n_x, m_c, a_rows, a_cols, rows, cols)
    J = ResidualJacobians.of_entries(pattern, P.reshape(B, -1), A.reshape(B, -1),
                                     BlockDiagonalD.at(V, cones, "cpu"), valid)
    systems = DenseSystems(J)
    assert isinstance(systems._lu, TriangularElimination)
    assert systems._lu.sizes[0] == 5 and not systems.singular.any()
    M = J.dense()
    rhs = torch.randn(B, 2, n_x + m_c, generator=g, dtype=F64)
    for transpose in (False, True):
        got = systems.solve(rhs, transpose)
        torch.testing.assert_close(got[valid], dense_solve(M, rhs.mT, transpose).mT[valid],
                                   rtol=1e-10, atol=1e-10)
        assert torch.isfinite(got).all()


def test_eliminated_systems_serve_torch_func_transforms(monkeypatch):
    """jacrev and jacfwd through the eliminated systems agree (every solve in both
    orientations under vmap), for a layer whose active bounds are eliminated."""
    rng = np.random.default_rng(1)
    layer = _portfolio_layer(rng, 8, solver="clarabel")
    mu = torch.tensor(rng.normal(0.05, 0.1, size=(2, 8)))
    solves = []
    original = TriangularElimination.solve
    monkeypatch.setattr(TriangularElimination, "solve", lambda self, rhs, transpose=False: (
        solves.append(transpose), original(self, rhs, transpose))[1])
    rev = torch.func.jacrev(layer)(mu)
    fwd = torch.func.jacfwd(layer)(mu)
    assert True in solves and False in solves
    torch.testing.assert_close(rev, fwd, rtol=1e-9, atol=1e-10)
    assert rev.abs().max() > 0


def test_a_bounded_portfolio_layer_is_differentiated_through_the_elimination():
    """A long-only portfolio (most bounds active): the layer's gradient against central
    differences of its solution, with the derivative systems eliminated."""
    rng = np.random.default_rng(0)
    assets = 12
    layer = _portfolio_layer(rng, assets)
    mu = torch.tensor(rng.normal(0.05, 0.1, size=(3, assets)), requires_grad=True)
    weights = torch.tensor(rng.normal(size=(3, assets)))
    used = []
    original = TriangularElimination.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        used.append(self.sizes)
    TriangularElimination.__init__ = spy
    try:
        (layer(mu) * weights).sum().backward()
    finally:
        TriangularElimination.__init__ = original
    assert used and used[0][1] < 0.6 * sum(used[0])  # order 41 → 23 (W4's 157 → 73)
    direction = torch.tensor(rng.normal(size=(3, assets)))
    h = 1e-6
    with torch.no_grad():
        plus = (layer(mu + h * direction) * weights).sum()
        minus = (layer(mu - h * direction) * weights).sum()
    assert float((mu.grad * direction).sum()) == pytest.approx(
        float(plus - minus) / (2 * h), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("cones", [{"z": 1, "l": 2, "q": [3, 3]},          # one run of two cones
                                   {"l": 1, "q": [3, 4, 3, 3], "s": [2]}])  # 3s not in one run
def test_blocks_of_M_written_in_place_match_the_dense_D(cones):
    """``I - D`` and ``X D`` written into views of a larger matrix (M's assembly) against
    the dense ``D``, for cone groups whose rows form one run and for groups that do not."""
    size = ConeDims.from_dict(cones).size
    V = np.random.default_rng(5).normal(size=(3, size))
    D = BlockDiagonalD.at(V, cones, "cpu")
    dense = torch.stack([torch.as_tensor(projection_derivative(v, cones, dual=True).to_dense())
                         for v in V])
    big = torch.full((3, size + 2, size + 4), 7.0, dtype=F64)
    D.identity_minus(out=big[:, 1:-1, 2:-2])
    torch.testing.assert_close(big[:, 1:-1, 2:-2], torch.eye(size, dtype=F64) - dense)
    assert (big[:, 0] == 7).all() and (big[:, :, :2] == 7).all()
    X = torch.randn(3, 4, size, dtype=F64)
    out = torch.zeros(3, 4, size + 3, dtype=F64)
    D.right_of(X, out=out[..., 3:])
    torch.testing.assert_close(out[..., 3:], X @ dense)
    torch.testing.assert_close(D.right_of(X, transpose=True), X @ dense.mT)


def test_single_entries_from_the_entries_match_the_dense_matrix():
    """``ConicPattern.single_entries`` on stored entries, with repeated pairs (two that
    cancel, two that add up) and explicit zeros, against the rows of the dense ``A``."""
    # rows: 0 one entry; 1 two entries that cancel at (1, 2) and one at (1, 0); 2 two
    # entries; 3 an explicit zero only; 4 two entries adding up at (4, 3)
    rows = np.array([0, 1, 1, 1, 2, 2, 3, 4, 4])
    cols = np.array([1, 2, 2, 0, 0, 3, 1, 3, 3])
    vals = torch.tensor([[2.0, 1.0, -1.0, 5.0, 1.0, 1.0, 0.0, 1.0, 2.0],
                         [0.0, 1.0, 1.0, 0.0, 0.0, 4.0, 3.0, 1.0, -1.0]], dtype=F64)
    pattern = ConicPattern(4, 5, rows, cols, [], [])
    single, column = pattern.single_entries(vals)
    # against the dense A, row by row in numpy
    A = pattern.dense_matrix(vals, "A_rows", "A_cols", (5, 4)).numpy()
    for b in range(2):
        for i in range(5):
            nonzero = np.flatnonzero(A[b, i])
            assert bool(single[b, i]) == (len(nonzero) == 1)
            assert int(column[b, i]) == (nonzero[0] if len(nonzero) == 1 else 0)
    assert single.tolist() == [[True, True, False, False, True], [False, True, True, True, False]]
    assert column.tolist() == [[1, 0, 0, 0, 3], [0, 2, 3, 1, 0]]
