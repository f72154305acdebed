"""Every code block of the seed tutorial (../shared/seed/diffopt-tutorial.md), with its numbers.

The expected values are the tutorial's closed-form ones: x(p, q) = (3p - 5)/q, y = 5,
objective 2x - y, so ∂x/∂p = 3/q = 1.5, ∂x/∂q = -(3p - 5)/q² = -1.75, ∂obj/∂p = 3, ∂obj/∂q = -3.5.
"""

import subprocess
import sys

import pytest

import torchdiffopt as tdo


def parametric_model():
    model = tdo.quadratic_diff_model("highs")
    x, y = model.variable(name="x"), model.variable(name="y")
    p, q = model.parameter(4.0, name="p"), model.parameter(2.0, name="q")
    cons = model.constraint(q * x + y >= 3 * p, name="cons")
    ybnd = model.constraint(y <= 5, name="ybnd")
    model.minimize(2 * x - y)
    return model, x, y, p, q, cons, ybnd


def functional_model():
    model = tdo.diff_model("highs")
    x, y = model.variable(name="x"), model.variable(name="y")
    cons = model.constraint(2 * x + y >= 12, name="cons")
    model.constraint(y <= 5, name="ybnd")
    model.minimize(2 * x - y)
    model.optimize()
    assert model.value(x) == pytest.approx(3.5) and model.value(y) == pytest.approx(5.0)
    return model, x, y, cons


def test_first_example():
    model = tdo.quadratic_diff_model("highs")
    x = model.variable(name="x")
    p = model.parameter(4.0, name="p")
    model.constraint(x >= 3 * p)
    model.minimize(2 * x)
    model.optimize()
    model.set_forward_parameter(p, 1.0)
    model.forward_differentiate()
    assert model.get_forward_variable(x) == pytest.approx(3.0)


def test_finite_differences():
    model, x, y, p, q, _, _ = parametric_model()

    def x_at(pv, qv):
        model.set_parameter_value(p, pv)
        model.set_parameter_value(q, qv)
        model.optimize()
        return model.value(x)

    h = 1e-4
    assert (x_at(4 + h, 2) - x_at(4 - h, 2)) / (2 * h) == pytest.approx(1.5, abs=1e-6)
    assert (x_at(4, 2 + h) - x_at(4, 2 - h)) / (2 * h) == pytest.approx(-1.75, abs=1e-6)


def test_parametric_forward():
    model, x, y, p, q, _, _ = parametric_model()
    model.optimize()
    assert model.value(x) == pytest.approx(3.5) and model.value(y) == pytest.approx(5.0)

    model.empty_input_sensitivities()
    model.set_forward_parameter(p, 1.0)
    model.forward_differentiate()
    assert model.get_forward_variable(x) == pytest.approx(1.5)
    assert model.get_forward_variable(y) == pytest.approx(0.0)
    assert model.get_forward_objective() == pytest.approx(3.0)

    model.empty_input_sensitivities()
    model.set_forward_parameter(q, 1.0)
    model.forward_differentiate()
    assert model.get_forward_variable(x) == pytest.approx(-1.75)
    assert model.get_forward_variable(y) == pytest.approx(0.0)
    assert model.get_forward_objective() == pytest.approx(-3.5)


def test_parametric_reverse():
    model, x, y, p, q, cons, _ = parametric_model()
    model.optimize()
    model.set_reverse_variable(x, 1.0)
    model.reverse_differentiate()
    assert model.get_reverse_parameter(p) == pytest.approx(1.5)
    assert model.get_reverse_parameter(q) == pytest.approx(-1.75)
    # "get_reverse_parameter(q) is just the x-coefficient of grad_cons"
    grad_cons = model.get_reverse_constraint_function(cons)
    assert grad_cons.coefficient(x) == pytest.approx(-1.75)
    # "... and p's comes from the constant -0.5 times ∂(-3p)/∂p = -3"
    assert grad_cons.constant * -3 == pytest.approx(1.5)

    model.empty_input_sensitivities()
    model.set_reverse_objective(1.0)
    model.reverse_differentiate()
    assert model.get_reverse_parameter(p) == pytest.approx(3.0)
    assert model.get_reverse_parameter(q) == pytest.approx(-3.5)


def test_functional_forward():
    model, x, y, cons = functional_model()
    model.set_forward_constraint_function(cons, -3.0)  # ∂/∂p
    model.forward_differentiate()
    assert model.get_forward_variable(x) == pytest.approx(1.5)
    assert model.get_forward_variable(y) == pytest.approx(0.0)

    model.empty_input_sensitivities()
    model.set_forward_constraint_function(cons, 1.0 * x)  # ∂/∂q
    model.forward_differentiate()
    assert model.get_forward_variable(x) == pytest.approx(-1.75)
    assert model.get_forward_variable(y) == pytest.approx(0.0)


def test_functional_forward_combined_seed():
    model, x, y, cons = functional_model()
    model.set_forward_constraint_function(cons, 1.0 * x - 3.0)  # ∂/∂q + ∂/∂p
    model.forward_differentiate()
    assert model.get_forward_variable(x) == pytest.approx(-0.25)
    assert model.get_forward_variable(y) == pytest.approx(0.0)


def test_functional_seeds_add_up():
    model, x, y, cons = functional_model()
    model.set_forward_constraint_function(cons, 1.0 * x)
    model.set_forward_constraint_function(cons, -3.0)
    model.forward_differentiate()
    assert model.get_forward_variable(x) == pytest.approx(-0.25)


def test_functional_reverse():
    model, x, y, cons = functional_model()
    model.set_reverse_variable(x, 1.0)
    model.reverse_differentiate()

    grad_obj = model.get_reverse_objective_function()
    assert grad_obj.coefficient(x) == 0.0 and grad_obj.coefficient(y) == 0.0
    assert grad_obj.constant == 0.0
    assert repr(grad_obj) == "0"

    grad_cons = model.get_reverse_constraint_function(cons)
    assert grad_cons.coefficient(x) == pytest.approx(-1.75)
    assert grad_cons.coefficient(y) == pytest.approx(-2.5)
    assert grad_cons.constant == pytest.approx(-0.5)
    assert repr(grad_cons) == "-1.75 x - 2.5 y - 0.5"


def test_main_prints_the_sensitivity_table():
    out = subprocess.run([sys.executable, "-m", "torchdiffopt"], capture_output=True,
                         text=True, check=True).stdout
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]]
            for line in out.splitlines() if line.split() and line.split()[0] in
            ("x", "y", "objective")}
    assert rows["x"] == pytest.approx([3.5, 1.5, -1.75])
    assert rows["y"] == pytest.approx([5.0, 0.0, 0.0])
    assert rows["objective"] == pytest.approx([2.0, 3.0, -3.5])
    assert "-1.75 x - 2.5 y - 0.5" in out
    assert "Running HiGHS" not in out


def test_parameter_and_functional_seeds_add():
    model, x, y, p, q, cons, _ = parametric_model()
    model.optimize()
    model.set_forward_parameter(p, 1.0)
    model.set_forward_constraint_function(cons, 1.0 * x)  # the tangent of a unit move of q
    model.forward_differentiate()
    assert model.get_forward_variable(x) == pytest.approx(-0.25)


def test_forward_objective_function_matches_parameter_direction():
    # min p x² - b x: a tangent x² of the objective is the direction dp = 1
    m = tdo.Model()
    x = m.variable(name="x")
    p, b = m.parameter(2.0, name="p"), m.parameter(3.0, name="b")
    m.minimize(p * x ** 2 - b * x)
    m.optimize()
    m.set_forward_objective_function(x ** 2)
    m.forward_differentiate()
    by_function = (m.get_forward_variable(x), m.get_forward_objective())
    m.empty_input_sensitivities()
    m.set_forward_parameter(p, 1.0)
    m.forward_differentiate()
    assert by_function == pytest.approx((m.get_forward_variable(x), m.get_forward_objective()))
    assert by_function[0] == pytest.approx(-3.0 / 8.0)  # x = b/(2p)
