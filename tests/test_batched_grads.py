"""Batched grads: ``torch.autograd.grad(…, is_grads_batched=True)`` and
``torch.autograd.functional.jacobian(…, vectorize=True)`` through every solution map.

Both run the backward pass under torch's legacy vmap; the solution maps unwrap its seeds
(:func:`torchdiffopt.folding.accepts_batched_grads`). Each Jacobian is compared with the
one the same call builds row by row (``vectorize=False``) and with central finite
differences of re-solved problems.
"""

import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian

import torchdiffopt as tdo

F64 = torch.float64


def random_qp(B, n, m, seed):
    """qpth's generator with a strictly feasible point; B = 0: no batch dimension."""
    g = torch.Generator().manual_seed(seed)
    shape = (max(B, 1),)
    L = torch.randn(*shape, n, n, generator=g, dtype=F64)
    Q = L @ L.mT + 1e-3 * torch.eye(n, dtype=F64)
    p = torch.randn(*shape, n, generator=g, dtype=F64)
    G = torch.randn(*shape, m, n, generator=g, dtype=F64)
    h = (G @ torch.randn(*shape, n, 1, generator=g, dtype=F64)).squeeze(-1) \
        + torch.rand(*shape, m, generator=g, dtype=F64)
    return (Q, p, G, h) if B else (Q[0], p[0], G[0], h[0])


def central_jacobian(f, t, step=1e-6):
    """(∂f/∂t) by central differences, shaped ``(*f.shape, *t.shape)``."""
    cols = []
    for i in range(t.numel()):
        e = torch.zeros(t.numel(), dtype=t.dtype)
        e[i] = step
        e = e.reshape(t.shape)
        with torch.no_grad():
            cols.append((f(t + e) - f(t - e)) / (2 * step))
    out = torch.stack(cols, -1)
    return out.reshape(*out.shape[:-1], *t.shape)


@pytest.mark.parametrize("B", [0, 3], ids=["single problem", "batch of 3"])
def test_qp_jacobian_vectorized_in_every_input(B):
    Q, p, G, h = random_qp(B, 5, 8, seed=1)
    inputs = (Q, p, G, h)
    f = lambda Q_, p_, G_, h_: tdo.functional.qp(Q_, p_, G=G_, h=h_)  # noqa: E731
    vectorized = jacobian(f, inputs, vectorize=True)
    rowwise = jacobian(f, inputs, vectorize=False)
    for k, (J_vec, J_row) in enumerate(zip(vectorized, rowwise)):
        torch.testing.assert_close(J_vec, J_row, atol=1e-12, rtol=1e-10)
        one = lambda t, k=k: f(*(t if i == k else a for i, a in enumerate(inputs)))  # noqa
        torch.testing.assert_close(J_vec, central_jacobian(one, inputs[k]),
                                   atol=1e-6, rtol=1e-5)


def test_qp_is_grads_batched_with_duals():
    """Seeds on the solution and on the multipliers at once, one batched call."""
    Q, p, G, h = random_qp(2, 4, 6, seed=2)
    p = p.requires_grad_()
    h = h.requires_grad_()
    x, _, lam = tdo.functional.qp(Q, p, G=G, h=h, return_duals=True)
    gen = torch.Generator().manual_seed(0)
    wx = torch.randn(7, *x.shape, generator=gen, dtype=F64)
    wl = torch.randn(7, *lam.shape, generator=gen, dtype=F64)
    gp, gh = torch.autograd.grad((x, lam), (p, h), (wx, wl), is_grads_batched=True,
                                 retain_graph=True)
    for k in range(7):
        ep, eh = torch.autograd.grad((x, lam), (p, h), (wx[k], wl[k]), retain_graph=True)
        torch.testing.assert_close(gp[k], ep, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(gh[k], eh, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("B", [1, 3])
def test_batched_grads_with_create_graph_differentiate_in_the_seeds(B):
    """``create_graph=True`` with batched seeds: the cotangents are the row-by-row ones, and
    differentiating them in the seeds gives ``J u`` (the vector-Jacobian product is linear
    in its seed), which is also the forward-mode tangent."""
    Q, p, G, h = random_qp(B, 4, 6, seed=3)
    p = p.requires_grad_()
    x = tdo.functional.qp(Q, p, G=G, h=h)
    gen = torch.Generator().manual_seed(1)
    seeds = torch.randn(2, *x.shape, generator=gen, dtype=F64, requires_grad=True)
    u = torch.randn(*p.shape, generator=gen, dtype=F64)
    (cotangents,) = torch.autograd.grad(x, p, seeds, create_graph=True, retain_graph=True,
                                        is_grads_batched=True)
    for k in range(2):
        (row,) = torch.autograd.grad(x, p, seeds[k], retain_graph=True)
        torch.testing.assert_close(cotangents[k], row, atol=1e-12, rtol=1e-10)
    (Ju,) = torch.autograd.grad(cotangents, seeds, u.expand(2, *u.shape))
    _, tangent = torch.func.jvp(lambda p_: tdo.functional.qp(Q, p_, G=G, h=h),
                                (p.detach(),), (u,))
    torch.testing.assert_close(Ju, tangent.expand(2, *tangent.shape), atol=1e-12, rtol=1e-10)


def test_conic_layer_jacobian_vectorized():
    """min ½‖x‖² + cᵀx  s.t.  ‖x‖₂ ≤ 1, the ball binding: x* = −c/‖c‖,
    ∂x*/∂c = −(I − x* x*ᵀ)/‖c‖ in closed form."""
    m = tdo.conic_diff_model()
    x = m.variable(3, name="x")
    c = m.parameter(np.zeros(3), name="c")
    m.constraint(tdo.SOC(1.0, x))
    m.minimize(0.5 * tdo.sum_squares(x) + c @ x)
    layer = tdo.Layer(m, parameters=[c], outputs=x)
    value = torch.tensor([3.0, -1.0, 2.0], dtype=F64)
    J = jacobian(layer, value, vectorize=True)
    x_star = -value / value.norm()
    closed = -(torch.eye(3, dtype=F64) - torch.outer(x_star, x_star)) / value.norm()
    torch.testing.assert_close(J, closed, atol=1e-8, rtol=1e-7)
    torch.testing.assert_close(J, jacobian(layer, value), atol=1e-12, rtol=1e-10)


def test_nonlinear_layer_jacobian_vectorized():
    """min exp(x₀) + (x₁ − 3)²  s.t.  ‖x‖² ≤ r, against central differences."""
    m = tdo.nonlinear_diff_model()
    x = m.variable(2, name="x")
    r = m.parameter(1.0, name="r")
    m.constraint(tdo.sum_squares(x) <= r)
    m.minimize(tdo.exp(x[0]) + (x[1] - 3) ** 2)
    layer = tdo.Layer(m, parameters=[r], outputs=x)
    value = torch.tensor([1.0, 2.0], dtype=F64)
    J = jacobian(layer, value, vectorize=True)
    torch.testing.assert_close(J, jacobian(layer, value), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(J, central_jacobian(layer, value), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("way", ["numpy", "broadcast", "product", "vmap"])
def test_rank_two_cotangent_products(way, monkeypatch):
    """``a bᵀ + c dᵀ``, the form of the P̄ and C̄ cotangents, is the same by each of its
    ways: numpy, torch's broadcast (small sizes), one matrix product (large sizes, and under
    vmap, where the in-place broadcast would run a slice at a time)."""
    from torchdiffopt.backends import batched_quadratic as bq
    gen = torch.Generator().manual_seed(3)
    a, c = (torch.randn(4, 5, dtype=torch.float64, generator=gen) for _ in range(2))
    b, d = (torch.randn(4, 3, dtype=torch.float64, generator=gen) for _ in range(2))
    expected = torch.einsum("bi,bj->bij", a, b) + torch.einsum("bi,bj->bij", c, d)
    if way == "numpy":
        got = torch.from_numpy(bq._rank_two(*(t.numpy() for t in (a, b, c, d))))
    elif way == "vmap":
        got = torch.vmap(lambda *t: bq._rank_two(*(s[None] for s in t))[0])(a, b, c, d)
    else:
        if way == "product":
            monkeypatch.setattr(bq, "RANK_TWO_BROADCAST_MAX_ENTRIES", 0)
        got = bq._rank_two(a, b, c, d)
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-14)
