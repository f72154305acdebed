"""Second derivatives through the solution maps: exact where the Jacobian does not move with
the input (a QP's ``q`` and ``h``, an LP's cost), refused with NotImplementedError where it
does, never a silent zero (``folding.guards_second_derivatives``)."""

import numpy as np
import pytest
import torch
from torch.autograd.functional import hessian

import torchdiffopt as tdo
from test_nonlinear import random_smooth

F64 = torch.float64
REFUSED = "second derivatives of an optimization layer"


def small_qp(seed=0):
    g = torch.Generator().manual_seed(seed)
    n, m = 4, 6
    L = torch.randn(n, n, generator=g, dtype=F64)
    Q = L @ L.mT + torch.eye(n, dtype=F64)
    G = torch.randn(m, n, generator=g, dtype=F64)
    h = torch.rand(m, generator=g, dtype=F64) + 0.5
    q = torch.randn(n, generator=g, dtype=F64)
    return Q, q, G, h


def gradient_differences(grad, t, step=1e-6):
    """The Jacobian of ``grad`` (a gradient function of ``t``) by central differences."""
    cols = []
    for i in range(t.numel()):
        e = torch.zeros_like(t).flatten()
        e[i] = step
        e = e.reshape(t.shape)
        cols.append((grad(t + e) - grad(t - e)).flatten() / (2 * step))
    return torch.stack(cols, -1)


def test_qp_hessians_in_q_and_h_are_exact():
    """``x*`` is affine in ``q`` and ``h`` on an active set: the Hessian of a nonlinear loss
    of ``x*`` in them (through ``create_graph``) matches differences of its gradient."""
    Q, q, G, h = small_qp()
    w = torch.arange(1.0, 5.0, dtype=F64)

    def loss(q_, h_):
        x = tdo.functional.qp(Q, q_, G=G, h=h_)
        return (x ** 2 * w).sum()

    H = hessian(loss, (q, h))

    def grad_q(q_):
        q_ = q_.clone().requires_grad_()
        return torch.autograd.grad(loss(q_, h), q_)[0]

    def grad_h(h_):
        h_ = h_.clone().requires_grad_()
        return torch.autograd.grad(loss(q, h_), h_)[0]
    torch.testing.assert_close(H[0][0], gradient_differences(grad_q, q), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(H[1][1], gradient_differences(grad_h, h), atol=1e-6, rtol=1e-5)
    assert float(H[0][0].abs().max()) > 1e-2


def test_qp_hessians_in_the_kkt_matrix_and_of_the_optimal_value_are_refused():
    Q, q, G, h = small_qp(1)
    with pytest.raises(NotImplementedError, match=REFUSED):
        hessian(lambda Q_: tdo.functional.qp(Q_, q, G=G, h=h).sum(), Q)
    with pytest.raises(NotImplementedError, match=REFUSED):
        hessian(lambda G_: tdo.functional.qp(Q, q, G=G_, h=h).sum(), G)
    m = tdo.quadratic_diff_model()
    x = m.variable(4)
    c = m.parameter(np.zeros(4))
    m.constraint(G.numpy() @ x <= h.numpy())
    m.minimize(0.5 * x @ Q.numpy() @ x + c @ x)
    layer = tdo.Layer(m, parameters=[c], outputs=m.objective)
    # ∂f*/∂c = x*(c): its derivative in c is x*'s Jacobian, not zero
    with pytest.raises(NotImplementedError, match=REFUSED):
        hessian(lambda c_: layer(c_), q)


def test_conic_hessians():
    """On a second-order cone the Jacobian moves with the cost (x* = -c/‖c‖ on the unit
    ball): refused. On an LP in conic form x* is piecewise constant in c: zero, exactly."""
    n = 3
    ball = tdo.conic_diff_model()
    x = ball.variable(n)
    c = ball.parameter(np.zeros(n))
    ball.constraint(tdo.norm2(x) <= 1.0)
    ball.minimize(c @ x)
    layer = tdo.Layer(ball, parameters=[c], outputs=x)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    c0 = torch.tensor([0.3, -1.0, 0.8], dtype=F64)
    with pytest.raises(NotImplementedError, match=REFUSED):
        hessian(lambda c_: (layer(c_) * w).sum(), c0)
    # the optimal value f* = -‖c‖: its gradient -c/‖c‖ by the envelope theorem, its
    # Hessian (which needs how the solution moves) refused
    value = tdo.Layer(ball, parameters=[c], outputs=ball.objective)
    leaf = c0.clone().requires_grad_()
    (g,) = torch.autograd.grad(value(leaf), leaf)
    torch.testing.assert_close(g, -c0 / c0.norm(), atol=1e-10, rtol=0)
    with pytest.raises(NotImplementedError, match=REFUSED):
        hessian(value, c0)
    lp = tdo.conic_diff_model()
    y = lp.variable(n, lb=0.0, ub=1.0)
    d = lp.parameter(np.zeros(n))
    lp.minimize(d @ y)
    box = tdo.Layer(lp, parameters=[d], outputs=y)
    torch.testing.assert_close(hessian(lambda d_: (box(d_) * w).sum(), c0),
                               torch.zeros(n, n, dtype=F64))


def test_nonlinear_hessian_is_refused():
    m, x, params, _ = random_smooth(0)
    c = params[1]
    layer = tdo.Layer(m, parameters=[c], outputs=x)
    with pytest.raises(NotImplementedError, match=REFUSED):
        hessian(lambda c_: layer(c_).square().sum(), torch.tensor(c.value, dtype=F64))


def test_seed_derivatives_give_jacobian_vector_products():
    """The double-backward way to ``J u`` (differentiate ``Jᵀw`` in ``w``) on the QP and
    conic layers is not a second derivative: exact, against forward mode."""
    Q, q, G, h = small_qp(2)
    ball = tdo.conic_diff_model()
    x = ball.variable(3)
    c = ball.parameter(np.zeros(3))
    ball.constraint(tdo.norm2(x) <= 1.0)
    ball.minimize(c @ x)
    cases = [(lambda q_: tdo.functional.qp(Q, q_, G=G, h=h), q),
             (tdo.Layer(ball, parameters=[c], outputs=x), torch.tensor([0.3, -1.0, 0.8],
                                                                         dtype=F64))]
    for f, theta in cases:
        leaf = theta.clone().requires_grad_()
        out = f(leaf)
        seed = torch.zeros_like(out, requires_grad=True)
        (g,) = torch.autograd.grad(out, leaf, seed, create_graph=True)
        u = torch.randn(theta.shape, dtype=F64, generator=torch.Generator().manual_seed(0))
        (Ju,) = torch.autograd.grad((g * u).sum(), seed)
        _, tangent = torch.func.jvp(f, (theta,), (u,))
        torch.testing.assert_close(Ju, tangent, atol=1e-10, rtol=1e-8)
