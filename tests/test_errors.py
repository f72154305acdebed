"""Bad input gets a clear error naming the problem, never a silent zero or NaN."""

import importlib.util
import sys

import numpy as np
import pytest
import torch

import torchdiffopt as tdo

HAS_CLARABEL = importlib.util.find_spec("clarabel") is not None


def small_model():
    m = tdo.Model()
    x = m.variable(2, name="x")
    p = m.parameter(np.array([1.0, 2.0]), name="p")
    c = m.constraint(x >= p, name="c")
    m.minimize(tdo.sum_squares(x))
    return m, x, p, c


def test_infeasible():
    m = tdo.Model()
    x = m.variable(name="x")
    m.constraint(x >= 1)
    m.constraint(x <= 0)
    m.minimize(x)
    with pytest.raises(tdo.InfeasibleError, match="infeasible"):
        m.optimize()
    assert m.status == "infeasible"
    with pytest.raises(tdo.DifferentiationError, match="optimize"):
        m.forward_differentiate()


def test_unbounded():
    m = tdo.Model()
    x = m.variable(name="x")
    m.constraint(x <= 3)
    m.minimize(x)
    with pytest.raises(tdo.UnboundedError, match="unbounded"):
        m.optimize()
    assert m.status == "unbounded"
    with pytest.raises(tdo.DifferentiationError):
        m.reverse_differentiate()


@pytest.mark.parametrize("sense", ["min", "max"])
def test_nonconvex_objective(sense):
    m = tdo.Model()
    x = m.variable(2, lb=-1, ub=1, name="x")
    if sense == "min":
        m.minimize(x[0] ** 2 - x[1] ** 2)
    else:
        m.maximize(x[0] ** 2)
    with pytest.raises(tdo.NonconvexError, match="nonconvex objective"):
        m.optimize()
    assert m.status == "nonconvex"


def test_nan_parameter():
    m = tdo.Model()
    with pytest.raises(ValueError, match="NaN"):
        m.parameter(float("nan"), name="bad")
    _, _, p, _ = small_model()
    m, x, p, c = small_model()
    with pytest.raises(ValueError, match="'p'.*NaN"):
        m.set_parameter_value(p, [1.0, np.nan])
    with pytest.raises(ValueError, match="NaN"):
        m.set_forward_parameter(p, [np.inf, 0.0])


def test_shape_mismatch():
    m, x, p, c = small_model()
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        m.set_parameter_value(p, [1.0, 2.0, 3.0])
    m.optimize()
    with pytest.raises(ValueError, match="shape"):
        m.set_forward_parameter(p, 1.0)
    with pytest.raises(ValueError, match="shape"):
        m.set_reverse_variable(x, np.ones(3))
    with pytest.raises(ValueError, match="shape"):
        m.set_reverse_constraint_dual(c, np.ones(5))
    with pytest.raises(ValueError, match="mismatch"):
        np.ones((3, 3)) @ x
    with pytest.raises(ValueError):
        x + np.ones(3)


def test_differentiate_before_optimize():
    m, x, p, c = small_model()
    m.set_forward_parameter(p, [1.0, 0.0])
    with pytest.raises(tdo.DifferentiationError, match="call optimize"):
        m.forward_differentiate()
    with pytest.raises(tdo.DifferentiationError, match="call optimize"):
        m.reverse_differentiate()
    with pytest.raises(tdo.DifferentiationError, match="call optimize"):
        m.value(x)


def test_read_before_differentiate():
    m, x, p, c = small_model()
    m.optimize()
    with pytest.raises(tdo.DifferentiationError, match="forward_differentiate"):
        m.get_forward_variable(x)
    with pytest.raises(tdo.DifferentiationError, match="reverse_differentiate"):
        m.get_reverse_parameter(p)
    with pytest.raises(tdo.DifferentiationError, match="reverse_differentiate"):
        m.get_reverse_constraint_function(c)


def test_stale_solution_after_parameter_change():
    m, x, p, c = small_model()
    m.optimize()
    m.set_forward_parameter(p, [1.0, 0.0])
    m.forward_differentiate()
    m.set_parameter_value(p, [2.0, 2.0])
    with pytest.raises(tdo.DifferentiationError, match="call optimize"):
        m.forward_differentiate()
    with pytest.raises(tdo.DifferentiationError, match="forward_differentiate"):
        m.get_forward_variable(x)
    m.optimize()  # the seed persisted
    m.forward_differentiate()
    np.testing.assert_allclose(m.get_forward_variable(x), [1.0, 0.0])


def test_quadratic_constraint_rejected_by_quadratic_backend():
    m = tdo.quadratic_diff_model()
    x = m.variable(name="x")
    m.constraint(x ** 2 <= 1)
    m.minimize(x)
    with pytest.raises(ValueError, match="quadratic backend takes linear constraints"):
        m.optimize()


def test_nonlinear_expressions_rejected_by_quadratic_backend():
    m = tdo.quadratic_diff_model()
    x = m.variable(lb=1, ub=2, name="x")
    m.minimize((x * x) * x + tdo.sin(x))
    with pytest.raises(ValueError, match="nonlinear.*backend='nonlinear'"):
        m.optimize()


def test_objects_of_another_model():
    m1, x1, p1, c1 = small_model()
    m2, x2, p2, c2 = small_model()
    m2.optimize()
    with pytest.raises(ValueError, match="another model"):
        m2.set_forward_parameter(p1, [1.0, 0.0])
    with pytest.raises(ValueError, match="another model"):
        m2.dual(c1)


def test_unknown_solver_and_backend():
    m, x, p, c = small_model()
    m.solver = "nosuchsolver"
    with pytest.raises(ValueError, match="unknown solver"):
        m.optimize()
    with pytest.raises(ValueError, match="unknown backend"):
        tdo.Model(backend="magic")


def test_bound_errors():
    m = tdo.Model()
    with pytest.raises(ValueError, match="lower bound above"):
        m.variable(2, lb=[0, 2], ub=1)
    with pytest.raises(ValueError, match="NaN"):
        m.variable(lb=float("nan"))
    # infinite bounds that no value meets (they were read as no bound)
    with pytest.raises(ValueError, match="no value meets"):
        m.variable(2, lb=np.inf)
    with pytest.raises(ValueError, match="no value meets"):
        m.variable(ub=-np.inf)


def test_missing_clarabel_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "clarabel", None)  # makes `import clarabel` fail
    m = tdo.conic_diff_model("clarabel")
    x = m.variable(2)
    m.constraint(tdo.SOC(1.0, x))
    m.minimize(x.sum())
    with pytest.raises(ImportError, match="pip install clarabel"):
        m.optimize()
    with pytest.raises(ImportError, match="pip install clarabel"):
        tdo.Layer(m, [], x, solver="clarabel")
    one = torch.ones(1, 1, dtype=torch.float64)
    with pytest.raises(ImportError, match=r"torchdiffopt\[clarabel\]"):
        tdo.functional.conic(one, one[0], one[0], {"l": 1}, solver="clarabel")


@pytest.mark.parametrize("solver", ["highs", "scs", "daqp", pytest.param(
    "clarabel", marks=pytest.mark.skipif(not HAS_CLARABEL, reason="clarabel not installed"))])
def test_infeasible_and_unbounded_qp_per_solver(solver):
    m = tdo.Model(solver=solver)
    x = m.variable(2, name="x")
    m.constraint(x.sum() >= 3)
    m.constraint(x <= 1)
    m.minimize(tdo.sum_squares(x))
    with pytest.raises(tdo.InfeasibleError):
        m.optimize()
    m2 = tdo.Model(solver=solver)
    y = m2.variable(2, name="y")
    m2.constraint(y[0] >= 0)
    m2.minimize(y[0] ** 2 - y[1])
    with pytest.raises(tdo.UnboundedError):
        m2.optimize()


def test_overflowing_data_fail_with_an_error_not_nan():
    """Finite data so large that the point overflows (a NaN KKT residual) fail their member
    with a SolverError, where ``residual > tolerance`` used to let NaN outputs pass; the
    other members of the batch are solved."""
    gen = torch.Generator().manual_seed(4)
    L = torch.randn(4, 4, dtype=torch.float64, generator=gen)
    P = L @ L.T + torch.eye(4, dtype=torch.float64)
    G = torch.randn(2, 4, dtype=torch.float64, generator=gen)
    h = torch.rand(2, dtype=torch.float64, generator=gen) + 1
    q = torch.randn(2, 4, dtype=torch.float64, generator=gen)
    q[0, :2] = 1e308
    with pytest.raises(tdo.SolverError, match=r"batch members \[0\]"):
        tdo.functional.qp(P, q[:1], G=G, h=h, solver="qpth")
    with pytest.raises(tdo.SolverError, match=r"batch members \[0\]"):
        tdo.functional.qp(P, q[0], G=G, h=h)  # the single-problem path, then the batched one
    x = tdo.functional.qp(P, q, G=G, h=h, on_failure="nan")
    assert torch.isnan(x[0]).all() and torch.isfinite(x[1]).all()
