"""The batched conic interior point of :mod:`torchdiffopt.solvers.conic_ipm`: known
solutions over zero, nonnegative and second-order cones (sizes out of order), agreement with
the LP/QP interior point and with SCS, per-member infeasibility and unboundedness, float32,
CUDA, and the conic layer with ``solver="ipm"`` against SCS and central differences.

Programs with a known solution pick ``x*``, ``s*`` and ``y*`` strictly complementary cone by
cone first (an inactive row or cone: ``s`` interior, ``y = 0``; an active one: ``s = 0``,
``y`` interior; a second-order cone on its boundary: ``s = α(1, û)``, ``y = β(1, −û)``), then
set ``b = A x* + s*`` and ``c = −P x* − Aᵀy*``: with ``P ≻ 0`` the solution ``x*`` is unique,
and with fewer active rows than variables it survives a perturbation of the data (float32).
"""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import torchdiffopt as tdo
from torchdiffopt.backends.conic import ConicDerivative
from torchdiffopt.backends.cones import ConeDims
from torchdiffopt.solvers.cone_program import conic_residuals
from torchdiffopt.solvers.conic_ipm import solve_conic_ipm, solve_ipm_conic
from torchdiffopt.solvers.ipm import solve_ipm
from torchdiffopt.solvers.scs_conic import solve_scs_conic

OPTIMAL, PRIMAL_INFEASIBLE, DUAL_INFEASIBLE = 0, 1, 2
CONES = {"z": 2, "l": 4, "q": [3, 5, 3, 4]}  # second-order cones of mixed sizes, unsorted


def known_programs(rng, B, n, cones):
    """B programs with the known, strictly complementary solution of the module docstring;
    returns ``(P, c, A, b)`` as float64 tensors and ``x*``."""
    dims = ConeDims.from_dict(cones)
    m = dims.size
    P = np.zeros((B, n, n))
    A = rng.normal(size=(B, m, n))
    x_star = rng.normal(size=(B, n))
    s, y = np.zeros((B, m)), np.zeros((B, m))
    for k in range(B):
        L = rng.normal(size=(n, n))
        P[k] = L @ L.T / n + 0.5 * np.eye(n)
        y[k, :dims.z] = rng.normal(size=dims.z)
        for i in range(dims.z, dims.z + dims.l):
            if rng.random() < 0.5:
                s[k, i] = rng.uniform(0.5, 2.0)
            else:
                y[k, i] = rng.uniform(0.5, 2.0)
        off = dims.z + dims.l
        for d, kind in zip(dims.q, ("slack", "dual", "boundary", "slack")):
            u = rng.normal(size=d - 1)
            if kind == "boundary":
                u_hat = u / np.linalg.norm(u)
                s[k, off:off + d] = rng.uniform(0.5, 2.0) * np.r_[1.0, u_hat]
                y[k, off:off + d] = rng.uniform(0.5, 2.0) * np.r_[1.0, -u_hat]
            else:
                inside = np.r_[np.linalg.norm(u) + rng.uniform(0.5, 1.0), u]
                (s if kind == "slack" else y)[k, off:off + d] = inside
            off += d
    b = np.einsum("bmn,bn->bm", A, x_star) + s
    c = -np.einsum("bij,bj->bi", P, x_star) - np.einsum("bmn,bm->bn", A, y)
    return tuple(torch.tensor(v) for v in (P, c, A, b)), x_star


def worst_residual(data, res, cones):
    P, c, A, b = (t.numpy() for t in data)
    return max(max(conic_residuals(A[k], b[k], c[k], cones, res.x[k].numpy(),
                                   res.y[k].numpy(), res.s[k].numpy(), P[k]).values())
               for k in range(len(c)))


def test_known_solutions_over_mixed_cones():
    """Residuals at the stopping tolerance; the point itself within 1e-5 of ``x*``, as an
    interior point's is here (Clarabel's too: its iterates near a cone's boundary trail the
    residuals), and one Newton refinement of the conic backend away from it to round-off."""
    data, x_star = known_programs(np.random.default_rng(0), 6, 12, CONES)
    res = solve_conic_ipm(*data, CONES)
    assert res.status.tolist() == [OPTIMAL] * 6
    assert worst_residual(data, res, CONES) <= 1e-9
    np.testing.assert_allclose(res.x.numpy(), x_star, atol=1e-5)
    P, c, A, b = (t.numpy() for t in data)
    for k in range(6):
        refined = ConicDerivative(A[k], b[k], c[k], CONES, res.x[k].numpy(), res.y[k].numpy(),
                                  res.s[k].numpy(), P[k])
        np.testing.assert_allclose(refined.x, x_star[k], atol=1e-12)


def test_matches_scs_on_each_member():
    data, _ = known_programs(np.random.default_rng(1), 4, 12, CONES)
    res = solve_conic_ipm(*data, CONES)
    P, c, A, b = (t.numpy() for t in data)
    for k in range(4):
        ref = solve_scs_conic(sp.csc_matrix(A[k]), b[k], c[k], CONES, sp.csc_matrix(P[k]))
        np.testing.assert_allclose(res.x[k].numpy(), ref.x, atol=1e-5)
        np.testing.assert_allclose(res.s[k].numpy(), ref.s, atol=1e-5)


def test_lp_agrees_with_the_qp_interior_point():
    """An LP over the nonnegative orthant is also a program of :func:`solve_ipm`:
    ``s = b − A x ≥ 0`` reads ``C x + c0 ≥ 0`` with ``C = −A``, ``c0 = b``; its multipliers
    are ``μ = −y``."""
    rng = np.random.default_rng(2)
    B, n, m = 5, 4, 9
    A = rng.normal(size=(B, m, n))
    b = (A @ rng.normal(size=(B, n, 1)))[..., 0] + rng.uniform(0.1, 1.0, size=(B, m))
    c = -np.einsum("bmn,bm->bn", A, rng.uniform(0.1, 1.0, size=(B, m)))  # dual feasible
    P = np.zeros((B, n, n))
    res = solve_conic_ipm(*(torch.tensor(v) for v in (P, c, A, b)), {"l": m})
    ref = solve_ipm(*(torch.tensor(v) for v in (P, c, -A, b)), torch.ones(m))
    assert res.status.tolist() == ref.status.tolist() == [OPTIMAL] * B
    np.testing.assert_allclose(res.x.numpy(), ref.x.numpy(), atol=1e-7)
    np.testing.assert_allclose(res.y.numpy(), -ref.mu.numpy(), atol=1e-7)


def test_infeasible_and_unbounded_members_keep_the_others():
    """Variables (t, x₁, x₂) with (t, x) in a second-order cone and one equality row:
    x₁ = 1 with min t (optimal, t* = 1), t = −1 (infeasible), x₁ = 1 with min −t
    (unbounded)."""
    A = torch.zeros(3, 4, 3, dtype=torch.float64)
    A[:, 1:] = -torch.eye(3, dtype=torch.float64)  # s = (t, x) ∈ Q³
    A[0, 0, 1] = A[2, 0, 1] = 1.0
    A[1, 0, 0] = 1.0
    b = torch.zeros(3, 4, dtype=torch.float64)
    b[:, 0] = torch.tensor([1.0, -1.0, 1.0])
    c = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [-1.0, 0, 0]], dtype=torch.float64)
    res = solve_conic_ipm(torch.zeros(3, 3, 3, dtype=torch.float64), c, A, b, {"z": 1, "q": [3]})
    assert res.status.tolist() == [OPTIMAL, PRIMAL_INFEASIBLE, DUAL_INFEASIBLE]
    np.testing.assert_allclose(res.x[0].numpy(), [1.0, 1.0, 0.0], atol=1e-8)
    assert torch.isnan(res.x[1:]).all()


def test_float32_input_and_the_single_program_adapter():
    data, x_star = known_programs(np.random.default_rng(3), 2, 12, CONES)
    res = solve_conic_ipm(*(t.float() for t in data), CONES)
    assert res.status.tolist() == [OPTIMAL] * 2
    np.testing.assert_allclose(res.x.numpy(), x_star, atol=1e-4)
    P, c, A, b = (t[0].numpy() for t in data)
    sol = solve_ipm_conic(sp.csc_matrix(A), b, c, CONES, sp.csc_matrix(P))
    np.testing.assert_allclose(sol.x, x_star[0], atol=1e-5)
    with pytest.raises(ValueError, match="second-order cones only"):
        solve_conic_ipm(*data, {"z": 2, "l": 4, "s": [3], "q": [3, 4]})
    with pytest.raises(tdo.InfeasibleError, match="interior point"):
        # x ≤ −1 and x ≥ 1
        solve_ipm_conic(np.array([[1.0], [-1.0]]), np.array([-1.0, -1.0]), np.array([1.0]),
                        {"l": 2})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    data, _ = known_programs(np.random.default_rng(4), 8, 12, CONES)
    cpu = solve_conic_ipm(*data, CONES)
    gpu = solve_conic_ipm(*(t.cuda() for t in data), CONES)
    assert gpu.x.is_cuda and gpu.status.tolist() == cpu.status.tolist()
    np.testing.assert_allclose(gpu.x.cpu().numpy(), cpu.x.numpy(), atol=1e-8)


def portfolio_layer(solver, assets=8, seed=0):
    """``max μᵀw − ½γ‖w‖²  s.t.  ‖S w‖ ≤ σ, 1ᵀw = 1, w ≥ 0`` with the returns μ a batched
    parameter (W4's model with a small ridge, so that the solution map is smooth)."""
    rng = np.random.default_rng(seed)
    S = np.vstack((0.1 * rng.normal(size=(3, assets)), np.diag(rng.uniform(0.05, 0.2, assets))))
    m = tdo.Model(solver=solver, backend="conic")
    w = m.variable(assets, lb=0.0, name="w")
    mu = m.parameter(np.zeros(assets), name="mu")
    m.constraint(tdo.norm2(S @ w) <= 0.1)
    m.constraint(w.sum() == 1)
    m.maximize(mu @ w - 0.05 * tdo.sum_squares(w))
    return tdo.Layer(m, parameters=[mu], outputs=w)


@pytest.fixture
def no_scs_retry(monkeypatch):
    """Makes SCS unavailable to the conic layer's retry of members the interior point gave
    up on: a test that passes with it ran on the interior point alone."""
    import torchdiffopt.conic_function as cf

    def refuse(*args, **kwargs):
        raise AssertionError("the SCS retry ran")
    monkeypatch.setattr(cf, "solve_scs_conic", refuse)


def test_layer_with_the_interior_point_matches_scs_and_finite_differences(no_scs_retry):
    mu = torch.tensor(np.random.default_rng(5).normal(0.05, 0.1, size=(6, 8)))
    ipm, scs = portfolio_layer("ipm"), portfolio_layer("scs")
    weights = torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    grads = []
    for layer in (ipm, scs):
        leaf = mu.clone().requires_grad_()
        out = layer(leaf)
        (out * weights).sum().backward()
        grads.append((out.detach(), leaf.grad))
    assert ipm.last_status == ["optimal"] * 6
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-9, rtol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-7, rtol=0)
    v = torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    h = 1e-6
    with torch.no_grad():
        fd = ((ipm(mu + h * v) - ipm(mu - h * v)) * weights).sum() / (2 * h)
    assert abs(float((grads[0][1] * v).sum() - fd)) <= 1e-6 * max(1.0, abs(float(fd)))


def test_members_the_interior_point_gives_up_on_go_to_scs():
    """Two iterations are not enough: every member comes back "not converged" from the
    interior point, is solved again by SCS, and the layer returns SCS's answer."""
    import torchdiffopt.conic_function as cf

    mu = torch.tensor(np.random.default_rng(9).normal(0.05, 0.1, size=(3, 8)))
    m_short = portfolio_layer("ipm")
    m_short.structure.solver_options["max_iter"] = 2
    calls = []
    scs = cf.solve_scs_conic

    def counted(*args, **kwargs):
        calls.append(1)
        return scs(*args, **kwargs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cf, "solve_scs_conic", counted)
        out = m_short(mu)
    assert len(calls) == 3 and m_short.last_status == ["optimal"] * 3
    torch.testing.assert_close(out, portfolio_layer("scs")(mu), atol=1e-9, rtol=0)


def test_unsupported_programs_are_refused_when_the_layer_is_built():
    m = tdo.Model(solver="ipm", backend="conic")
    x = m.variable(2, name="x")
    m.constraint(tdo.PSD(np.eye(2) + x[0] * np.diag([1.0, -1.0])))
    m.minimize(x.sum())
    with pytest.raises(ValueError, match="second-order cones only"):
        tdo.Layer(m, parameters=[], outputs=x)
    with pytest.raises(ValueError, match="unknown option"):
        tdo.functional.conic(torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64),
                             torch.ones(2, dtype=torch.float64), {"l": 2}, solver="ipm",
                             solver_options={"eps_abs": 1e-9})


def test_layer_with_the_interior_point_reports_failed_members(no_scs_retry):
    """A radius below zero empties ‖x‖ ≤ r for that member alone."""
    m = tdo.Model(solver="ipm", backend="conic")
    x = m.variable(3, name="x")
    r = m.parameter(1.0, name="r")
    c = m.parameter(np.ones(3), name="c")
    m.constraint(tdo.norm2(x) <= r)
    m.maximize(c @ x)
    layer = tdo.Layer(m, parameters=[r, c], outputs=x, on_failure="nan")
    R = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    C = torch.tensor([[1.0, 2.0, 2.0], [0.5, 0.0, 1.0], [0.0, 3.0, 4.0]], dtype=torch.float64)
    out = layer(R, C)
    assert layer.last_status == ["optimal", "infeasible", "optimal"]
    torch.testing.assert_close(out[[0, 2]], R[[0, 2], None] * C[[0, 2]]
                               / C[[0, 2]].norm(dim=1, keepdim=True))
    assert torch.isnan(out[1]).all()


def test_functional_conic_with_the_interior_point(no_scs_retry):
    """``functional.conic(..., solver="ipm")``: SCS's answer and gradients on a batch, and a
    named error for the member that has no solution."""
    data, _ = known_programs(np.random.default_rng(8), 3, 12, CONES)
    P, c, A, b = data
    c = c.clone().requires_grad_()
    outs = []
    for solver in ("ipm", "scs"):
        x = tdo.functional.conic(A, b, c, CONES, P=P, solver=solver)
        (grad,) = torch.autograd.grad(x.square().sum(), c)
        outs.append((x.detach(), grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-9, rtol=0)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-7, rtol=0)
    # member 1: the first two nonnegative rows read a x ≤ −1 and −a x ≤ −1
    A_bad, bad = A.clone(), b.clone()
    A_bad[1, 3] = -A_bad[1, 2]
    bad[1, 2:4] = -1.0
    with pytest.raises(tdo.InfeasibleError, match="batch member 1"):
        tdo.functional.conic(A_bad, bad, c.detach(), CONES, P=P, solver="ipm")


def test_the_interior_point_stops_at_scs_tolerance_before_refinement(monkeypatch, no_scs_retry):
    """Where Newton refinement follows (the default), the batched interior point stops at
    ``IPM_TOL_BEFORE_REFINEMENT``; without refinement it keeps its own 1e-10; a ``tol`` given
    in ``solver_options`` wins. The refined answer matches SCS's to 1e-9."""
    import torchdiffopt.conic_function as cf
    from torchdiffopt.solvers import BATCHED_CONIC_SOLVERS

    seen = []

    def recording(*args, **options):
        seen.append(options.get("tol"))
        return solve_conic_ipm(*args, **options)
    monkeypatch.setitem(BATCHED_CONIC_SOLVERS, solve_ipm_conic, recording)
    (P, c, A, b), _ = known_programs(np.random.default_rng(9), 3, 12, CONES)
    reference = tdo.functional.conic(A, b, c, CONES, P=P, solver="scs")
    refined = tdo.functional.conic(A, b, c, CONES, P=P, solver="ipm")
    tdo.functional.conic(A, b, c, CONES, P=P, solver="ipm", refine=False)
    tdo.functional.conic(A, b, c, CONES, P=P, solver="ipm", solver_options={"tol": 1e-11})
    assert seen == [cf.IPM_TOL_BEFORE_REFINEMENT, None, 1e-11]
    assert cf.IPM_TOL_BEFORE_REFINEMENT == 1e-9
    torch.testing.assert_close(refined, reference, atol=1e-9, rtol=0)
