"""tdo.functional.qp: raw batched data, against qpth and closed forms."""

import numpy as np
import pytest
import torch

import torchdiffopt as tdo

F64 = torch.float64


def optnet_qp(B, n, m, seed):
    """qpth's generator: Q = LLᵀ + 1e-3·I, G ~ N(0, 1), h = G z₀ + s₀ (strictly feasible)."""
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(B, n, n, generator=g, dtype=F64)
    Q = L @ L.transpose(1, 2) + 1e-3 * torch.eye(n, dtype=F64)
    p = torch.randn(B, n, generator=g, dtype=F64)
    G = torch.randn(B, m, n, generator=g, dtype=F64)
    z0 = torch.randn(B, n, generator=g, dtype=F64)
    s0 = torch.rand(B, m, generator=g, dtype=F64)
    h = (G @ z0.unsqueeze(-1)).squeeze(-1) + s0
    return Q, p, G, h


def test_matches_qpth_values_and_gradients_per_element():
    from qpth.qp import QPFunction

    Q, p, G, h = (t.requires_grad_() for t in optnet_qp(4, 6, 8, seed=0))
    x = tdo.functional.qp(Q, p, G=G, h=h)
    w = torch.randn_like(x)
    ours = torch.autograd.grad((w * x).sum(), (Q, p, G, h))

    Q2, p2, G2, h2 = (t.detach().clone().requires_grad_() for t in (Q, p, G, h))
    e = torch.empty(0, dtype=F64)
    x_qpth = QPFunction(verbose=-1, eps=1e-12, maxIter=50)(Q2, p2, G2, h2, e, e)
    theirs = torch.autograd.grad((w * x_qpth).sum(), (Q2, p2, G2, h2))
    torch.testing.assert_close(x, x_qpth, atol=1e-6, rtol=1e-6)
    for a, b in zip(ours, theirs):
        # qpth's gradient is itself accurate to ~1e-6 (interior point, not polished)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_lp_and_duals_and_closed_form():
    # min -x0 - x1  s.t.  x0 + x1 = b,  x0 <= h0, x1 <= h1 (h0 + h1 > b): a 1-D face → use
    # costs (-2, -1): x0 = h0, x1 = b - h0
    b = torch.tensor([3.0], dtype=F64, requires_grad=True)
    h = torch.tensor([2.0, 5.0], dtype=F64, requires_grad=True)
    q = torch.tensor([-2.0, -1.0], dtype=F64, requires_grad=True)
    P = torch.zeros(2, 2, dtype=F64)
    A = torch.ones(1, 2, dtype=F64)
    G = torch.eye(2, dtype=F64)
    x, nu, lam = tdo.functional.qp(P, q, A, b, G, h, return_duals=True)
    torch.testing.assert_close(x, torch.tensor([2.0, 1.0], dtype=F64))
    # stationarity q + Aᵀν + Gᵀλ = 0 with λ ≥ 0: ν = 1, λ = (1, 0)
    torch.testing.assert_close(nu, torch.tensor([1.0], dtype=F64))
    torch.testing.assert_close(lam, torch.tensor([1.0, 0.0], dtype=F64))
    f = (q * x).sum()
    g_b, g_h = torch.autograd.grad(f, (b, h))
    # shadow prices: ∂f*/∂b = -ν, ∂f*/∂h = -λ
    torch.testing.assert_close(g_b, -nu.detach())
    torch.testing.assert_close(g_h, -lam.detach())


def test_broadcast_inputs_sum_gradients():
    Q, p, G, h = optnet_qp(3, 4, 5, seed=1)
    G1 = G[0].clone().requires_grad_()
    x = tdo.functional.qp(Q, p, G=G1, h=h)
    (g_batch,) = torch.autograd.grad(x.sum(), G1)
    total = torch.zeros_like(G1)
    for b in range(3):
        Gb = G[0].clone().requires_grad_()
        xb = tdo.functional.qp(Q[b], p[b], G=Gb, h=h[b])
        total += torch.autograd.grad(xb.sum(), Gb)[0]
    torch.testing.assert_close(g_batch, total)


def test_bad_inputs():
    Q, p, G, h = optnet_qp(2, 3, 4, seed=2)
    with pytest.raises(ValueError, match="batch size mismatch"):
        tdo.functional.qp(Q, p[:1].expand(3, -1), G=G, h=h)
    with pytest.raises(ValueError, match="'h' contains NaN"):
        tdo.functional.qp(Q, p, G=G, h=torch.full_like(h, float("nan")))
    with pytest.raises(ValueError, match="inconsistent shapes"):
        tdo.functional.qp(Q, p, G=G, h=h[:, :2])
    G_inf = torch.cat((G, -G), dim=1)
    h_inf = torch.cat((h, torch.full_like(h, 100.0)), dim=1)
    h_inf[1] = -10.0  # member 1: G x <= -10 and -G x <= -10, infeasible
    with pytest.raises(tdo.SolverError, match=r"batch members \[1\]"):
        tdo.functional.qp(Q, p, G=G_inf, h=h_inf)
    x = tdo.functional.qp(Q, p, G=G_inf, h=h_inf, on_failure="nan")
    assert torch.isnan(x[1]).all() and torch.isfinite(x[0]).all()


@pytest.mark.parametrize("B, solver", [(4, "auto"), (40, "auto"), (40, "ipm"), (40, "daqp"),
                                       (4, "highs"), (4, "qpth")])
def test_convexity_is_judged_per_member(B, solver):
    """Eigenvalues set by construction, P = V diag(λ) Vᵀ: an indefinite member fails as
    nonconvex and loses nothing else; a singular PSD one (λ_min = 0, or -1e-13 ‖P‖ from
    rounding) is convex, though not strictly convex as qpth needs."""
    Q, p, G, h = optnet_qp(B, 4, 6, seed=5)
    gen = torch.Generator().manual_seed(1)
    V, _ = torch.linalg.qr(torch.randn(4, 4, dtype=F64, generator=gen))

    def with_eigenvalues(*lam):
        return V @ torch.diag(torch.tensor(lam, dtype=F64)) @ V.T
    Q = Q.clone()
    Q[0] = with_eigenvalues(3.0, 2.0, 1.0, -0.5)      # indefinite
    Q[1] = with_eigenvalues(3.0, 2.0, 1.0, 0.0)       # PSD, singular
    Q[2] = with_eigenvalues(3.0, 2.0, 1.0, -3e-13)    # PSD up to rounding
    G = torch.cat((G, torch.eye(4, dtype=F64).expand(B, -1, -1),
                   -torch.eye(4, dtype=F64).expand(B, -1, -1)), 1)
    h = torch.cat((h, torch.full((B, 8), 10.0, dtype=F64)), 1)  # a box: bounded
    with pytest.raises(tdo.NonconvexError, match=r"\[0\] nonconvex"):
        tdo.functional.qp(Q, p, G=G, h=h, solver=solver)
    x = tdo.functional.qp(Q, p, G=G, h=h, solver=solver, on_failure="nan")
    assert torch.isnan(x[0]).all()
    strict_only = solver == "qpth"
    assert torch.isnan(x[1]).all() == strict_only and torch.isnan(x[2]).all() == strict_only
    assert torch.isfinite(x[3:]).all()


def test_second_derivatives_are_refused_not_wrong():
    """The layer's derivatives hold the KKT factorization constant: exact to first order
    only. A Hessian through it would miss terms, so nested transforms raise; one transform
    (also under vmap) still works."""
    Q, p, G, h = optnet_qp(1, 3, 4, seed=3)
    Q, p, G, h = Q[0], p[0], G[0], h[0]
    f = lambda Q_: tdo.functional.qp(Q_, p, G=G, h=h).sum()  # noqa: E731
    for nested in (torch.func.hessian, lambda g: torch.func.grad(torch.func.grad(g))):
        with pytest.raises(NotImplementedError, match="second derivatives"):
            nested(f)(Q)
    assert torch.func.grad(f)(Q).shape == Q.shape
    Q2 = torch.stack((Q, Q + 0.1 * torch.eye(3, dtype=F64)))
    per_sample = torch.func.vmap(torch.func.grad(f))(Q2)
    assert torch.allclose(per_sample[1], torch.func.grad(f)(Q2[1]), atol=1e-12)
    A, b, c = torch.eye(2, dtype=F64), torch.ones(2, dtype=F64), -torch.ones(2, dtype=F64)
    g = lambda b_: tdo.functional.conic(A, b_, c, {"l": 2}).sum()  # noqa: E731
    with pytest.raises(NotImplementedError, match="second derivatives"):
        torch.func.hessian(g)(b)


def _central_difference(f, x, dx, eps=1e-6):
    return (f(x + eps * dx) - f(x - eps * dx)) / (2 * eps)


#: derivative transforms composed with vmap, each as (name, batched derivative of
#: f(Q, p) → x*, the same for one member)
_VMAPPED_DERIVATIVES = {
    # per-sample gradients: the vmap outside folds its members into one solve
    "vmap(grad)": (lambda f: torch.func.vmap(torch.func.grad(lambda Q, p: f(Q, p).sum())),
                   lambda f: torch.func.grad(lambda Q, p: f(Q, p).sum())),
    "vmap(jacrev)": (lambda f: torch.func.vmap(torch.func.jacrev(f)), torch.func.jacrev),
    "vmap(jacfwd)": (lambda f: torch.func.vmap(torch.func.jacfwd(f)), torch.func.jacfwd),
}


@pytest.mark.parametrize("name", sorted(_VMAPPED_DERIVATIVES))
def test_derivatives_under_vmap_are_each_members_own(name):
    """vmap(grad(f)) and its kin fold the vmapped members into one solve; each slice's
    derivative must be its own member's, as computed member by member (the derivative
    used to combine every member's, silently), and match central differences."""
    Q, p, G, h = optnet_qp(3, 4, 6, seed=5)
    f = lambda Q_, p_: tdo.functional.qp(Q_, p_, G=G[0], h=h[0])  # noqa: E731
    batched, single = _VMAPPED_DERIVATIVES[name]
    got = batched(f)(Q, p)
    for i in range(3):
        assert torch.allclose(got[i], single(f)(Q[i], p[i]), atol=1e-10), i
    # p's derivative (argnums 0 is Q): central differences of member 2 along dQ
    dQ = torch.randn(4, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    dQ = dQ + dQ.T
    fd = _central_difference(lambda Q_: f(Q_, p[2]), Q[2], dQ)
    if name == "vmap(grad)":
        assert torch.allclose((got[2] * dQ).sum(), fd.sum(), atol=1e-6)
    else:
        assert torch.allclose((got[2] * dQ).sum((-2, -1)), fd, atol=1e-6)


def test_nested_vmaps_and_vmap_inside_derivatives():
    """Two folded vmaps over grad, and jacrev / jacfwd of a vmapped solve (the fold inside
    the derivative: the Jacobian is block diagonal over the members)."""
    Q, p, G, h = optnet_qp(2, 3, 4, seed=3)
    f = lambda Q_, p_: tdo.functional.qp(Q_, p_, G=G[0], h=h[0])  # noqa: E731
    g = torch.func.grad(lambda Q_, p_: f(Q_, p_).sum())
    scales = torch.tensor([1.0, 1.1, 1.2], dtype=F64)[:, None, None, None]
    twice = torch.func.vmap(torch.func.vmap(g))(Q * scales, p.expand(3, -1, -1))
    for s in range(3):
        for i in range(2):
            assert torch.allclose(twice[s, i], g(Q[i] * scales[s, 0], p[i]), atol=1e-10)
    for jac in (torch.func.jacrev, torch.func.jacfwd):
        J = jac(lambda Q_: torch.func.vmap(f)(Q_, p))(Q)          # (2, 3, 2, 3, 3)
        for i in range(2):
            assert torch.allclose(J[i, :, i], jac(f)(Q[i], p[i]), atol=1e-10)
            assert float(J[i, :, 1 - i].abs().max()) == 0.0


def test_fixed_seeds_inside_vmap_and_vmap_over_grads_after_it():
    """A cotangent or tangent that the vmap does not batch (the same for every member), and
    a vmap over torch.autograd.grad of a forward whose own vmap has ended (its seeds span
    every member: they must not be folded again)."""
    Q, p, G, h = optnet_qp(2, 3, 4, seed=3)
    f = lambda Q_, p_: tdo.functional.qp(Q_, p_, G=G[0], h=h[0])  # noqa: E731
    w = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    got = torch.func.vmap(lambda Q_, p_: torch.func.vjp(lambda q: f(Q_, q), p_)[1](w)[0])(Q, p)
    for i in range(2):
        assert torch.allclose(got[i], torch.func.vjp(lambda q: f(Q[i], q), p[i])[1](w)[0])
    got = torch.func.vmap(lambda Q_, p_: torch.func.jvp(lambda q: f(Q_, q), (p_,), (w,))[1])(Q, p)
    for i in range(2):
        assert torch.allclose(got[i], torch.func.jvp(lambda q: f(Q[i], q), (p[i],), (w,))[1])
    leaf = p.clone().requires_grad_()
    x = torch.func.vmap(f)(Q, leaf)
    E = torch.randn(4, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    got = torch.func.vmap(lambda e: torch.autograd.grad(x, leaf, e, retain_graph=True)[0])(E)
    for k in range(4):
        assert torch.allclose(got[k], torch.autograd.grad(x, leaf, E[k], retain_graph=True)[0])


def test_empty_batch():
    Q, p, G, h = (t[:0].requires_grad_() for t in optnet_qp(1, 3, 4, seed=3))
    x = tdo.functional.qp(Q, p, G=G, h=h)
    assert x.shape == (0, 3)
    x.sum().backward()
    assert Q.grad.shape == (0, 3, 3) and p.grad.shape == (0, 3)


def test_conic_derivatives_under_vmap_are_each_members_own():
    A, c = torch.eye(2, dtype=F64), -torch.ones(2, dtype=F64)
    b = torch.tensor([[1.0, 2.0], [3.0, 0.5]], dtype=F64)
    f = lambda b_: tdo.functional.conic(A, b_, c, {"l": 2}) ** 2  # noqa: E731
    g = torch.func.grad(lambda b_: f(b_).sum())
    assert torch.allclose(torch.func.vmap(g)(b), torch.stack([g(row) for row in b]))
    assert torch.allclose(torch.func.vmap(torch.func.jacfwd(f))(b),
                          torch.stack([torch.func.jacfwd(f)(row) for row in b]))
    assert torch.allclose(torch.func.vmap(g)(b)[1], 2 * b[1])  # x* = b: ∂Σx²/∂b = 2b
    db = torch.tensor([1.0, -2.0], dtype=F64)  # a tangent the vmap does not batch
    assert torch.allclose(torch.func.vmap(lambda b_: torch.func.jvp(f, (b_,), (db,))[1])(b),
                          2 * b * db)


@pytest.mark.parametrize("with_equalities", [False, True])
def test_forward_mode_with_a_nonsymmetric_P_tangent(with_equalities):
    """Only the symmetric part of P enters the problem, so a tangent dP and its transpose
    move x* alike. Forward mode (``torch.func.jvp`` and ``vmap`` over it, which act with
    dP's symmetric part without forming it) matches central differences along a
    nonsymmetric dP, and the tangent's transpose gives the same answer."""
    Q, p, G, h = optnet_qp(3, 5, 7, seed=3)
    g = torch.Generator().manual_seed(4)
    A = torch.randn(3, 2, 5, generator=g, dtype=F64) if with_equalities else None
    b = (A @ torch.randn(3, 5, 1, generator=g, dtype=F64)).squeeze(-1) if with_equalities \
        else None

    def f(Q, p, G, h):
        return tdo.functional.qp(Q, p, A, b, G, h)
    tangents = [torch.randn(t.shape, generator=g, dtype=F64) for t in (Q, p, G, h)]
    _, jv = torch.func.jvp(f, (Q, p, G, h), tuple(tangents))
    flipped = [tangents[0].transpose(-1, -2)] + tangents[1:]
    _, jv_flipped = torch.func.jvp(f, (Q, p, G, h), tuple(flipped))
    eps = 1e-6
    plus = f(*(t + eps * v for t, v in zip((Q, p, G, h), tangents)))
    minus = f(*(t - eps * v for t, v in zip((Q, p, G, h), tangents)))
    torch.testing.assert_close(jv, (plus - minus) / (2 * eps), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(jv_flipped, jv, atol=1e-12, rtol=1e-10)
    stacked = [torch.stack((v, w)) for v, w in zip(tangents, flipped)]
    both = torch.func.vmap(lambda *v: torch.func.jvp(f, (Q, p, G, h), v)[1])(*stacked)
    torch.testing.assert_close(both, torch.stack((jv, jv_flipped)), atol=1e-12, rtol=1e-10)


def test_simplex_projection_batch_matches_highs_with_gradients():
    """sparsemax, argmin ‖x − y‖² over the simplex (one equality row and x ≥ 0), for a batch
    with the default solver: points and gradients equal HiGHS's member by member, and no
    member needs the SCS retry. Closed form of the gradient: on the support S, ∂x_S/∂y_S =
    I − 11ᵀ/|S|, zero elsewhere."""
    g = torch.Generator().manual_seed(5)
    B, n = 8, 6
    y = torch.randn(B, n, generator=g, dtype=F64, requires_grad=True)
    P = torch.eye(n, dtype=F64)
    A, b = torch.ones(1, n, dtype=F64), torch.ones(1, dtype=F64)
    x = tdo.functional.qp(P, -y, A, b, lb=[0.0] * n)
    x_h = tdo.functional.qp(P, -y, A, b, lb=[0.0] * n, solver="highs")
    torch.testing.assert_close(x, x_h, atol=1e-9, rtol=0)
    for member in range(B):
        row = torch.autograd.grad(x[member, 0], y, retain_graph=True)[0][member]
        support = x[member].detach() > 1e-9
        expected = torch.zeros(n, dtype=F64)
        if support[0]:
            expected[support] = -1.0 / int(support.sum())
            expected[0] += 1.0
        torch.testing.assert_close(row, expected, atol=1e-9, rtol=0)


def test_retried_member_uses_its_own_active_set(monkeypatch):
    """A member the first solver gets wrong is re-solved with SCS; its KKT system must be
    built from SCS's active rows alone, not the first solver's (else its gradient is a
    derivative of the wrong active set)."""
    import torchdiffopt.qp_function as qf
    from torchdiffopt.solvers.ipm import IPMResult

    Q, p, G, h = optnet_qp(3, 4, 6, seed=7)
    honest = tdo.functional.qp(Q, p, G=G, h=h, solver="highs")
    original = qf.solve_daqp

    def wrong_for_member_1(*args, **kwargs):
        r = original(*args, **kwargs)
        r.x[1] = 0.0                      # not optimal: fails the KKT check
        r.active[1] = True                # and claims every row active
        return IPMResult(r.x, r.mu, r.active, r.status, r.iterations)
    monkeypatch.setattr(qf, "solve_daqp", wrong_for_member_1)
    Q2, p2 = Q.clone().requires_grad_(), p.clone().requires_grad_()
    x = tdo.functional.qp(Q2, p2, G=G, h=h, solver="daqp")
    grads = torch.autograd.grad(x.sum(), (Q2, p2))
    monkeypatch.undo()
    Q3, p3 = Q.clone().requires_grad_(), p.clone().requires_grad_()
    x3 = tdo.functional.qp(Q3, p3, G=G, h=h, solver="highs")
    expected = torch.autograd.grad(x3.sum(), (Q3, p3))
    torch.testing.assert_close(x, honest, atol=1e-8, rtol=0)
    for a, e in zip(grads, expected):
        torch.testing.assert_close(a, e, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("solver", ["auto", "ipm"])
def test_flat_objective_with_no_active_row(solver):
    """P = 0, q = 0: every feasible point is optimal, and the solvers may return one with no
    active row (k = 0). The pseudo-inverse of K = 0 is 0: a feasible point, zero gradients,
    and the degeneracy warning, not an exception."""
    P = torch.zeros(2, 2, 2, dtype=F64)
    q = torch.zeros(2, 2, dtype=F64, requires_grad=True)
    G, h = torch.eye(2, dtype=F64), torch.ones(2, dtype=F64)
    with pytest.warns(tdo.DegenerateSolutionWarning):
        x = tdo.functional.qp(P, q, G=G, h=h, solver=solver)
    assert torch.isfinite(x).all() and (x <= 1 + 1e-9).all()
    grad, = torch.autograd.grad(x.sum(), q)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_calls_of_one_shape_with_different_bounds_and_solvers_keep_them_apart():
    """The dense structure is kept per shape, bounds and solver: consecutive calls that
    differ only in ``lb``/``ub`` or ``solver`` each get their own (closed form: the
    projection of ``y`` onto the box, with ``P = I``, ``q = -y``)."""
    y = torch.tensor([[-2.0, 0.5, 3.0]], dtype=torch.float64)
    P = torch.eye(3, dtype=torch.float64)
    for lb, ub in ((None, None), ([0.0] * 3, None), ([0.0] * 3, [1.0] * 3), (-1.0, 2.0)):
        for solver in ("auto", "highs"):
            x = tdo.functional.qp(P, -y, lb=lb, ub=ub, solver=solver)
            low = torch.as_tensor(-torch.inf if lb is None else lb, dtype=torch.float64)
            high = torch.as_tensor(torch.inf if ub is None else ub, dtype=torch.float64)
            torch.testing.assert_close(x, torch.minimum(torch.maximum(y, low), high),
                                       atol=1e-9, rtol=0)


@pytest.mark.parametrize("B", [3, 1], ids=["batched", "single"])
def test_the_backward_computes_only_the_cotangents_asked_for(monkeypatch, B):
    import torchdiffopt.backends.batched_quadratic as bq
    import torchdiffopt.backends.single_quadratic as sq

    Q, p, G, h = optnet_qp(B, 4, 5, seed=2)
    asked = []
    original = bq.data_cotangents

    def spy(*args):
        out = original(*args)
        asked.append([c is not None for c in out])
        return out
    monkeypatch.setattr(bq, "data_cotangents", spy)
    monkeypatch.setattr(sq, "data_cotangents", spy)
    p_only = p.clone().requires_grad_()
    (g_p,) = torch.autograd.grad(tdo.functional.qp(Q, p_only, G=G, h=h).sum(), p_only)
    # (P̄, q̄, r̄, C̄, c̄0): the linear cost's alone
    assert asked == [[False, True, False, False, False]]
    leaves = [t.clone().requires_grad_() for t in (Q, p, G, h)]
    x = tdo.functional.qp(leaves[0], leaves[1], G=leaves[2], h=leaves[3])
    grads = torch.autograd.grad(x.sum(), leaves)
    assert asked[-1] == [True, True, False, True, True]
    torch.testing.assert_close(g_p, grads[1], atol=1e-12, rtol=1e-12)


def test_solution_maps_skip_the_argument_binding_outside_transforms(monkeypatch):
    """QPSolve.apply does not bind its arguments through inspect.signature outside
    torch.func transforms (PositionalFunction), and gives the same solution and gradient
    as torch's own Function.apply; under vmap torch's path still serves."""
    import inspect

    from torchdiffopt.folding import PositionalFunction
    g = torch.Generator().manual_seed(3)
    L = torch.randn(2, 4, 4, generator=g, dtype=torch.float64)
    P = L @ L.mT + torch.eye(4, dtype=torch.float64)
    q = torch.randn(2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    G = torch.randn(3, 4, generator=g, dtype=torch.float64)
    h = torch.rand(3, generator=g, dtype=torch.float64)

    def solve_and_grad():
        x = tdo.functional.qp(P, q, G=G, h=h)
        (grad,) = torch.autograd.grad((x * x).sum(), q)
        return x.detach(), grad

    signature = inspect.signature
    calls = []
    monkeypatch.setattr(inspect, "signature",
                        lambda *a, **k: (calls.append(a[0]), signature(*a, **k))[1])
    x, grad = solve_and_grad()
    assert not [f for f in calls if getattr(f, "__qualname__", "").startswith("QPSolve")]
    # torch's own apply, for reference
    monkeypatch.setattr(PositionalFunction, "apply", classmethod(
        lambda cls, *args: torch.autograd.Function.apply.__func__(cls, *args)))
    x_ref, grad_ref = solve_and_grad()
    assert torch.equal(x, x_ref) and torch.equal(grad, grad_ref)
    monkeypatch.undo()
    vmapped = torch.func.vmap(lambda Pb, qb: tdo.functional.qp(Pb, qb, G=G, h=h))(P, q.detach())
    torch.testing.assert_close(vmapped, x, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("on_failure", ["raise", "nan"])
@pytest.mark.parametrize("bounds, error", [
    ({"lb": [np.nan, 0.0]}, ValueError), ({"ub": np.nan}, ValueError),
    ({"lb": [np.inf, -np.inf]}, tdo.InfeasibleError), ({"ub": -np.inf}, tdo.InfeasibleError)])
def test_bounds_that_no_point_meets_are_named(bounds, error, on_failure):
    """NaN bounds, a lower bound of +inf or an upper bound of -inf are named, not taken as
    'no bound' (which is what the bound rows make of an infinite entry)."""
    P, q = torch.eye(2, dtype=torch.float64), torch.ones(3, 2, dtype=torch.float64)
    name = next(iter(bounds))
    with pytest.raises(error, match=f"{name} contains"):
        tdo.functional.qp(P, q, **bounds, on_failure=on_failure)
