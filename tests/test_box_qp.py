"""The bound-constrained active-set method (torchdiffopt.solvers.box_qp) and its place in
``solver="auto"``: exact solutions built from their optimality conditions, agreement with
DAQP, the members it gives up on, and derivatives through the layer."""

import types

import numpy as np
import pytest
import torch

import torchdiffopt as tdo
import torchdiffopt.qp_function as qp_function
from torchdiffopt.backends.quadratic import bound_rows
from torchdiffopt.solvers.box_qp import solve_box_qp
from torchdiffopt.solvers.daqp import solve_daqp
from torchdiffopt.solvers.ipm import NOT_CONVERGED, OPTIMAL

F64 = torch.float64


def built_from_conditions(rng, B, n):
    """Members with a known solution: bounds (some one-sided, some fixed, some absent), a
    point ``x*`` with variables at each kind of bound and free ones, a reduced gradient
    ``z*`` that is zero on the free variables and of the right sign at the bounds, and
    ``q = z* − P x*``. Returns ``P, q, lb, ub, x*, z*``."""
    lb = np.where(rng.random(n) < 0.8, -rng.random(n), -np.inf)
    ub = np.where(rng.random(n) < 0.8, rng.random(n), np.inf)
    lb[0] = ub[0] = 0.3  # a fixed variable
    lb[1], ub[1] = -np.inf, np.inf  # a free one
    x = np.empty((B, n))
    z = np.zeros((B, n))
    for b in range(B):
        where = rng.integers(0, 3, n)  # 0 free, 1 at lb, 2 at ub
        where[1] = 0
        where[np.isinf(lb) & (where == 1)] = 0
        where[np.isinf(ub) & (where == 2)] = 0
        with np.errstate(invalid="ignore"):  # inf - inf where both bounds are absent
            inner = np.select([np.isfinite(lb) & np.isfinite(ub), np.isfinite(lb),
                               np.isfinite(ub)], [0.5 * (lb + ub), lb + 0.5, ub - 0.5], 0.1)
        x[b] = np.where(where == 1, lb, np.where(where == 2, ub, inner))
        z[b] = np.where(where == 1, 0.1 + rng.random(n), np.where(where == 2,
                                                                  -0.1 - rng.random(n), 0.0))
        x[b, 0], z[b, 0] = 0.3, rng.normal()
    M = rng.normal(size=(B, n, n))
    P = M @ M.transpose(0, 2, 1) + 0.1 * np.eye(n)
    q = z - np.einsum("bij,bj->bi", P, x)
    return (torch.tensor(P), torch.tensor(q), lb, ub, torch.tensor(x), torch.tensor(z))


def test_solutions_built_from_their_optimality_conditions(rng):
    P, q, lb, ub, x_star, z_star = built_from_conditions(rng, 6, 12)
    result = solve_box_qp(P, q, lb, ub)
    assert result.status.tolist() == [OPTIMAL] * 6
    torch.testing.assert_close(result.x, x_star, rtol=0, atol=1e-10)
    # μ = −z* on the rows at which a variable is held (fixed, lower, upper), zero elsewhere
    cols, _, sense = bound_rows(lb, ub)
    z_rows = z_star[:, cols]
    at_bound = torch.isclose(x_star[:, cols], torch.tensor(np.where(
        sense > 0, lb[cols], ub[cols])).expand_as(z_rows), rtol=0, atol=1e-14)
    held = torch.tensor(sense == 0) | (at_bound & (z_rows != 0))
    torch.testing.assert_close(result.active, held)
    torch.testing.assert_close(result.mu, torch.where(held, -z_rows, 0.0), rtol=0, atol=1e-9)


def test_agrees_with_daqp_on_non_negative_least_squares(rng):
    B, rows, n = 8, 40, 25
    A = torch.tensor(rng.normal(size=(B, rows, n)))
    b = torch.tensor(rng.normal(size=(B, rows)))
    P, q = A.mT @ A, -(A.mT @ b.unsqueeze(-1)).squeeze(-1)
    lb, ub = np.zeros(n), np.full(n, np.inf)
    box = solve_box_qp(P, q, lb, ub)
    daqp = solve_daqp(P, q, torch.zeros(B, 0, n, dtype=F64), torch.zeros(B, 0, dtype=F64),
                      torch.zeros(0, dtype=torch.int64), lb, ub)
    assert box.status.tolist() == daqp.status.tolist() == [OPTIMAL] * B
    assert bool((box.active == daqp.active).all())
    assert int(box.active.sum()) > B  # the bounds matter
    torch.testing.assert_close(box.x, daqp.x, rtol=0, atol=1e-9)
    torch.testing.assert_close(box.mu, daqp.mu, rtol=0, atol=1e-8)


def test_a_singular_objective_is_no_obstacle_while_the_free_block_is_definite(rng):
    """``P = diag(M Mᵀ + I, 0)``: the last 5 variables have no curvature and a positive
    cost, so they stay at their lower bound 0. The first solve holds every bounded variable,
    so the singular part of ``P`` is never factored; the answer is the box-clipped solution
    of the definite block, checked on its optimality conditions."""
    M = rng.normal(size=(6, 6))
    P = torch.zeros(1, 11, 11, dtype=F64)
    P[0, :6, :6] = torch.tensor(M @ M.T + np.eye(6))
    q = torch.tensor(np.r_[rng.normal(size=6), 0.5 + rng.random(5)]).reshape(1, 11)
    result = solve_box_qp(P, q, np.zeros(11), np.full(11, np.inf))
    assert result.status.tolist() == [OPTIMAL]
    x = result.x[0]
    z = P[0] @ x + q[0]
    free = x > 0
    assert bool(free.any()) and float(x.min()) >= 0 and float(z[free].abs().max()) <= 1e-12
    assert float(z[~free].min()) >= 0 and bool((x[6:] == 0).all())


def test_members_it_gives_up_on_keep_the_others(rng):
    """An LP member (P = 0: no definite block), a non-finite one and a good one: the first
    two are reported not converged with NaN, the third solved; ``lb > ub`` gives up on all."""
    P, q, lb, ub, x_star, _ = built_from_conditions(rng, 3, 8)
    P[0] = 0.0
    q[1, 2] = torch.nan
    result = solve_box_qp(P, q, lb, ub)
    assert result.status.tolist() == [NOT_CONVERGED, NOT_CONVERGED, OPTIMAL]
    assert bool(result.x[:2].isnan().all()) and bool(result.mu[:2].isnan().all())
    torch.testing.assert_close(result.x[2], x_star[2], rtol=0, atol=1e-10)
    lb_crossed, ub_crossed = lb.copy(), ub.copy()
    lb_crossed[3], ub_crossed[3] = 1.0, 0.0
    assert solve_box_qp(P, q, lb_crossed, ub_crossed).status.tolist() == [NOT_CONVERGED] * 3


def test_cycling_members_stop_at_the_iteration_limit(rng):
    P, q, lb, ub, _, _ = built_from_conditions(rng, 2, 10)
    result = solve_box_qp(P, q, lb, ub, max_iter=1)
    settled = result.status == OPTIMAL
    assert result.iterations.tolist() == [1, 1]
    assert bool(result.x[~settled].isnan().all())


def test_float32(rng):
    P, q, lb, ub, x_star, _ = built_from_conditions(rng, 4, 6)
    result = solve_box_qp(P.float(), q.float(), lb, ub)
    assert result.x.dtype == torch.float32
    assert result.status.tolist() == [OPTIMAL] * 4
    torch.testing.assert_close(result.x, x_star.float(), rtol=0, atol=1e-4)
    # a free block of condition 1e8 is beyond float32 (its pivot ratio², 1e-8, is below
    # 1e4 ε): given up, not reported optimal; float64 solves it
    V, _ = torch.linalg.qr(torch.tensor(rng.normal(size=(20, 20))))
    ill = (V * torch.logspace(0, -8, 20, dtype=F64)) @ V.T
    free = np.full(20, -np.inf), np.full(20, np.inf)
    q1 = torch.tensor(rng.normal(size=(1, 20)))
    assert solve_box_qp(ill[None].float(), q1.float(), *free).status.tolist() == [NOT_CONVERGED]
    assert solve_box_qp(ill[None], q1, *free).status.tolist() == [OPTIMAL]


def test_an_empty_batch():
    result = solve_box_qp(torch.zeros(0, 3, 3, dtype=F64), torch.zeros(0, 3, dtype=F64),
                          np.zeros(3), np.ones(3))
    assert result.x.shape == (0, 3) and result.mu.shape == (0, 6) and result.status.numel() == 0


def test_auto_routes_bound_only_qps_by_size_and_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    small = types.SimpleNamespace(n=qp_function.BOX_QP_MIN_VARIABLES - 1, m=0)
    large = types.SimpleNamespace(n=qp_function.BOX_QP_MIN_VARIABLES, m=0)
    rows = types.SimpleNamespace(n=qp_function.BOX_QP_MIN_VARIABLES, m=3)
    assert qp_function._batch_solver("auto", cpu, small) == "daqp"
    assert qp_function._batch_solver("auto", cpu, large) == "box"
    assert qp_function._batch_solver(None, cpu, rows) == "daqp"
    assert qp_function._batch_solver("auto", cuda, small) == "box"
    assert qp_function._batch_solver("auto", cuda, rows) == "ipm"
    assert qp_function._batch_solver("daqp", cpu, large) == "daqp"


@pytest.fixture
def box_everywhere(monkeypatch):
    """``solver="auto"`` takes the box method at every size; counts its calls."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return solve_box_qp(*args, **kwargs)

    monkeypatch.setattr(qp_function, "BOX_QP_MIN_VARIABLES", 0)
    monkeypatch.setattr(qp_function, "solve_box_qp", counted)
    return calls


def test_layer_gradients_against_central_differences(rng, box_everywhere):
    """Non-negative least squares through ``functional.qp``: the reverse-mode gradient with
    respect to ``b`` along random directions against central differences."""
    rows, n = 30, 12
    A = torch.tensor(rng.normal(size=(rows, n)))
    b = torch.tensor(rng.normal(size=(2, rows)), requires_grad=True)
    w = torch.tensor(rng.normal(size=(2, n)))
    lb = np.zeros(n)

    def solve(b):
        return tdo.functional.qp(A.T @ A, -b @ A, lb=lb)

    x = solve(b)
    assert box_everywhere and int((x.detach() == 0).sum()) >= 2
    (grad,) = torch.autograd.grad((w * x).sum(), b)
    for _ in range(3):
        v = torch.tensor(rng.normal(size=b.shape))
        with torch.no_grad():
            fd = ((w * solve(b + 1e-6 * v)).sum() - (w * solve(b - 1e-6 * v)).sum()) / 2e-6
        assert abs(float((grad * v).sum()) - float(fd)) <= 1e-6 * max(1.0, abs(float(fd)))


def test_layer_hands_the_members_given_up_to_daqp(rng, box_everywhere):
    """An LP member with box bounds (P = 0) is solved by DAQP after the box method gives it
    up; a convex member next to it keeps the box method's answer."""
    n = 6
    P = torch.zeros(2, n, n, dtype=F64)
    P[1] = torch.eye(n, dtype=F64)
    q = torch.tensor(rng.normal(size=(2, n)))
    lb, ub = -np.ones(n), np.ones(n)
    x = tdo.functional.qp(P, q, lb=lb, ub=ub)
    assert len(box_everywhere) == 1
    torch.testing.assert_close(x[0], -torch.sign(q[0]), rtol=0, atol=1e-9)
    torch.testing.assert_close(x[1], (-q[1]).clamp(-1.0, 1.0), rtol=0, atol=1e-12)


def test_layer_reports_crossed_bounds_as_infeasible(box_everywhere):
    lb, ub = np.array([0.0, 1.0]), np.array([1.0, 0.0])
    x = tdo.functional.qp(torch.eye(2, dtype=F64).expand(3, 2, 2), torch.zeros(3, 2,
                          dtype=F64), lb=lb, ub=ub, on_failure="nan")
    assert bool(x.isnan().all())
    with pytest.raises(tdo.InfeasibleError):
        tdo.functional.qp(torch.eye(2, dtype=F64), torch.zeros(2, dtype=F64), lb=lb, ub=ub)
    # bounds no value meets: x_0 ≥ +∞, and x_1 ≤ −∞
    for lb, ub in ((np.array([np.inf, 0.0]), np.array([np.inf, 1.0])),
                   (np.array([0.0, -np.inf]), np.array([1.0, -np.inf]))):
        assert solve_box_qp(torch.eye(2, dtype=F64)[None], torch.zeros(1, 2, dtype=F64),
                            lb, ub).status.tolist() == [NOT_CONVERGED]
        with pytest.raises(tdo.InfeasibleError):
            tdo.functional.qp(torch.eye(2, dtype=F64), torch.zeros(2, dtype=F64), lb=lb, ub=ub)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(rng):
    P, q, lb, ub, x_star, _ = built_from_conditions(rng, 16, 20)
    result = solve_box_qp(P.cuda(), q.cuda(), lb, ub)
    assert result.x.is_cuda and result.status.tolist() == [OPTIMAL] * 16
    torch.testing.assert_close(result.x.cpu(), x_star, rtol=0, atol=1e-10)
