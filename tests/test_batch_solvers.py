"""The dense batch solvers, the torch interior point of :mod:`torchdiffopt.solvers.ipm` and
DAQP through :mod:`torchdiffopt.solvers.daqp`: known solutions, HiGHS, infeasibility and
unboundedness per member, float32, CUDA. Both return the same :class:`IPMResult`, in the same
multiplier convention, so most tests run on both.

Problems with a known solution pick x*, the active set and multipliers of the right signs
first, then set the data so that the KKT conditions hold there (as in ``problems.py``): the
solution is strictly complementary, and unique when P is positive definite on the null space
of the active rows.
"""

import types

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from torchdiffopt.errors import UnboundedError
from torchdiffopt.solvers.daqp import solve_daqp
from torchdiffopt.solvers.highs import solve_highs
from torchdiffopt.solvers.ipm import solve_ipm
from torchdiffopt.solvers.solution import NumericQP

OPTIMAL, PRIMAL_INFEASIBLE, DUAL_INFEASIBLE, NOT_CONVERGED = 0, 1, 2, 3

#: both dense batch solvers, for the tests of what they share
BOTH = pytest.mark.parametrize("solve", [solve_ipm, solve_daqp], ids=["ipm", "daqp"])


def lp_dual_tol(solve, kind, tol):
    """DAQP solves LPs by proximal-point iterations: the vertex comes out exact, its
    multipliers (and so the stationarity residual) only to about 1e-5; the KKT polish of the
    layers (:class:`~torchdiffopt.backends.batched_quadratic.BatchedQuadraticKKT`) makes
    them exact on the vertex's active set, which ``test_daqp_lp_multipliers_exact_after_polish``
    checks."""
    return 1e-4 if solve is solve_daqp and kind == "lp" else tol


def known_batch(rng, B, n, m_eq, m_ge, m_le, kind="qp"):
    """B problems with rows ``==`` then ``≥`` then ``≤``. ``kind``: "qp" (P ≻ 0, some rows
    active), "lp" (P = 0, n active rows: a unique, nondegenerate vertex) or "psd" (P ⪰ 0 of
    rank n/2, enough active rows for a unique solution). "qp" stays at least two rows short
    of a vertex, which keeps the active rows well conditioned. Returns the data as float64
    tensors and x*, μ*, the active mask as numpy arrays."""
    M = m_eq + m_ge + m_le
    sense = np.r_[np.zeros(m_eq), np.ones(m_ge), -np.ones(m_le)].astype(np.int64)
    P, q, c0 = np.zeros((B, n, n)), np.zeros((B, n)), np.zeros((B, M))
    C = rng.normal(size=(B, M, n))
    x_star, mu_star = rng.normal(size=(B, n)), np.zeros((B, M))
    active = np.zeros((B, M), dtype=bool)
    active[:, :m_eq] = True
    for k in range(B):
        if kind == "qp":
            L = rng.normal(size=(n, n))
            P[k] = L @ L.T / n + 0.5 * np.eye(n)
            n_active = int(rng.integers(0, n - m_eq - 1))
        elif kind == "psd":
            L = rng.normal(size=(n, n // 2))
            P[k] = L @ L.T / n
            n_active = n - m_eq - int(rng.integers(0, n // 4 + 1))
        else:
            n_active = n - m_eq
        rows = rng.choice(np.arange(m_eq, M), size=min(n_active, M - m_eq), replace=False)
        active[k, rows] = True
        slack = np.where(active[k], 0.0, rng.uniform(0.5, 1.5, M))
        c0[k] = -C[k] @ x_star[k] + sense * slack  # C x* + c0: 0, +slack (≥), -slack (≤)
        magnitude = rng.uniform(0.5, 2.0, M)
        mu_star[k, rows] = -sense[rows] * magnitude[rows]  # ≤ 0 on ≥ rows, ≥ 0 on ≤ rows
        mu_star[k, :m_eq] = rng.normal(size=m_eq)
        q[k] = -(P[k] @ x_star[k] + C[k].T @ mu_star[k])
    data = tuple(torch.tensor(a) for a in (P, q, C, c0, sense))
    return data, x_star, mu_star, active


def kkt_residuals(P, q, C, c0, sense, x, mu):
    """Relative stationarity, primal violation and complementarity, per member, and the
    largest multiplier of the wrong sign."""
    P, q, C, c0, x, mu = (np.asarray(t, dtype=np.float64) for t in (P, q, C, c0, x, mu))
    sense = np.asarray(sense)
    Px, Ctmu = np.einsum("bij,bj->bi", P, x), np.einsum("bmi,bm->bi", C, mu)
    rows = np.einsum("bmi,bi->bm", C, x) + c0
    inf = lambda v: np.abs(v).max(-1)  # noqa: E731
    stationarity = inf(Px + q + Ctmu) / (1 + np.maximum(inf(q), np.maximum(inf(Px), inf(Ctmu))))
    violation = np.where(sense == 0, np.abs(rows),
                         np.where(sense > 0, np.maximum(-rows, 0), np.maximum(rows, 0)))
    primal = inf(violation) / (1 + np.maximum(inf(c0), inf(rows - c0)))
    objective = 0.5 * np.einsum("bi,bi->b", x, Px) + np.einsum("bi,bi->b", q, x)
    complementarity = inf(mu * rows) / (1 + np.abs(objective))
    wrong_sign = np.where(sense > 0, np.maximum(mu, 0), np.where(sense < 0, np.maximum(-mu, 0),
                                                                  0)).max()
    return stationarity, primal, complementarity, wrong_sign


def assert_kkt(data, result, tol=1e-9):
    stationarity, primal, complementarity, wrong_sign = kkt_residuals(*data, result.x, result.mu)
    assert stationarity.max() <= tol
    assert primal.max() <= tol
    assert complementarity.max() <= tol
    assert wrong_sign == 0.0


def highs_reference(P, q, C, c0, sense):
    """x and μ of every member from HiGHS (its row dual is −μ)."""
    xs, mus = [], []
    n = q.shape[1]
    for k in range(q.shape[0]):
        problem = NumericQP(P=sp.csr_matrix(P[k].numpy()), q=q[k].numpy(), r=0.0,
                            C=sp.csr_matrix(C[k].numpy()), c0=c0[k].numpy(),
                            sense=sense.numpy().astype(np.int8), lb=np.full(n, -np.inf),
                            ub=np.full(n, np.inf))
        solution = solve_highs(problem)
        xs.append(solution.x)
        mus.append(-solution.row_shadow)
    return np.array(xs), np.array(mus)


@BOTH
@pytest.mark.parametrize("kind", ["qp", "lp", "psd"])
def test_known_solutions_with_equalities_and_both_inequality_senses(kind, solve):
    rng = np.random.default_rng({"qp": 0, "lp": 1, "psd": 2}[kind])
    data, x_star, mu_star, active = known_batch(rng, 64, 8, 2, 5, 5, kind)
    result = solve(*data)
    assert (result.status == OPTIMAL).all()
    assert_kkt(data, result, tol=lp_dual_tol(solve, kind, 1e-9))
    np.testing.assert_allclose(result.x.numpy(), x_star, atol=1e-6)
    np.testing.assert_allclose(result.mu.numpy(), mu_star, atol=lp_dual_tol(solve, kind, 1e-5))
    np.testing.assert_array_equal(result.active.numpy(), active)
    assert result.x.dtype == torch.float64 and result.status.dtype == torch.int64
    assert (result.iterations > 0).all() and (result.iterations < 30).all()


def test_daqp_lp_multipliers_exact_after_polish():
    """The layer's path: DAQP's LP vertex and multipliers, polished on the vertex's active
    set by the KKT factorization, match the constructed x*, μ* to rounding."""
    from torchdiffopt.backends.batched_quadratic import BatchedQuadraticKKT

    rng = np.random.default_rng(1)
    (P, q, C, c0, sense), x_star, mu_star, _ = known_batch(rng, 64, 8, 2, 5, 5, "lp")
    result = solve_daqp(P, q, C, c0, sense)
    n = q.shape[1]
    kkt = BatchedQuadraticKKT(P, q, C, c0, sense.numpy(), np.full(n, -np.inf),
                              np.full(n, np.inf), result.x, result.mu,
                              result.status == OPTIMAL, result.active)
    np.testing.assert_allclose(kkt.x.numpy(), x_star, atol=1e-10)
    np.testing.assert_allclose(kkt.mu.numpy(), mu_star, atol=1e-10)
    assert (kkt.kkt_residual < 1e-12).all()


def test_tighter_tolerance_gives_a_more_accurate_solution():
    """1e-12 at the tight end: at 1e-13 a member can stall at round-off and stop "not
    converged" on some CPUs (seen on one MKL build, not on another)."""
    rng = np.random.default_rng(3)
    data, x_star, mu_star, _ = known_batch(rng, 32, 8, 2, 5, 5, "qp")
    errors = []
    for tol in (1e-6, 1e-9, 1e-12):
        result = solve_ipm(*data, tol=tol)
        assert (result.status == OPTIMAL).all()
        errors.append(np.abs(result.x.numpy() - x_star).max())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-10


@BOTH
@pytest.mark.parametrize("kind", ["qp", "lp"])
def test_random_problems_match_highs(kind, solve):
    # generic data, solution unknown: box rows −1 ≤ x ≤ 1, ≥ rows feasible at x = 0, and
    # equality rows through a feasible point
    rng = np.random.default_rng(4 if kind == "qp" else 5)
    B, n, m_ge, m_eq = 24, 10, 12, 2
    C_ge = rng.normal(size=(B, m_ge, n))
    c0_ge = rng.uniform(0.1, 1.0, size=(B, m_ge))
    C_eq = rng.normal(size=(B, m_eq, n))
    c0_eq = -np.einsum("bmi,bi->bm", C_eq, rng.uniform(-0.05, 0.05, size=(B, n)))
    eye = np.broadcast_to(np.eye(n), (B, n, n))
    C = np.concatenate([C_eq, C_ge, eye, eye], 1)
    c0 = np.concatenate([c0_eq, c0_ge, np.ones((B, n)), -np.ones((B, n))], 1)
    sense = np.r_[np.zeros(m_eq), np.ones(m_ge + n), -np.ones(n)].astype(np.int64)
    L = rng.normal(size=(B, n, n))
    P = L @ L.transpose(0, 2, 1) / n if kind == "qp" else np.zeros((B, n, n))
    q = 3.0 * rng.normal(size=(B, n))
    data = tuple(torch.tensor(a) for a in (P, q, C, c0, sense))
    result = solve(*data)
    assert (result.status == OPTIMAL).all()
    assert_kkt(data, result, tol=lp_dual_tol(solve, kind, 1e-9))
    x_ref, mu_ref = highs_reference(*data)
    # HiGHS's simplex solves the LPs to rounding level; its QP solver leaves a relative
    # stationarity residual near 1e-8 (this one reaches 1e-11), hence the looser check
    atol = 1e-9 if kind == "lp" else 1e-6
    np.testing.assert_allclose(result.x.numpy(), x_ref, atol=atol)
    np.testing.assert_allclose(result.mu.numpy(), mu_ref, atol=lp_dual_tol(solve, kind, 10 * atol))


def mixed_batch(rng):
    """Eight members of 6 variables and 13 rows (1 ==, 6 ≥, 6 ≤); the last two rows bound x₀
    loosely (x₀ ≥ −100, x₀ ≤ 100). Members 1 and 5 (an LP) are infeasible (x₀ ≥ 1, x₀ ≤ 0),
    3 is infeasible by a row 0 = 1, 2 (an LP) and 4 (a QP, P singular) are unbounded along
    ∓e₅; 0, 6 and 7 have a known solution."""
    (P, q, C, c0, sense), x_star, mu_star, _ = known_batch(rng, 8, 6, 1, 5, 5, "qp")
    B, n = q.shape
    bound = torch.zeros(B, 2, n, dtype=C.dtype)
    bound[:, :, 0] = 1.0
    C = torch.cat([C, bound], 1)
    c0 = torch.cat([c0, torch.tensor([[100.0, -100.0]]).expand(B, 2)], 1)
    sense = torch.cat([sense, torch.tensor([1, -1])])
    mu_star = np.concatenate([mu_star, np.zeros((B, 2))], 1)
    c0[1, -2:] = torch.tensor([-1.0, 0.0])
    P[2], C[2, :, 5], q[2, 5] = 0.0, 0.0, -1.0
    C[3, 0], c0[3, 0] = 0.0, 1.0
    P[4, 5, :], P[4, :, 5], C[4, :, 5], q[4, 5] = 0.0, 0.0, 0.0, 2.0
    P[5], c0[5, -2:] = 0.0, torch.tensor([-1.0, 0.0])
    return (P, q, C, c0, sense), x_star, mu_star


@BOTH
def test_mixed_batch_reports_each_member_and_solves_the_feasible_ones(solve):
    data, x_star, mu_star = mixed_batch(np.random.default_rng(6))
    result = solve(*data)
    expected = [OPTIMAL, PRIMAL_INFEASIBLE, DUAL_INFEASIBLE, PRIMAL_INFEASIBLE, DUAL_INFEASIBLE,
                PRIMAL_INFEASIBLE, OPTIMAL, OPTIMAL]
    assert result.status.tolist() == expected
    solved = result.status == OPTIMAL
    np.testing.assert_allclose(result.x[solved].numpy(), x_star[solved.numpy()], atol=1e-8)
    np.testing.assert_allclose(result.mu[solved].numpy(), mu_star[solved.numpy()], atol=1e-8)
    assert_kkt(tuple(t[solved] for t in data[:4]) + (data[4],),
               type(result)(*(v[solved] for v in vars(result).values())))
    # no solution exists for the others: NaN, nothing active
    assert result.x[~solved].isnan().all() and result.mu[~solved].isnan().all()
    assert not result.active[~solved].any()
    # each member comes out as if it had been solved alone
    for k in range(len(expected)):
        alone = solve(*(t[k : k + 1] for t in data[:4]), data[4])
        assert alone.status.item() == expected[k]
        assert alone.iterations.item() == result.iterations[k].item()
        if expected[k] == OPTIMAL:
            np.testing.assert_allclose(alone.x[0].numpy(), result.x[k].numpy(), rtol=1e-9,
                                       atol=1e-12)


@BOTH
def test_unbounded_only_where_feasible_as_highs_says(solve):
    # random LPs in 3 variables with rows ==, ≥, ≥, ≤, the second ≥ row being 0·x + c ≥ 0:
    # with c = 0.1 many are unbounded; with c = −0.1 all are infeasible, though many still
    # have a direction of unbounded descent (the solver's first verdict on them)
    rng = np.random.default_rng(0)
    B, n = 32, 3
    sense = torch.tensor([0, 1, 1, -1])
    C = torch.tensor(rng.normal(size=(B, 4, n)))
    C[:, 1] = 0.0
    c0 = torch.tensor(rng.normal(size=(B, 4)))
    q = torch.tensor(rng.normal(size=(B, n)))
    P = torch.zeros(B, n, n, dtype=torch.float64)
    c0[:, 1] = 0.1
    feasible = solve(P, q, C, c0, sense)
    expected = []
    for k in range(B):
        problem = NumericQP(P=sp.csr_matrix((n, n)), q=q[k].numpy(), r=0.0,
                            C=sp.csr_matrix(C[k].numpy()), c0=c0[k].numpy(),
                            sense=sense.numpy().astype(np.int8), lb=np.full(n, -np.inf),
                            ub=np.full(n, np.inf))
        try:
            solve_highs(problem)
            expected.append(OPTIMAL)
        except UnboundedError:
            expected.append(DUAL_INFEASIBLE)
    assert feasible.status.tolist() == expected
    assert 0 < expected.count(DUAL_INFEASIBLE) < B
    c0[:, 1] = -0.1
    assert (solve(P, q, C, c0, sense).status == PRIMAL_INFEASIBLE).all()


def test_iteration_limit_is_reported_per_member():
    data, _, _ = mixed_batch(np.random.default_rng(6))
    full = solve_ipm(*data)
    limit = 8
    result = solve_ipm(*data, max_iter=limit)
    # unbounded members take a second, feasibility solve: leave them out
    cut = (full.iterations > limit) & (full.status != DUAL_INFEASIBLE)
    kept = (full.iterations <= limit) & (full.status != DUAL_INFEASIBLE)
    assert cut.any() and kept.any()
    assert (result.status[cut] == NOT_CONVERGED).all()
    assert (result.iterations[cut] == limit).all()
    assert result.x[cut].isfinite().all()  # the last iterate
    assert (result.status[kept] == full.status[kept]).all()
    assert (result.iterations[kept] == full.iterations[kept]).all()


@BOTH
def test_only_equality_rows_and_no_rows(solve):
    rng = np.random.default_rng(7)
    (P, q, C, c0, sense), x_star, mu_star, _ = known_batch(rng, 16, 7, 3, 0, 0, "qp")
    result = solve(P, q, C, c0, sense)
    np.testing.assert_allclose(result.x.numpy(), x_star, atol=1e-9)
    np.testing.assert_allclose(result.mu.numpy(), mu_star, atol=1e-9)
    assert result.active.all()
    # unconstrained: x = −P⁻¹q
    free = solve(P, q, C[:, :0], c0[:, :0], sense[:0])
    assert (free.status == OPTIMAL).all() and free.mu.shape == (16, 0)
    np.testing.assert_allclose(free.x.numpy(), -np.linalg.solve(P.numpy(), q.numpy()),
                               atol=1e-9)


@BOTH
def test_badly_scaled_rows_and_redundant_equalities(solve):
    rng = np.random.default_rng(8)
    data, x_star, mu_star, _ = known_batch(rng, 16, 8, 2, 5, 5, "qp")
    P, q, C, c0, sense = data
    scale = torch.tensor(10.0 ** rng.uniform(-3, 3, size=(16, 12)))
    C, c0 = C * scale.unsqueeze(-1), c0 * scale
    # a third equality row: the sum of the first two (μ is then not unique; x is)
    C = torch.cat([C[:, :2], C[:, :1] + C[:, 1:2], C[:, 2:]], 1)
    c0 = torch.cat([c0[:, :2], c0[:, :1] + c0[:, 1:2], c0[:, 2:]], 1)
    sense = torch.cat([sense[:2], sense[:1], sense[2:]])
    result = solve(P, q, C, c0, sense)
    assert (result.status == OPTIMAL).all()
    assert_kkt((P, q, C, c0, sense), result)
    np.testing.assert_allclose(result.x.numpy(), x_star, atol=1e-6)


@BOTH
def test_float32_in_float32_out(solve):
    rng = np.random.default_rng(9)
    data, x_star, mu_star, _ = known_batch(rng, 32, 8, 2, 5, 5, "qp")
    data32 = tuple(t.float() if t.is_floating_point() else t for t in data)
    result = solve(*data32)
    assert result.x.dtype == torch.float32 and result.mu.dtype == torch.float32
    assert (result.status == OPTIMAL).all()
    # the float32 data, solved in float64, rounded once on the way out
    exact = solve(*(t.double() if t.is_floating_point() else t for t in data32))
    np.testing.assert_allclose(result.x.numpy(), exact.x.float().numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(result.x.numpy(), x_star, atol=1e-4)
    np.testing.assert_allclose(result.mu.numpy(), mu_star, atol=1e-4)


@BOTH
def test_float_sense_and_mixed_row_order(solve):
    rng = np.random.default_rng(10)
    (P, q, C, c0, sense), x_star, mu_star, active = known_batch(rng, 8, 6, 2, 4, 4, "lp")
    order = torch.tensor(rng.permutation(10))
    result = solve(P, q, C[:, order], c0[:, order], sense[order].double())
    np.testing.assert_allclose(result.x.numpy(), x_star, atol=1e-8)
    np.testing.assert_allclose(result.mu.numpy(), mu_star[:, order],
                               atol=lp_dual_tol(solve, "lp", 1e-7))
    np.testing.assert_array_equal(result.active.numpy(), active[:, order])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    data, _, _ = mixed_batch(np.random.default_rng(6))
    cpu = solve_ipm(*data)
    gpu = solve_ipm(*(t.cuda() for t in data))
    assert gpu.x.is_cuda and gpu.status.is_cuda
    assert gpu.status.tolist() == cpu.status.tolist()
    solved = cpu.status == OPTIMAL
    np.testing.assert_allclose(gpu.x[solved.cuda()].cpu().numpy(), cpu.x[solved].numpy(),
                               atol=1e-10)


@pytest.mark.parametrize("outer", [True, False])
def test_shared_matrices_batch_equals_members_solved_alone(outer, monkeypatch):
    """Members with one P and C and their own q and c0 (decision-focused learning) take the
    shared path (one GEMM for every Newton matrix; with ``outer=False`` the outer products
    are too large to precompute). Each member's status, iteration count and solution equal
    its solve alone, including an infeasible and an unbounded member, an LP, and members
    that finish early (the others go on)."""
    import torchdiffopt.solvers.ipm as ipm

    if not outer:
        monkeypatch.setattr(ipm, "MAX_OUTER_ENTRIES", 0)
    rng = np.random.default_rng(11)
    (P, q, C, c0, sense), _, _, _ = known_batch(rng, 1, 6, 1, 5, 5, "qp")
    B = 7
    q = torch.tensor(rng.normal(size=(B, 6)))
    c0 = c0.expand(B, -1) + torch.tensor(rng.uniform(0.0, 0.5, size=(B, 11))) * (sense != 0)
    c0 = c0.clone()
    c0[2, 0] += 1e3                              # far from the others: more iterations
    bound = torch.zeros(1, 2, 6, dtype=C.dtype)
    bound[:, :, 0] = 1.0
    C = torch.cat([C, bound], 1)
    c0 = torch.cat([c0, torch.tensor([[100.0, -100.0]]).expand(B, 2)], 1)
    c0[4, -2:] = torch.tensor([-1.0, 0.0])       # x₀ ≥ 1 and x₀ ≤ 0: infeasible
    sense = torch.cat([sense, torch.tensor([1, -1])])
    cases = {"qp": P, "lp": torch.zeros_like(P)}
    for kind, P_k in cases.items():
        data = (P_k.expand(B, -1, -1), q, C.expand(B, -1, -1), c0, sense)
        result = ipm.solve_ipm(*data)
        assert result.status[4] == PRIMAL_INFEASIBLE
        if kind == "qp":
            assert (result.status[[0, 1, 2, 3, 5, 6]] == OPTIMAL).all()
        assert len(set(result.iterations.tolist())) > 1
        for k in range(B):
            alone = ipm.solve_ipm(*(t[k : k + 1] for t in data[:4]), sense)
            assert alone.status.item() == result.status[k].item()
            assert alone.iterations.item() == result.iterations[k].item()
            if alone.status.item() == OPTIMAL:
                np.testing.assert_allclose(result.x[k].numpy(), alone.x[0].numpy(),
                                           rtol=1e-8, atol=1e-10)
                np.testing.assert_allclose(result.mu[k].numpy(), alone.mu[0].numpy(),
                                           rtol=1e-8, atol=1e-10)


def test_daqp_threads_split_the_batch_without_changing_any_member(monkeypatch):
    """Above MIN_THREADED_ENTRIES DAQP runs one contiguous chunk of the batch per thread;
    every member's status, iterations and solution equal the one-thread run."""
    import torchdiffopt.solvers.daqp as daqp_adapter

    data, _, _ = mixed_batch(np.random.default_rng(6))
    serial = solve_daqp(*data, n_jobs=1)
    monkeypatch.setattr(daqp_adapter, "MIN_THREADED_ENTRIES", 0)
    threaded = solve_daqp(*data, n_jobs=3)
    assert threaded.status.tolist() == serial.status.tolist()
    assert threaded.iterations.tolist() == serial.iterations.tolist()
    torch.testing.assert_close(threaded.x, serial.x, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(threaded.mu, serial.mu, rtol=0, atol=0, equal_nan=True)


def test_auto_takes_daqp_on_cpu_and_the_interior_point_on_accelerators():
    from torchdiffopt.qp_function import _batch_solver

    with_rows = types.SimpleNamespace(n=10, m=4)
    assert _batch_solver("auto", torch.device("cpu"), with_rows) == "daqp"
    assert _batch_solver(None, torch.device("cpu"), with_rows) == "daqp"
    assert _batch_solver("auto", torch.device("cuda"), with_rows) == "ipm"
    assert _batch_solver("ipm", torch.device("cpu"), with_rows) == "ipm"
    assert _batch_solver("highs", torch.device("cpu"), with_rows) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_daqp_takes_and_returns_cuda_tensors():
    data, _, _ = mixed_batch(np.random.default_rng(6))
    cpu = solve_daqp(*data)
    gpu = solve_daqp(*(t.cuda() for t in data))
    assert gpu.x.is_cuda and gpu.status.is_cuda and gpu.active.is_cuda
    assert gpu.status.tolist() == cpu.status.tolist()
    torch.testing.assert_close(gpu.x.cpu(), cpu.x, equal_nan=True)


@pytest.mark.parametrize("kind", ["qp", "lp"])
def test_daqp_simple_bounds_equal_bound_rows(kind):
    """Variable bounds handed to DAQP as simple bounds (one multiplier per variable) give the
    solution and the bound rows' multipliers of the same bounds written as unit rows: lower,
    upper, both, fixed and absent bounds, active and inactive."""
    from torchdiffopt.backends.batched_quadratic import with_bound_rows

    rng = np.random.default_rng(12)
    (P, q, C, c0, sense), _, _, _ = known_batch(rng, 16, 6, 1, 3, 3, kind)
    lb = np.array([-0.5, -np.inf, -1.5, 0.0, -np.inf, -1.0])
    ub = np.array([np.inf, 0.5, 1.5, 0.0, np.inf, 1.0])
    simple = solve_daqp(P, q, C, c0, sense, lb, ub)
    rows = solve_daqp(P, q, *with_bound_rows(C, c0, sense.numpy(), lb, ub))
    assert simple.status.tolist() == rows.status.tolist()
    assert (simple.status == OPTIMAL).sum() >= 8
    ok = simple.status == OPTIMAL
    torch.testing.assert_close(simple.x[ok], rows.x[ok], atol=1e-9, rtol=0)
    torch.testing.assert_close(simple.mu[ok], rows.mu[ok], atol=lp_dual_tol(solve_daqp, kind, 1e-8),
                               rtol=0)
    assert simple.active[ok, 7:].any() and (~simple.active[ok, 7:]).any()


def test_daqp_single_row_with_bounds_in_a_batch():
    """One constraint row and variable bounds (a simplex projection, sparsemax): DAQP's bound
    arrays must be C-contiguous per member (its wrapper ignores strides; a concatenation with
    a broadcast block came out column-major and members read each other's bounds). Every
    member equals the IPM's solution."""
    rng = np.random.default_rng(13)
    B, n = 8, 5
    P = torch.eye(n, dtype=torch.float64).expand(B, n, n)
    q = torch.tensor(rng.normal(size=(B, n)))
    C = torch.ones(B, 1, n, dtype=torch.float64)
    c0 = -torch.ones(B, 1, dtype=torch.float64)
    sense = torch.tensor([0])
    lb, ub = np.zeros(n), np.full(n, np.inf)
    ours = solve_daqp(P, q, C, c0, sense, lb, ub)
    from torchdiffopt.backends.batched_quadratic import with_bound_rows
    ipm = solve_ipm(P, q, *with_bound_rows(C, c0, sense.numpy(), lb, ub))
    assert ours.status.tolist() == [OPTIMAL] * B
    torch.testing.assert_close(ours.x, ipm.x, atol=1e-8, rtol=0)
    torch.testing.assert_close(ours.mu, ipm.mu, atol=1e-7, rtol=0)


def test_daqp_leaves_members_with_non_finite_data_unsolved():
    data, _, _ = mixed_batch(np.random.default_rng(6))
    P, q, C, c0, sense = (t.clone() for t in data)
    q[0, 1] = float("nan")
    C[6, 0, 0] = float("inf")
    result = solve_daqp(P, q, C, c0, sense)
    assert result.status[0] == NOT_CONVERGED and result.status[6] == NOT_CONVERGED
    assert result.x[0].isnan().all() and result.status[7] == OPTIMAL
