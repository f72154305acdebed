"""The single-problem path of QPSolve (backends/single_quadratic.py): one small strictly
convex QP on the CPU, factorized in numpy. Against the batched path on the same data, finite
differences, the adjoint identity, and the cases it hands on to the batched path."""

import numpy as np
import pytest
import torch

import torchdiffopt as tdo
import torchdiffopt.qp_function as qf
from torchdiffopt.errors import DegenerateSolutionWarning, NonconvexError

F64 = torch.float64


@pytest.fixture
def single_calls(monkeypatch):
    """A list that records, per QPSolve forward of batch one, whether the single path
    solved it (True) or handed it on (False)."""
    calls = []
    original = qf._solve_single

    def recording(*args):
        out = original(*args)
        calls.append(out is not None)
        return out
    monkeypatch.setattr(qf, "_solve_single", recording)
    return calls


def batched_path(monkeypatch):
    """Route every later call past the single path."""
    monkeypatch.setattr(qf, "SINGLE_MAX_ORDER", -1)


def random_qp(n, m, n_eq=0, seed=0, z_scale=1.0):
    """A strictly convex QP with a strictly feasible point ``z`` (entries of size
    ``z_scale``): P = LLᵀ + 0.1 I, G x ≤ h, A x = b."""
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(n, n, generator=g, dtype=F64)
    P = L @ L.T + 0.1 * torch.eye(n, dtype=F64)
    q = torch.randn(n, generator=g, dtype=F64)
    G = torch.randn(m, n, generator=g, dtype=F64)
    A = torch.randn(n_eq, n, generator=g, dtype=F64)
    z = z_scale * torch.randn(n, generator=g, dtype=F64)
    h = G @ z + torch.rand(m, generator=g, dtype=F64)
    b = A @ z
    return [t.unsqueeze(0) for t in (P, q, A, b, G, h)]


def outputs_and_grads(data, lb=None, ub=None, seed=1):
    leaves = [t.clone().requires_grad_() for t in data]
    x, nu, lam = tdo.functional.qp(*leaves, lb=lb, ub=ub, return_duals=True)
    g = torch.Generator().manual_seed(seed)
    loss = sum((torch.randn(o.shape, generator=g, dtype=F64) * o).sum() for o in (x, nu, lam))
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [x, nu, lam], [torch.zeros_like(t) if gr is None else gr
                          for t, gr in zip(leaves, grads)]


@pytest.mark.parametrize("m, n_eq, bounds", [
    (9, 0, None), (9, 2, None), (9, 1, "box"), (0, 3, None), (0, 0, "box"), (4, 0, "fixed")],
    ids=["inequalities", "equalities", "bounds", "equalities only", "bounds only",
         "fixed variables"])
def test_values_and_gradients_equal_the_batched_path(single_calls, monkeypatch, m, n_eq,
                                                     bounds):
    data = random_qp(6, m, n_eq=n_eq, seed=n_eq, z_scale=0.0 if bounds else 1.0)
    lb, ub = {None: (None, None), "box": (np.full(6, -0.3), np.full(6, 0.2)),
              "fixed": (np.array([0.0, 0.0, -1, -1, -1, -1]),
                        np.array([0.0, 0.0, 1, 1, 1, 1]))}[bounds]
    if m == 0:  # no inequality rows: G, h empty
        data[4], data[5] = data[4][:, :0], data[5][:, :0]
    if n_eq == 0:
        data[2], data[3] = data[2][:, :0], data[3][:, :0]
    outs, grads = outputs_and_grads(data, lb, ub)
    assert single_calls == [True]
    batched_path(monkeypatch)
    ref_outs, ref_grads = outputs_and_grads(data, lb, ub)
    assert single_calls == [True]  # (the batched path does not pass through it)
    for a, b in zip(outs + grads, ref_outs + ref_grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    x = outs[0].detach()
    if bounds == "box":  # some bound is active, so its rows took part
        assert bool(((x - 0.2).abs() < 1e-9).any() or ((x + 0.3).abs() < 1e-9).any())
    if bounds == "fixed":
        assert float(x[0, :2].abs().max()) < 1e-14


def test_gradient_against_central_differences(single_calls):
    P, q, A, b, G, h = random_qp(5, 8, seed=3)
    w = torch.randn(1, 5, dtype=F64, generator=torch.Generator().manual_seed(4))

    def loss(P, q, G, h):
        return (w * tdo.functional.qp(P, q, G=G, h=h)).sum()
    leaves = [t.clone().requires_grad_() for t in (P, q, G, h)]
    grads = torch.autograd.grad(loss(*leaves), leaves)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        v = [torch.randn(t.shape, generator=gen, dtype=F64) for t in leaves]
        v[0] = v[0] + v[0].mT  # a symmetric direction keeps P symmetric
        eps = 1e-6
        with torch.no_grad():
            plus = loss(*(t + eps * d for t, d in zip(leaves, v)))
            minus = loss(*(t - eps * d for t, d in zip(leaves, v)))
        fd = (plus - minus) / (2 * eps)
        analytic = sum((g * d).sum() for g, d in zip(grads, v))
        assert abs(float(analytic - fd)) <= 1e-6 * max(1.0, abs(float(fd)))
    assert all(single_calls)


def test_forward_mode_jacobians_and_the_adjoint_identity(single_calls, monkeypatch):
    P, q, A, b, G, h = random_qp(6, 9, seed=7)

    def solution(q, h):
        return tdo.functional.qp(P, q, G=G, h=h)
    J_fwd = torch.func.jacfwd(solution, argnums=(0, 1))(q, h)
    J_rev = torch.func.jacrev(solution, argnums=(0, 1))(q, h)
    for a, b in zip(J_fwd, J_rev):  # ⟨w, J v⟩ = ⟨Jᵀ w, v⟩ for every pair of unit vectors
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-10)
    assert single_calls and all(single_calls)
    batched_path(monkeypatch)
    J_batched = torch.func.jacfwd(solution, argnums=(0, 1))(q, h)
    for a, b in zip(J_fwd, J_batched):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_a_layer_with_sparse_patterns_takes_it(single_calls, monkeypatch):
    m = tdo.Model()
    x = m.variable(3, lb=-1.0, ub=1.0)
    c = m.parameter(np.zeros(3))
    s = m.parameter(1.0)
    con = m.constraint(x[0] + 2 * x[1] - x[2] <= s)
    m.minimize(tdo.sum_squares(x) + c @ x)
    # seeds on the solution, the dual and the optimal value
    layer = tdo.Layer(m, parameters=[c, s], outputs=[x, con, m.objective])
    c_val = torch.tensor([[-3.0, -4.0, 1.0]], dtype=F64, requires_grad=True)
    s_val = torch.tensor([0.5], dtype=F64, requires_grad=True)

    def run():
        x_out, dual, value = layer(c_val, s_val)
        loss = (x_out * torch.arange(1.0, 4.0)).sum() + 2 * dual.sum() - 0.5 * value.sum()
        return [x_out, dual, value], torch.autograd.grad(loss, (c_val, s_val))
    outs, grads = run()
    assert single_calls == [True]
    assert abs(float(outs[1].detach().sum())) > 1e-3  # the constraint binds
    batched_path(monkeypatch)
    ref_outs, ref_grads = run()
    for a, b in zip(outs + list(grads), ref_outs + list(ref_grads)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_it_hands_on_what_it_does_not_take(single_calls):
    eye = torch.eye(2, dtype=F64)
    G = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=F64)  # the same row twice
    # an LP (P = 0): not strictly convex
    x = tdo.functional.qp(0 * eye, torch.tensor([1.0, 1.0], dtype=F64),
                          G=-eye, h=torch.zeros(2, dtype=F64))
    torch.testing.assert_close(x, torch.zeros(2, dtype=F64))
    # two equal rows, both binding: dependent active rows, a singular KKT system
    with pytest.warns(DegenerateSolutionWarning):
        tdo.functional.qp(eye, torch.tensor([-2.0, 0.0], dtype=F64), G=G,
                          h=torch.ones(2, dtype=F64))
    # binding with a zero multiplier (the unconstrained minimum on the boundary)
    with pytest.warns(DegenerateSolutionWarning):
        tdo.functional.qp(eye, torch.zeros(2, dtype=F64), G=eye[:1], h=torch.zeros(1, dtype=F64))
    with pytest.raises(NonconvexError):
        tdo.functional.qp(-eye, torch.ones(2, dtype=F64), G=eye, h=torch.ones(2, dtype=F64))
    with pytest.raises(tdo.InfeasibleError):
        tdo.functional.qp(eye, torch.ones(2, dtype=F64), G=torch.cat((eye, -eye)),
                          h=torch.tensor([-1.0, 0.0, 0.0, 0.0], dtype=F64))
    assert single_calls == [False] * 5


def test_a_failed_single_problem_reports_its_status_with_nan_outputs(single_calls):
    eye = torch.eye(2, dtype=F64)
    q = torch.ones(1, 2, dtype=F64, requires_grad=True)
    x = tdo.functional.qp(eye, q, G=torch.cat((eye, -eye)),
                          h=torch.tensor([-1.0, 0.0, 0.0, 0.0], dtype=F64), on_failure="nan")
    assert bool(x.isnan().all())
    (grad,) = torch.autograd.grad(x.nan_to_num().sum(), q)
    assert bool((grad == 0).all())
    assert single_calls == [False]


def test_float32_inputs_are_solved_in_float64_and_returned_in_float32(single_calls):
    data = random_qp(5, 7, seed=11)
    x64, _ = outputs_and_grads(data)
    leaves = [t.float().requires_grad_() for t in data]
    x32 = tdo.functional.qp(*leaves)
    (g_q,) = torch.autograd.grad(x32.sum(), leaves[1])
    assert x32.dtype == torch.float32 and g_q.dtype == torch.float32
    torch.testing.assert_close(x32.double(), x64[0].detach(), atol=1e-5, rtol=1e-5)
    assert single_calls == [True, True]


def test_a_backward_with_create_graph_records_the_same_graph_as_the_batched_path(
        single_calls, monkeypatch):
    P, q, A, b, G, h = random_qp(5, 7, seed=13)

    def hessian_vector_product():
        q_leaf = q.clone().requires_grad_()
        x = tdo.functional.qp(P, q_leaf, G=G, h=h)
        (g,) = torch.autograd.grad((x ** 2).sum(), q_leaf, create_graph=True)
        return g, torch.autograd.grad((g * torch.arange(5.0)).sum(), q_leaf)[0]
    g, hv = hessian_vector_product()
    assert single_calls == [True]
    batched_path(monkeypatch)
    g_ref, hv_ref = hessian_vector_product()
    torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-9)
    # x is affine in q on a fixed active set: the product is exact, and nonzero
    torch.testing.assert_close(hv, hv_ref, atol=1e-10, rtol=1e-9)
    assert float(hv.abs().max()) > 1e-3


def test_the_objective_seed_is_not_written_to(single_calls):
    P, q, A, b, G, h = random_qp(4, 6, seed=17)
    st = tdo.functional._dense_structure(4, 0, 6, None, None, None, None)
    r = torch.zeros(1, dtype=F64, requires_grad=True)
    call = qf.SolveCall(st)
    _, _, f = qf.QPSolve.apply(call, P.flatten(-2), q, r, G.flatten(-2), -h)
    seed = torch.ones(1, dtype=F64)
    f.backward(seed, retain_graph=True)
    f.backward(seed)
    assert float(seed) == 1.0 and float(r.grad) == 2.0
    assert single_calls == [True]
