"""The batched conic layer: data evaluated once for the batch, one batched factorization.

Random second-order, semidefinite and exponential cone programs with parameters in the
objective (``c``), in the cone constants (``b``) and in the constraint coefficients (``A``);
each is strongly convex (``½‖x‖²`` in the objective) with a binding cone at its solution, so
the solution map is differentiable there. Gradients are compared with central finite
differences of re-solved layers, reverse mode with forward mode by the adjoint identity
``⟨w, J v⟩ = ⟨Jᵀw, v⟩``, ``torch.func`` transforms with each other and with
``layer.jacobian``, the batch with its members solved one by one.
"""

import numpy as np
import pytest
import torch

import torchdiffopt as tdo
from torchdiffopt.backends import batched_conic

T64 = torch.float64
B = 3


def soc_problem(rng):
    """min ½‖x‖² + cᵀx  s.t.  ‖G x + h‖₂ ≤ 1 + gᵀx: c pushes x out of the ball, which binds."""
    n, k = 3, 4
    m = tdo.conic_diff_model()
    x = m.variable(n, name="x")
    c = m.parameter(np.zeros(n), name="c")
    h = m.parameter(np.zeros(k), name="h")
    G = m.parameter(np.zeros((k, n)), name="G")
    soc = m.constraint(tdo.SOC(1 + 0.1 * x.sum(), G @ x + h), name="soc")
    m.minimize(0.5 * tdo.sum_squares(x) + c @ x)
    values = {"c": 3 * rng.normal(size=(B, n)), "h": 0.1 * rng.normal(size=k),
              "G": np.eye(k, n) + 0.2 * rng.normal(size=(k, n))}
    return m, [c, h, G], [x, soc, m.objective], values


def psd_problem(rng):
    """min ½‖x‖² + cᵀx  s.t.  H + x₀F + x₁S ⪰ 0 (2×2): binding at a rank-one slack."""
    m = tdo.conic_diff_model()
    x = m.variable(2, name="x")
    c = m.parameter(np.zeros(2), name="c")
    H = m.parameter(np.eye(2), name="H")
    F = m.parameter(np.eye(2), name="F")
    S = np.array([[1.0, 0.3], [0.3, -1.0]])
    psd = m.constraint(tdo.PSD(H + x[0] * F + x[1] * S), name="psd")
    m.minimize(0.5 * tdo.sum_squares(x) + c @ x)
    Q = rng.normal(size=(2, 2))
    values = {"c": np.abs(rng.normal(size=(B, 2))) + 2.0, "H": np.eye(2) + 0.1 * (Q + Q.T),
              "F": np.diag([1.0, 0.7]) + 0.05 * (Q - Q.T) @ (Q - Q.T).T}
    return m, [c, H, F], [x, psd, m.objective], values


def exp_problem(rng):
    """min ½‖x‖² + cᵀx  s.t.  exp(x_i + h_i) ≤ (G x)_i + 2, one exponential cone per entry."""
    k = 2
    m = tdo.conic_diff_model()
    x = m.variable(k, name="x")
    c = m.parameter(np.zeros(k), name="c")
    h = m.parameter(np.zeros(k), name="h")
    G = m.parameter(np.zeros((k, k)), name="G")
    cone = m.constraint(tdo.ExpCone(x + h, 1.0, G @ x + 2.0), name="exp")
    m.minimize(0.5 * tdo.sum_squares(x) + c @ x)
    values = {"c": -2.0 - np.abs(rng.normal(size=(B, k))), "h": 0.1 * rng.normal(size=k),
              "G": 0.1 * rng.normal(size=(k, k))}
    return m, [c, h, G], [x, cone, m.objective], values


PROBLEMS = [soc_problem, psd_problem, exp_problem]


def build(problem, seed=0, **kw):
    m, params, outputs, values = problem(np.random.default_rng(seed))
    layer = tdo.Layer(m, parameters=params, outputs=outputs, **kw)
    inputs = [torch.tensor(values[p.name], dtype=T64) for p in params]
    return layer, inputs


def flat_outputs(layer, inputs):
    return torch.cat([o.reshape(-1) for o in layer(*inputs)])


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.__name__)
def test_gradients_match_central_differences(problem):
    layer, inputs = build(problem)
    out = flat_outputs(layer, inputs)
    assert layer.last_status == ["optimal"] * B and torch.isfinite(out).all()
    w = torch.randn(out.shape, dtype=T64, generator=torch.Generator().manual_seed(1))
    leaves = [t.clone().requires_grad_() for t in inputs]
    grads = torch.autograd.grad((flat_outputs(layer, leaves) * w).sum(), leaves)
    rng = np.random.default_rng(2)
    h = 1e-6
    for _ in range(3):
        v = [torch.tensor(rng.normal(size=t.shape), dtype=T64) for t in inputs]
        plus = flat_outputs(layer, [t + h * d for t, d in zip(inputs, v)])
        minus = flat_outputs(layer, [t - h * d for t, d in zip(inputs, v)])
        fd = ((plus - minus) / (2 * h) * w).sum()
        analytic = sum((g * d).sum() for g, d in zip(grads, v))
        assert abs(float(analytic - fd)) <= 1e-5 * max(1.0, abs(float(fd)))


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.__name__)
def test_adjoint_identity(problem):
    """⟨w, J v⟩ (forward mode) = ⟨Jᵀw, v⟩ (reverse mode) to round-off, over every output and
    every parameter (batched c, broadcast b and A)."""
    layer, inputs = build(problem)
    gen = torch.Generator().manual_seed(3)
    v = [torch.randn(t.shape, dtype=T64, generator=gen) for t in inputs]
    out, Jv = torch.func.jvp(lambda *a: flat_outputs(layer, a), tuple(inputs), tuple(v))
    w = torch.randn(out.shape, dtype=T64, generator=gen)
    leaves = [t.clone().requires_grad_() for t in inputs]
    JTw = torch.autograd.grad((flat_outputs(layer, leaves) * w).sum(), leaves)
    lhs = float((w * Jv).sum())
    rhs = float(sum((g * d).sum() for g, d in zip(JTw, v)))
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.__name__)
def test_jacrev_jacfwd_and_layer_jacobian_agree(problem):
    layer, inputs = build(problem)
    J = layer.jacobian(*inputs)
    for k in range(len(inputs)):
        def fn(t, k=k):
            args = list(inputs)
            args[k] = t
            return layer(*args)
        rev = torch.func.jacrev(fn)(inputs[k])
        fwd = torch.func.jacfwd(fn)(inputs[k])
        for i, (r, f) in enumerate(zip(rev, fwd)):
            torch.testing.assert_close(r, f, atol=1e-9, rtol=1e-8)
            if k == 0:  # batched parameter: the Jacobian is block diagonal over members
                blocks = torch.stack([r[b].select(r[b].dim() - 2, b) for b in range(B)])
                torch.testing.assert_close(blocks, J[i][0], atol=1e-9, rtol=1e-8)
            else:  # broadcast parameter: J[i][k] per member
                torch.testing.assert_close(r, J[i][k], atol=1e-9, rtol=1e-8)


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.__name__)
def test_batch_equals_members_one_by_one(problem):
    layer, inputs = build(problem)
    leaves = [t.clone().requires_grad_() for t in inputs]
    outs = layer(*leaves)
    sum(o.square().sum() for o in outs).backward()
    grads = [torch.zeros_like(t) for t in inputs]
    for b in range(B):
        member = [t.clone().requires_grad_() for t in [inputs[0][b]] + inputs[1:]]
        outs_b = layer(*member)
        for o, o_b in zip(outs, outs_b):
            torch.testing.assert_close(o[b].detach(), o_b.detach(), atol=1e-10, rtol=0)
        sum(o.square().sum() for o in outs_b).backward()
        grads[0][b] = member[0].grad
        for g, t in zip(grads[1:], member[1:]):
            g += t.grad  # a broadcast parameter's gradient is the sum over the batch
    for leaf, g in zip(leaves, grads):
        torch.testing.assert_close(leaf.grad, g, atol=1e-9, rtol=1e-9)


def test_infeasible_member_with_nan_leaves_the_others_intact():
    """‖x‖₂ ≤ r with r < 0 is empty: that member is NaN with zero gradient; the others are
    those of a batch without it."""
    m = tdo.conic_diff_model()
    x = m.variable(3, name="x")
    r = m.parameter(1.0, name="r")
    c = m.parameter(np.ones(3), name="c")
    ball = m.constraint(tdo.norm2(x) <= r)
    m.maximize(c @ x)
    layer = tdo.Layer(m, parameters=[r, c], outputs=[x, ball, m.objective], on_failure="nan")
    R = torch.tensor([1.0, -1.0, 2.0], dtype=T64, requires_grad=True)
    C = torch.tensor([[1.0, 2.0, 2.0], [0.5, 0.0, 1.0], [0.0, 3.0, 4.0]], dtype=T64,
                     requires_grad=True)
    outs = layer(R, C)
    assert layer.last_status == ["optimal", "infeasible", "optimal"]
    assert all(torch.isnan(o[1]).all() for o in outs)
    torch.testing.assert_close(outs[0][[0, 2]], (R[[0, 2], None] * C[[0, 2]]
                                                 / C[[0, 2]].norm(dim=1, keepdim=True)).detach())
    sum(o[[0, 2]].sum() for o in outs).backward()
    assert R.grad[1] == 0 and (C.grad[1] == 0).all()
    R2, C2 = R.detach()[[0, 2]].requires_grad_(), C.detach()[[0, 2]].requires_grad_()
    sum(o.sum() for o in layer(R2, C2)).backward()
    torch.testing.assert_close(R.grad[[0, 2]], R2.grad)
    torch.testing.assert_close(C.grad[[0, 2]], C2.grad)
    with pytest.raises(tdo.InfeasibleError, match=r"batch members \[1\]"):
        tdo.Layer(m, parameters=[r, c], outputs=x)(R.detach(), C.detach())


def test_inaccurate_solver_points_are_refused_for_the_batch_at_once():
    """The points of a batch held densely are checked together: SCS stopped after 5
    iterations gives a SolverError naming the first member and the residuals; a looser
    ``accept`` lets such points through, to the refinement (from 20 iterations: within
    1e-14 of the solution)."""
    rng = np.random.default_rng(0)
    A = torch.tensor(np.vstack((-np.eye(3), np.zeros((1, 3)), -np.eye(3))), dtype=T64)
    b = torch.tensor([0, 0, 0, 1.0, 0, 0, 0], dtype=T64)
    c = torch.tensor(-0.1 - np.abs(rng.normal(size=(2, 3))), dtype=T64)  # x* = -c / ‖c‖
    cones = {"l": 3, "q": [4]}
    with pytest.raises(tdo.SolverError, match=r"batch member 0: SCS's point is not accurate "
                                               r"enough \(status .* after 5 iterations; "
                                               r"relative residuals primal"):
        tdo.functional.conic(A, b, c, cones, solver="scs", solver_options={"max_iters": 5})
    x = tdo.functional.conic(A, b, c, cones, solver="scs",
                             solver_options={"max_iters": 20, "accept": 1e6})
    torch.testing.assert_close(x, -c / c.norm(dim=1, keepdim=True))  # refined from there


def test_nonconvex_member_is_reported_per_member():
    """A norm's weight that turns negative in one member makes that member nonconvex."""
    m = tdo.conic_diff_model()
    x = m.variable(2, name="x")
    lam = m.parameter(1.0, name="lam")
    m.minimize(lam * tdo.norm1(x) + 0.5 * tdo.sum_squares(x - np.array([2.0, -0.5])))
    layer = tdo.Layer(m, parameters=[lam], outputs=x, on_failure="nan")
    out = layer(torch.tensor([1.0, -1.0], dtype=T64))
    assert layer.last_status == ["optimal", "nonconvex"]
    torch.testing.assert_close(out[0], torch.tensor([1.0, 0.0], dtype=T64))  # soft threshold
    assert torch.isnan(out[1]).all()


def test_sparse_path_matches_dense_path(monkeypatch):
    """Above DENSE_MAX_ORDER each member keeps its own sparse factorization: same gradients
    and jacobian as the batched dense LU, also under torch.func."""
    layer, inputs = build(soc_problem)
    leaves = [t.clone().requires_grad_() for t in inputs]
    dense = torch.autograd.grad(flat_outputs(layer, leaves).square().sum(), leaves)
    J_dense = layer.jacobian(*inputs)
    monkeypatch.setattr(batched_conic, "DENSE_MAX_ORDER", 0)
    sparse = torch.autograd.grad(flat_outputs(layer, leaves).square().sum(), leaves)
    for a, b in zip(dense, sparse):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    for row_d, row_s in zip(J_dense, layer.jacobian(*inputs)):
        for a, b in zip(row_d, row_s):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    # torch.func on the sparse path: its numpy solves take the seeds a slice at a time
    J = torch.func.jacrev(lambda c: layer(c, *inputs[1:])[0])(inputs[0])  # (B, ·, B, ·)
    torch.testing.assert_close(torch.einsum("bibj->bij", J), J_dense[0][0], atol=1e-10,
                               rtol=1e-9)
