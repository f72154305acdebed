"""The nonlinear backend: analytic values, finite differences, adjoint identity, the layer."""

import numpy as np
import pytest
import torch

import torchdiffopt as tdo
from helpers import forward_derivative as forward




def test_equality_constrained_qp_with_bounds():
    # min ‖x‖² s.t. 6x1 + 3x2 + 2x3 = p1, p2 x1 + x2 - x3 = 1, x ≥ 0 at p = (4.5, 1).
    # x3 = 0 binds: with x3 fixed, x1, x2 solve two linear equations: 6x1 + 3x2 = p1,
    # p2 x1 + x2 = 1 ⇒ x1 = (p1 - 3)/(6 - 3 p2) = 0.5, x2 = 1 - p2 x1 = 0.5;
    # dx1/dp1 = 1/3, dx2/dp1 = -1/3; dx1/dp2 = 3 x1/(6 - 3p2) = 0.5, dx2/dp2 = -x1 - p2/2 = -1.
    m = tdo.nonlinear_diff_model()
    x = m.variable(3, lb=0.0, name="x")
    p1, p2 = m.parameter(4.5, name="p1"), m.parameter(1.0, name="p2")
    m.constraint(6 * x[0] + 3 * x[1] + 2 * x[2] == p1)
    m.constraint(p2 * x[0] + x[1] - x[2] == 1)
    m.minimize(tdo.sum_squares(x))
    m.optimize()
    np.testing.assert_allclose(m.value(x), [0.5, 0.5, 0.0], atol=1e-12)
    np.testing.assert_allclose(forward(m, p1, x), [1 / 3, -1 / 3, 0.0], atol=1e-12)
    np.testing.assert_allclose(forward(m, p2, x), [0.5, -1.0, 0.0], atol=1e-12)
    w = np.array([1.0, -2.0, 0.5])
    m.empty_input_sensitivities()
    m.set_reverse_variable(x, w)
    m.reverse_differentiate()
    assert m.get_reverse_parameter(p1) == pytest.approx(w @ [1 / 3, -1 / 3, 0.0])
    assert m.get_reverse_parameter(p2) == pytest.approx(w @ [0.5, -1.0, 0.0])


def test_parameter_inside_a_sine():
    # min 2x s.t. x sin(p) = 1 ⇒ f* = 2/sin(p), df*/dp = -2 cos(p)/sin²(p)
    m = tdo.nonlinear_diff_model()
    x = m.variable(name="x")
    p = m.parameter(1.5, name="p")
    m.constraint(x * tdo.sin(p) == 1)
    m.minimize(2 * x)
    m.optimize()
    forward(m, p)
    assert m.get_forward_objective() == pytest.approx(-2 * np.cos(1.5) / np.sin(1.5) ** 2)
    m.empty_input_sensitivities()
    m.set_reverse_objective(1.0)
    m.reverse_differentiate()
    assert m.get_reverse_parameter(p) == pytest.approx(-2 * np.cos(1.5) / np.sin(1.5) ** 2)


def test_dual_and_objective_sensitivities():
    # min 2x² + y² + xy + x + y s.t. x + y = p, x, y ≥ 0 at p = 1.  With y = p - x:
    # stationarity 4x + y + 1 + ν = 0 = 2y + x + 1 + ν ⇒ 3x = y ⇒ x = p/4, y = 3p/4;
    # dual (shadow price) = df*/dp = 5p/2... = 2.75 at p = 1 ... and d(dual)/dp = 1.75.
    m = tdo.nonlinear_diff_model()
    x, y = m.variable(lb=0.0, name="x"), m.variable(lb=0.0, name="y")
    p = m.parameter(1.0, name="p")
    c = m.constraint(x + y == p)
    m.minimize(2 * x ** 2 + y ** 2 + x * y + x + y)
    m.optimize()
    forward(m, p)
    assert m.get_forward_variable(x) == pytest.approx(0.25)
    assert m.get_forward_variable(y) == pytest.approx(0.75)
    assert m.get_forward_constraint_dual(c) == pytest.approx(1.75)
    assert m.get_forward_objective() == pytest.approx(2.75)
    assert m.dual(c) == pytest.approx(2.75)
    m.empty_input_sensitivities()
    m.set_reverse_constraint_dual(c, 1.0)
    m.reverse_differentiate()
    assert m.get_reverse_parameter(p) == pytest.approx(1.75)


def random_smooth(seed):
    """min Σ w_i exp(0.3 x_i) + ½‖x - c‖² + s·sin(x₀)  s.t.  ‖x‖² ≤ r, aᵀx = b, x ≥ -2:
    ‖c‖ is large, so the ball constraint binds."""
    rng = np.random.default_rng(seed)
    n = 4
    m = tdo.nonlinear_diff_model()
    x = m.variable(n, lb=-2.0, name="x")
    prm = {"w": m.parameter(rng.uniform(0.5, 1.5, n), name="w"),
           "c": m.parameter(3 * rng.normal(size=n) + 3.0, name="c"),
           "s": m.parameter(0.3, name="s"),
           "r": m.parameter(2.0, name="r"),
           "a": m.parameter(rng.normal(size=n), name="a"),
           "b": m.parameter(0.2, name="b")}
    ball = m.constraint(tdo.sum_squares(x) <= prm["r"], name="ball")
    plane = m.constraint(prm["a"] @ x == prm["b"], name="plane")
    m.minimize(prm["w"] @ tdo.exp(0.3 * x) + 0.5 * tdo.sum_squares(x - prm["c"])
               + prm["s"] * tdo.sin(x[0]))
    return m, x, list(prm.values()), [ball, plane]


@pytest.mark.parametrize("seed", range(4))
def test_random_smooth_problems_fd_and_adjoint(seed):
    m, x, params, cons = random_smooth(seed)

    def outputs():
        m.optimize()
        return np.concatenate([m.value(x), [m.dual(c) for c in cons], [m.objective_value]])

    base = {p: p.value.copy() for p in params}
    outputs()
    assert abs(m.dual(cons[0])) > 1e-3  # the ball binds
    rng = np.random.default_rng(seed + 50)
    v = {p: rng.normal(size=p.shape) for p in params}
    m.empty_input_sensitivities()
    for p in params:
        m.set_forward_parameter(p, v[p])
    m.forward_differentiate()
    jv = np.concatenate([m.get_forward_variable(x),
                         [m.get_forward_constraint_dual(c) for c in cons],
                         [m.get_forward_objective()]])
    eps = 1e-6
    for p in params:
        m.set_parameter_value(p, base[p] + eps * v[p])
    plus = outputs()
    for p in params:
        m.set_parameter_value(p, base[p] - eps * v[p])
    minus = outputs()
    for p in params:
        m.set_parameter_value(p, base[p])
    outputs()
    np.testing.assert_allclose(jv, (plus - minus) / (2 * eps), rtol=1e-5, atol=1e-6)

    w = rng.normal(size=jv.shape)
    m.empty_input_sensitivities()
    m.set_reverse_variable(x, w[:4])
    for k, c in enumerate(cons):
        m.set_reverse_constraint_dual(c, w[4 + k])
    m.set_reverse_objective(w[-1])
    m.reverse_differentiate()
    vjp = sum(float(np.sum(m.get_reverse_parameter(p) * v[p])) for p in params)
    assert w @ jv == pytest.approx(vjp, rel=1e-9, abs=1e-10)


def test_lp_and_qp_through_the_nonlinear_backend_match_the_quadratic_one():
    from problems import random_qp

    for kind, seed in (("lp", 1), ("qp", 2)):
        quad = random_qp(np.random.default_rng(seed), kind)
        nl = random_qp(np.random.default_rng(seed), kind)
        nl.model.backend = "nonlinear"
        nl.model._sensitivity.structure_changed()
        for prob in (quad, nl):
            prob.solve_at(prob.values)
            prob.model.empty_input_sensitivities()
            for p in prob.params:
                prob.model.set_forward_parameter(p, np.ones(p.shape))
            prob.model.forward_differentiate()
        np.testing.assert_allclose(nl.outputs(), quad.outputs(), atol=1e-8)
        np.testing.assert_allclose(nl.model.get_forward_variable(nl.x),
                                   quad.model.get_forward_variable(quad.x), atol=1e-7)


def test_functional_api_on_the_nonlinear_backend():
    m = tdo.nonlinear_diff_model()
    x, y = m.variable(name="x"), m.variable(name="y")
    cons = m.constraint(2 * x + y >= 12, name="cons")
    m.constraint(y <= 5, name="ybnd")
    m.minimize(2 * x - y + 1e-3 * tdo.exp(x - 3.5) * 0)  # the tutorial LP, via torch
    m.optimize()
    m.set_forward_constraint_function(cons, 1.0 * x - 3.0)
    m.forward_differentiate()
    assert m.get_forward_variable(x) == pytest.approx(-0.25)
    m.empty_input_sensitivities()
    m.set_reverse_variable(x, 1.0)
    m.reverse_differentiate()
    assert repr(m.get_reverse_constraint_function(cons)) == "-1.75 x - 2.5 y - 0.5"


def test_start_values_select_the_local_optimum():
    # min (x² - 1)²: two minima ±1; the start picks one, derivative of x wrt the shift p
    m = tdo.nonlinear_diff_model()
    x = m.variable(name="x", start=-0.8)
    p = m.parameter(0.0, name="p")
    m.minimize((x ** 2 - 1) ** 2 + p * x)
    m.optimize()
    assert m.value(x) == pytest.approx(-1.0)
    # stationarity 4x(x² - 1) + p = 0 ⇒ dx/dp = -1/(12x² - 4) = -1/8
    assert forward(m, p, x) == pytest.approx(-1 / 8)
    m.set_start_value(x, 0.7)
    m.optimize()
    assert m.value(x) == pytest.approx(1.0)


def test_saddle_point_is_reported():
    m = tdo.nonlinear_diff_model()
    x = m.variable(lb=-1, ub=1, name="x", start=0.0)
    m.minimize(-(x ** 2))
    with pytest.warns(tdo.DegenerateSolutionWarning, match="second-order"):
        m.optimize()


def test_locally_infeasible():
    m = tdo.nonlinear_diff_model()
    x = m.variable(2, name="x")
    m.constraint(tdo.sum_squares(x) <= 1)
    m.constraint(x[0] >= 2)
    m.minimize(x.sum())
    with pytest.raises(tdo.SolverError):
        m.optimize()
    assert m.status in ("infeasible", "solver_error")


def test_layer_on_the_nonlinear_backend():
    m, x, params, cons = random_smooth(0)
    c, r = params[1], params[3]
    layer = tdo.Layer(m, parameters=[c, r], outputs=[x, cons[0], m.objective])
    assert layer.nonlinear
    C = torch.tensor(c.value + 0.01 * np.random.default_rng(1).normal(size=(2, 4)),
                     requires_grad=True)
    R = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, b: layer(a, b), (C, R), check_forward_ad=True,
                             fast_mode=True, atol=1e-5, rtol=1e-4)
    J = layer.jacobian(C.detach(), R.detach())
    xs = layer(C, R)[0]
    g = torch.autograd.grad(xs[1, 2], C)[0]
    torch.testing.assert_close(J[0][0][1, 2], g[1])


def test_nonlinear_layer_vmap_and_failures():
    m = tdo.nonlinear_diff_model()
    x = m.variable(2, name="x")
    r = m.parameter(1.0, name="r")
    m.constraint(tdo.sum_squares(x) <= r)
    m.minimize(tdo.exp(x[0]) + (x[1] - 3) ** 2)
    layer = tdo.Layer(m, parameters=[r], outputs=x, on_failure="nan")
    R = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)  # the last: an empty disk
    out = layer(R)
    assert layer.last_status[:2] == ["optimal", "optimal"]
    assert layer.last_status[2] in ("infeasible", "solver_error")
    assert torch.isnan(out[2]).all() and torch.isfinite(out[:2]).all()
    vm = torch.func.vmap(layer)(R[:2])
    torch.testing.assert_close(vm, out[:2])
    Rg = R[:2].clone().requires_grad_()
    layer(Rg)[:, 1].sum().backward()
    # on the circle x₁ grows with r: dx₁/dr > 0 for both members
    assert (Rg.grad > 0).all()


def test_nonlinear_layer_under_torch_func_transforms():
    """The nonlinear backend's derivatives run in numpy, member by member; under torch.func
    (grad, jacrev, jacfwd, and vmap over each: per-sample gradients) they take plain seeds,
    folded or one slice at a time, and agree with backward() member by member."""
    m = tdo.nonlinear_diff_model()
    x = m.variable(2, name="x")
    r = m.parameter(1.0, name="r")
    m.constraint(tdo.sum_squares(x) <= r)
    m.minimize(tdo.exp(x[0]) + (x[1] - 3) ** 2)
    layer = tdo.Layer(m, parameters=[r], outputs=x)
    R = torch.tensor([1.0, 2.0], dtype=torch.float64)
    rows = []
    for value in R:  # d x* / d r by backward, member by member
        leaf = value.clone().requires_grad_()
        out = layer(leaf)
        rows.append(torch.stack([torch.autograd.grad(out[i], leaf, retain_graph=True)[0]
                                 for i in range(2)]))
    J = torch.stack(rows)                                                 # (2 members, 2)
    g = torch.func.grad(lambda r_: layer(r_)[1])
    torch.testing.assert_close(torch.func.vmap(g)(R), J[:, 1])
    for jac in (torch.func.jacrev, torch.func.jacfwd):
        torch.testing.assert_close(jac(layer)(R[0]), J[0])
        torch.testing.assert_close(torch.func.vmap(jac(layer))(R), J)


def test_an_unexpected_error_stays_with_its_member(monkeypatch):
    """Whatever one member's solve raises (here a LinAlgError), the others are kept."""
    m = tdo.nonlinear_diff_model()
    x = m.variable(2, name="x")
    p = m.parameter(np.zeros(2), name="p")
    m.minimize(tdo.sum((x - p) ** 4))
    layer = tdo.Layer(m, parameters=[p], outputs=x, on_failure="nan")
    P = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], dtype=torch.float64)
    solve = layer.pipeline.solve

    def failing_second(theta):
        if float(theta[0][0]) == 0.3:
            raise np.linalg.LinAlgError("SVD did not converge")
        return solve(theta)

    monkeypatch.setattr(layer.pipeline, "solve", failing_second)
    out = layer(P)
    assert layer.last_status == ["optimal", "solver_error", "optimal"]
    assert torch.isnan(out[1]).all()
    torch.testing.assert_close(out[[0, 2]], P[[0, 2]], atol=1e-4, rtol=0)
