"""The torch layer: autograd, forward mode, torch.func, batching, dtypes, failure policies."""

import numpy as np
import pytest
import torch

import torchdiffopt as tdo
from problems import random_qp

F64 = torch.float64


def layer_problem(kind, seed, solver="highs", batch=3, maximize=False):
    """A random problem (every piece of data a parameter) as a layer over all its outputs,
    with batched inputs near the nominal data (the active set stays the same)."""
    rng = np.random.default_rng(seed)
    prob = random_qp(rng, kind, maximize, solver)
    if kind != "qp":  # P = 0 or singular stays fixed: perturbing it could make it indefinite
        prob.params = [p for p in prob.params if p.name != "P"]
    outputs = [prob.x, *prob.constraints, prob.model.objective]
    layer = tdo.Layer(prob.model, parameters=prob.params, outputs=outputs, solver=solver)
    inputs = [torch.tensor(p.value + 1e-3 * rng.normal(size=(batch, *p.shape)), dtype=F64,
                           requires_grad=True) for p in prob.params]
    return prob, layer, inputs


@pytest.mark.parametrize("solver", ["highs", "ipm", "daqp"])
@pytest.mark.parametrize("kind", ["lp", "qp", "psd"])
def test_gradcheck_every_output_kind(kind, solver):
    prob, layer, inputs = layer_problem(kind, seed=1, solver=solver)
    torch.autograd.gradcheck(lambda *t: layer(*t), inputs, atol=1e-6, rtol=1e-5,
                             check_forward_ad=True, fast_mode=True)
    assert layer.last_status == ["optimal"] * 3


def test_maximize_layer_matches_model_duals():
    prob, layer, inputs = layer_problem("qp", seed=2, maximize=True, batch=1)
    outs = layer(*[t[0] for t in inputs])
    prob.solve_at({p: t[0].detach().numpy() for p, t in zip(prob.params, inputs)})
    np.testing.assert_allclose(torch.cat([o.reshape(-1) for o in outs]).detach().numpy(),
                               prob.outputs(), atol=1e-9)


def test_torch_func_transforms_agree():
    prob, layer, inputs = layer_problem("qp", seed=3, batch=2)
    c_idx = [p.name for p in prob.params].index("c")
    others = [t.detach() for t in inputs]

    def f(c):
        args = list(others)
        args[c_idx] = c
        return layer(*args)[0]

    c0 = others[c_idx]
    v = torch.randn_like(c0)
    _, jv = torch.func.jvp(f, (c0,), (v,))
    eps = 1e-6
    fd = (f(c0 + eps * v) - f(c0 - eps * v)) / (2 * eps)
    torch.testing.assert_close(jv, fd, atol=1e-6, rtol=1e-5)

    jf = torch.func.jacfwd(f)(c0)
    jr = torch.func.jacrev(f)(c0)
    torch.testing.assert_close(jf, jr, atol=1e-10, rtol=1e-9)
    # members do not interact
    assert jf[0, :, 1].abs().max() == 0

    vm = torch.func.vmap(lambda *a: layer(*a)[0])(*others)
    torch.testing.assert_close(vm, f(c0), atol=1e-10, rtol=1e-9)

    # layer.jacobian: one factorization, every output and parameter
    J = layer.jacobian(*others)
    torch.testing.assert_close(J[0][c_idx], torch.stack([jr[b, :, b] for b in range(2)]),
                               atol=1e-10, rtol=1e-9)


def test_broadcast_parameter_gradient_is_the_sum():
    prob, layer, inputs = layer_problem("qp", seed=4, batch=3)
    c_idx = [p.name for p in prob.params].index("c")
    shared = torch.tensor(prob.params[c_idx].value, dtype=F64, requires_grad=True)
    args = [t.detach() for t in inputs]
    args[c_idx] = shared
    layer(*args)[0].sum().backward()
    per_member = []
    for b in range(3):
        s = shared.detach().clone().requires_grad_()
        one = [t[b] for t in args]
        one[c_idx] = s
        layer(*one)[0].sum().backward()
        per_member.append(s.grad)
    torch.testing.assert_close(shared.grad, sum(per_member), atol=1e-10, rtol=1e-9)


def test_float32_follows_inputs():
    prob, layer, inputs = layer_problem("qp", seed=5, batch=2)
    out64 = layer(*[t.detach() for t in inputs])
    out32 = layer(*[t.detach().float() for t in inputs])
    for a, b in zip(out64, out32):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b.double(), a, atol=1e-4, rtol=1e-4)
    x32 = [t.detach().float().requires_grad_() for t in inputs]
    layer(*x32)[0].sum().backward()
    assert x32[1].grad.dtype == torch.float32


@pytest.mark.parametrize("solver", ["scs", "qpth", "ipm", "daqp"])
def test_other_solvers_agree_with_highs(solver):
    _, layer_h, inputs = layer_problem("qp", seed=6)
    _, layer_s, _ = layer_problem("qp", seed=6, solver=solver)
    args = [t.detach().requires_grad_() for t in inputs]
    out_h = layer_h(*args)
    grads_h = torch.autograd.grad(sum(o.sum() for o in out_h), args)
    args2 = [t.detach().requires_grad_() for t in inputs]
    out_s = layer_s(*args2)
    grads_s = torch.autograd.grad(sum(o.sum() for o in out_s), args2)
    for a, b in zip(out_h + grads_h, out_s + grads_s):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


def infeasible_batch_layer(on_failure, solver="highs"):
    m = tdo.Model(solver=solver)
    x = m.variable(2, name="x")
    lo = m.parameter(np.zeros(2), name="lo")
    hi = m.parameter(np.ones(2), name="hi")
    m.constraint(x >= lo)
    m.constraint(x <= hi)
    m.minimize(tdo.sum_squares(x - 0.5) + 2 * x.sum())  # lower bounds strongly active
    return tdo.Layer(m, parameters=[lo, hi], outputs=x, on_failure=on_failure)


@pytest.mark.parametrize("solver", ["highs", "ipm", "daqp"])
def test_infeasible_member_raises_with_its_index(solver):
    layer = infeasible_batch_layer("raise", solver)
    lo = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 0.0]], dtype=F64)
    hi = torch.ones(2, dtype=F64)
    with pytest.raises(tdo.InfeasibleError, match=r"batch members \[1\]"):
        layer(lo, hi)
    assert layer.last_status == ["optimal", "infeasible", "optimal"]


def test_infeasible_member_gives_nan_and_zero_gradient():
    layer = infeasible_batch_layer("nan")
    lo = torch.tensor([[0.0, 0.1], [2.0, 0.0], [0.2, 0.0]], dtype=F64, requires_grad=True)
    hi = torch.ones(2, dtype=F64, requires_grad=True)
    x = layer(lo, hi)
    assert layer.last_status == ["optimal", "infeasible", "optimal"]
    assert torch.isnan(x[1]).all() and torch.isfinite(x[[0, 2]]).all()
    ok = torch.tensor([True, False, True])
    x[ok].sum().backward()
    assert torch.all(lo.grad[1] == 0) and torch.isfinite(lo.grad).all()
    # the healthy members' gradients equal those of a batch without the failed one
    lo2 = lo.detach()[ok].clone().requires_grad_()
    layer(lo2, hi.detach()).sum().backward()
    torch.testing.assert_close(lo.grad[ok], lo2.grad)


def test_bad_inputs():
    layer = infeasible_batch_layer("raise")
    good = torch.zeros(2, dtype=F64)
    with pytest.raises(ValueError, match="'lo' contains NaN or inf at batch members \\[1\\]"):
        layer(torch.tensor([[0.0, 0.0], [np.nan, 0.0]], dtype=F64), torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match="'hi' contains NaN or inf"):
        layer(good, torch.tensor([1.0, np.inf], dtype=F64))
    with pytest.raises(ValueError, match="'lo' has shape \\(2,\\)"):
        layer(torch.zeros(3, dtype=F64), torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match="batch size mismatch"):
        layer(torch.zeros(4, 2, dtype=F64), torch.ones(3, 2, dtype=F64))
    with pytest.raises(ValueError, match="takes 2 parameter tensors"):
        layer(good)
    with pytest.raises(ValueError, match="on_failure"):
        tdo.Layer(layer.model, parameters=[], outputs=[], on_failure="ignore")


def test_unbatched_call_and_single_output():
    layer = infeasible_batch_layer("raise")
    x = layer(torch.tensor([0.0, 0.7], dtype=F64), torch.ones(2, dtype=F64))
    # min Σ (x - 0.5)² + 2x: unconstrained optimum -0.5, clipped to [lo, hi]
    torch.testing.assert_close(x, torch.tensor([0.0, 0.7], dtype=F64))
    assert x.shape == (2,)


def test_full_gradcheck_on_the_tutorial_model():
    """Every entry of the Jacobian (not fast mode) on the seed tutorial as a layer: an LP
    whose constraint coefficient q and right-hand side 3p are batched inputs."""
    m = tdo.Model(solver="highs")
    x, y = m.variable(name="x"), m.variable(name="y")
    p, q = m.parameter(4.0, name="p"), m.parameter(2.0, name="q")
    cons = m.constraint(q * x + y >= 3 * p)
    m.constraint(y <= 5)
    m.minimize(2 * x - y)
    layer = tdo.Layer(m, parameters=[p, q], outputs=[x, y, cons, m.objective])
    P = torch.tensor([4.0, 4.5, 5.0], dtype=F64, requires_grad=True)
    Q = torch.tensor([2.0, 1.5, 3.0], dtype=F64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, b: layer(a, b), (P, Q), check_forward_ad=True)
    xs, ys, duals, objs = layer(P, Q)
    torch.testing.assert_close(xs, (3 * P - 5) / Q)  # closed form
    torch.testing.assert_close(duals, 2 / Q)         # ∂f*/∂(3p) = 2/q
    (g_p, g_q) = torch.autograd.grad(xs.sum(), (P, Q))
    torch.testing.assert_close(g_p, 3 / Q)
    torch.testing.assert_close(g_q, -(3 * P - 5) / Q ** 2)


def test_vmap_over_batched_calls():
    prob, layer, inputs = layer_problem("qp", seed=7, batch=2)
    stacked = [torch.stack((t.detach(), t.detach() + 1e-4)) for t in inputs]  # (V=2, B=2, ...)
    out = torch.func.vmap(lambda *a: layer(*a)[0])(*stacked)
    for v in range(2):
        torch.testing.assert_close(out[v], layer(*[s[v] for s in stacked])[0])


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@cuda
@pytest.mark.parametrize("solver", ["highs", "qpth"])
def test_cuda_inputs_give_cuda_outputs_and_gradients(solver):
    prob, layer_cpu, inputs = layer_problem("qp", seed=8, batch=4)
    _, layer, _ = layer_problem("qp", seed=8, batch=4, solver=solver)
    gpu = [t.detach().cuda().float().requires_grad_() for t in inputs]
    outs = layer(*gpu)
    assert all(o.device.type == "cuda" and o.dtype == torch.float32 for o in outs)
    sum(o.sum() for o in outs).backward()
    cpu = [t.detach().requires_grad_() for t in inputs]
    ref = layer_cpu(*cpu)
    sum(o.sum() for o in ref).backward()
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.grad.cpu().double(), b.grad, atol=1e-3, rtol=1e-3)


def test_large_problem_uses_sparse_memberwise_factorizations():
    """n = 1,200 variables with bounds: the KKT order exceeds the dense limit, so each
    member gets its own sparse factorization (no dense (B, N, N) tensor)."""
    import scipy.sparse as sp

    n = 1200
    rng = np.random.default_rng(0)
    D = sp.eye(n - 1, n, format="csr") - sp.eye(n - 1, n, k=1, format="csr")
    m = tdo.Model(solver="highs")
    x = m.variable(n, lb=0.0, ub=10.0, name="x")
    c = m.parameter(np.zeros(n), name="c")
    h = m.parameter(np.full(n - 1, 0.5), name="h")
    con = m.constraint(D @ x <= h)
    m.minimize(0.5 * tdo.sum_squares(x) - c @ x)
    layer = tdo.Layer(m, parameters=[c, h], outputs=[x, con])
    c_t = torch.tensor(rng.uniform(-1, 5, (2, n)), dtype=F64, requires_grad=True)
    h_t = torch.tensor(rng.uniform(0.2, 1.0, n - 1), dtype=F64, requires_grad=True)
    xs, duals = layer(c_t, h_t)
    assert layer.last_status == ["optimal", "optimal"]
    w = torch.randn_like(xs)
    g_c, g_h = torch.autograd.grad((w * xs).sum(), (c_t, h_t))
    # forward mode (dual numbers) in a random direction: adjoint identity
    import torch.autograd.forward_ad as fwAD

    v_c, v_h = torch.randn_like(c_t), torch.randn_like(h_t)
    with fwAD.dual_level():
        out = layer(fwAD.make_dual(c_t.detach(), v_c), fwAD.make_dual(h_t.detach(), v_h))[0]
        jv = fwAD.unpack_dual(out).tangent
    assert float((w * jv).sum()) == pytest.approx(float((g_c * v_c).sum() + (g_h * v_h).sum()),
                                                  rel=1e-9)
    # a free coordinate (no active row or bound around it) moves one-for-one with c
    free = ((xs[0] > 1e-6) & (xs[0] < 10 - 1e-6)).numpy()
    rows_active = (duals[0].abs() > 1e-9).numpy()
    isolated = free & ~np.r_[rows_active, False] & ~np.r_[False, rows_active]
    i = int(np.flatnonzero(isolated)[0])
    assert float(jv[0, i]) == pytest.approx(float(v_c[0, i]), rel=1e-9)
    # torch.func on the sparse path: its numpy solves take the seeds a slice at a time
    J = torch.func.jacrev(lambda cc: layer(cc, h_t.detach())[0])(c_t.detach()[:1])
    torch.testing.assert_close(torch.einsum("i,ij->j", w[0], J[0, :, 0]), g_c[0])
    Jf = torch.func.jacfwd(lambda cc: layer(cc, h_t.detach())[0])(c_t.detach()[:1])
    torch.testing.assert_close(Jf, J)
