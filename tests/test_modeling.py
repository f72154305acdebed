"""Modelling: numpy-like expressions, parameters anywhere in the data, closed-form checks."""

import time

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import torchdiffopt as tdo
from helpers import forward_derivative as forward




def test_nonlinear_parameter_combinations():
    # min x  s.t.  11 t x >= 1 + 3 p q + 5 r² + 7 s   ⇒  x = (1 + 3pq + 5r² + 7s) / (11 t)
    m = tdo.Model()
    x = m.variable(name="x")
    vals = dict(p=0.5, q=2.0, r=1.5, s=0.25, t=2.0)
    p, q, r, s, t = (m.parameter(v, name=k) for k, v in vals.items())
    m.constraint(11 * t * x >= 1 + 3 * p * q + 5 * r ** 2 + 7 * s)
    m.minimize(x)
    m.optimize()
    P, Q, R, S, T = vals.values()
    x_star = (1 + 3 * P * Q + 5 * R ** 2 + 7 * S) / (11 * T)
    assert m.value(x) == pytest.approx(x_star)
    expected = {p: 3 * Q / (11 * T), q: 3 * P / (11 * T), r: 10 * R / (11 * T),
                s: 7 / (11 * T), t: -x_star / T}
    for param, d in expected.items():
        assert forward(m, param, x) == pytest.approx(d, rel=1e-10)
    m.empty_input_sensitivities()
    m.set_reverse_variable(x, 1.0)
    m.reverse_differentiate()
    for param, d in expected.items():
        assert m.get_reverse_parameter(param) == pytest.approx(d, rel=1e-10)


def test_parameter_in_quadratic_objective():
    # min p x² - b x  ⇒  x = b / (2p),  f* = -b² / (4p)
    m = tdo.Model()
    x = m.variable(name="x")
    p, b = m.parameter(2.0, name="p"), m.parameter(3.0, name="b")
    m.minimize(p * x ** 2 - b * x)
    m.optimize()
    assert m.value(x) == pytest.approx(0.75)
    assert forward(m, p, x) == pytest.approx(-3.0 / (2 * 4.0))
    assert m.get_forward_objective() == pytest.approx(9.0 / (4 * 4.0))  # ∂f*/∂p = b²/(4p²)
    m.empty_input_sensitivities()
    m.set_reverse_objective(1.0)
    m.reverse_differentiate()
    assert m.get_reverse_parameter(b) == pytest.approx(-3.0 / 4.0)  # ∂f*/∂b = -b/(2p)
    grad = m.get_reverse_objective_function()
    # ∂f*/∂(coefficient of x²) = x*² and ∂f*/∂(coefficient of x) = x* (envelope theorem)
    assert grad.quadratic_coefficient(x, x) == pytest.approx(0.75 ** 2)
    assert grad.coefficient(x) == pytest.approx(0.75)


def test_vector_model_with_matrix_parameter():
    # min ½‖x‖² - cᵀx  s.t.  P x <= h   with P a matrix parameter, one row active
    rng = np.random.default_rng(1)
    n = 4
    m = tdo.Model()
    x = m.variable(n, name="x")
    c = m.parameter(np.ones(n), name="c")
    P = m.parameter(rng.normal(size=(2, n)), name="P")
    a = P.value[0]
    h_val = np.array([a @ np.ones(n) - 1.0, 100.0])
    h = m.parameter(h_val, name="h")
    con = m.constraint(P @ x <= h, name="con")
    m.minimize(0.5 * tdo.sum_squares(x) - tdo.dot(c, x))
    m.optimize()
    # projection of c onto {aᵀx <= h0}: x = c - λ a, λ = (aᵀc - h0)/‖a‖²
    lam = (a @ np.ones(n) - h_val[0]) / (a @ a)
    np.testing.assert_allclose(m.value(x), np.ones(n) - lam * a, atol=1e-9)
    np.testing.assert_allclose(m.dual(con), [-lam, 0.0], atol=1e-9)  # shadow price of h0
    assert m.dual(con[0]) == pytest.approx(-lam)
    # dx/dh0 = a/‖a‖²
    d = np.zeros(2)
    d[0] = 1.0
    np.testing.assert_allclose(forward(m, h, x, d), a / (a @ a), atol=1e-9)
    # dual = -λ and dλ/dh0 = -1/‖a‖²
    np.testing.assert_allclose(m.get_forward_constraint_dual(con), [1 / (a @ a), 0.0], atol=1e-9)


def test_matrix_variable_indexing_and_axis_sums():
    # transportation: min Σ C_ij X_ij  s.t. rows sum to supply, columns to demand, X >= 0
    C = np.array([[1.0, 3.0, 5.0], [4.0, 1.0, 2.0]])
    m = tdo.Model()
    X = m.variable((2, 3), lb=0.0, name="X")
    supply = m.parameter([4.0, 6.0], name="supply")
    demand = m.parameter([3.0, 3.0, 4.0], name="demand")
    m.constraint(X.sum(axis=1) == supply)
    m.constraint(X.sum(axis=0) == demand)
    m.minimize((C * X).sum())
    # total supply = total demand: one equality is redundant, and the solver says so
    with pytest.warns(tdo.DegenerateSolutionWarning, match="singular"):
        m.optimize()
    # unique optimum: with u = (0, -2), v = (1, 3, 4) the unused cells have reduced costs 1, 5
    np.testing.assert_allclose(m.value(X), [[3, 1, 0], [0, 2, 4]], atol=1e-9)
    assert m.objective_value == pytest.approx(3 + 3 + 2 + 8)
    assert m.value(X[0, 1] + X[1, 1:].sum()) == pytest.approx(7.0)
    assert m.value(X.T[2, 1]) == pytest.approx(4.0)


def test_numpy_and_sparse_matmul_and_quadratic_forms():
    rng = np.random.default_rng(2)
    n = 5
    L = rng.normal(size=(n, n))
    Q = L @ L.T + np.eye(n)
    q = rng.normal(size=n)
    A = sp.random(3, n, density=0.6, random_state=3) + sp.eye(3, n)
    b = np.ones(3)
    m = tdo.Model()
    x = m.variable(n, name="x")
    con = m.constraint(A @ x == b)
    m.minimize(0.5 * (x @ Q @ x) + q @ x)
    m.optimize()
    # equality-constrained QP, closed form from its KKT system
    Ad = A.toarray()
    K = np.block([[Q, Ad.T], [Ad, np.zeros((3, 3))]])
    sol = np.linalg.solve(K, np.r_[-q, b])
    np.testing.assert_allclose(m.value(x), sol[:n], atol=1e-9)
    np.testing.assert_allclose(m.dual(con), -sol[n:], atol=1e-9)  # ∂f*/∂b = -ν
    assert m.value(x @ Q @ x) == pytest.approx(sol[:n] @ Q @ sol[:n])


def test_maximize_and_dual_signs():
    # max x + y  s.t. x + 2y <= 4, 3x + y <= 6, x, y >= 0  ⇒ x = 1.6, y = 1.2
    m = tdo.Model()
    x, y = m.variable(lb=0.0, name="x"), m.variable(lb=0.0, name="y")
    c1 = m.constraint(x + 2 * y <= 4)
    c2 = m.constraint(3 * x + y <= 6)
    m.maximize(x + y)
    m.optimize()
    assert (m.value(x), m.value(y)) == pytest.approx((1.6, 1.2))
    # raising a <= right-hand side raises a max objective: duals >= 0
    assert (m.dual(c1), m.dual(c2)) == pytest.approx((0.4, 0.2))


def test_value_of_expressions_and_relations_in_both_directions():
    m = tdo.Model()
    x = m.variable(3, name="x")
    p = m.parameter(2.0, name="p")
    m.constraint(1.0 <= x)           # reflected comparison
    m.constraint(np.full(3, 5.0) >= x)
    m.minimize(tdo.sum(x))
    m.optimize()
    np.testing.assert_allclose(m.value(x), 1.0)
    np.testing.assert_allclose(m.value(p * x + 1), 3.0)
    assert m.value(tdo.sum_squares(x - p)) == pytest.approx(3.0)


def test_large_model_builds_from_arrays():
    """10⁴ variables and 10⁴ sparse vector rows: building and compiling is array work
    (benchmarks/build_scale.py reports the time; this bound only catches O(n²) regressions)."""
    n = 10_000
    rng = np.random.default_rng(0)
    rows, cols = rng.integers(0, n, 5 * n), rng.integers(0, n, 5 * n)
    A = sp.csr_matrix((rng.normal(size=5 * n), (rows, cols)), shape=(n, n)) + sp.eye(n)
    start = time.perf_counter()
    m = tdo.Model()
    x = m.variable(n, lb=0.0, ub=1.0, name="x")
    b = m.parameter(np.ones(n), name="b")
    c = m.parameter(np.ones(n), name="c")
    con = m.constraint(A @ x <= b)
    m.minimize(c @ x + 0.5 * tdo.sum_squares(x))
    form = m._sensitivity.pipeline().form
    data = form.data(m._sensitivity.parameter_tensors())
    elapsed = time.perf_counter() - start
    assert data.C_vals.shape[0] == A.nnz and data.m == n and data.P_vals.shape[0] == 2 * n
    assert con.shape == (n,)
    assert elapsed < 5.0


@pytest.mark.parametrize("backend", ["quadratic", "conic"])
def test_parameter_free_parts_are_evaluated_once_and_the_others_every_time(backend):
    """A compiled form keeps the coefficient forms of its parameter-free expressions
    (KeptForms) and, in the conic form, the rows when no row has a parameter: evaluations at
    new parameter values must give the same data as a form compiled afresh, whichever part
    holds the parameter."""
    rng = np.random.default_rng(3)
    A = rng.normal(size=(4, 3))

    def model(in_rows: bool):
        m = tdo.Model(backend=backend)
        x = m.variable(3, lb=-2.0, ub=2.0, name="x")
        c = m.parameter(np.ones(3), name="c")
        b = m.parameter(np.ones(4), name="b")
        m.constraint(A @ x <= (b if in_rows else np.ones(4)))
        m.constraint(x.sum() == 0.5)
        if backend == "conic":
            m.constraint(tdo.norm2(A @ x) <= 3.0)
        m.minimize(c @ x + (0.5 * tdo.sum_squares(x) if backend == "quadratic" else 0.0))
        return m, [c, b]

    for in_rows in (False, True):
        m, params = model(in_rows)
        form = m._sensitivity.pipeline().form
        for _ in range(3):
            values = {p: torch.tensor(rng.normal(size=p.shape)) for p in params}
            fresh, _ = model(in_rows)
            fresh_form = fresh._sensitivity.pipeline().form
            kept = form.data(values).values()
            again = fresh_form.data(dict(zip(fresh_form.parameters,
                                             [values[p] for p in params]))).values()
            assert len(kept) == len(again)
            for a, b in zip(kept, again):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        kept_rows = getattr(form, "_constant_rows", None)
        if backend == "conic":
            assert (kept_rows is not None) == (not in_rows)


@pytest.mark.parametrize("backend", ["quadratic", "conic"])
def test_kept_forms_hold_the_model_not_each_evaluation(backend):
    """Evaluations make nodes of their own (a product with a matrix parameter transposes
    its operands): the kept forms stay those of the model's nodes, however many calls; and
    a first evaluation under a torch.func transform keeps none of the transform's tensors."""
    rng = np.random.default_rng(4)
    X = rng.normal(size=(3, 4))
    m = tdo.Model(backend=backend)
    x = m.variable(4, lb=-1.0, ub=1.0, name="x")
    W = m.parameter(rng.normal(size=(4, 4)), name="W")
    m.constraint((X @ W) @ x <= 1.0)
    m.constraint(x.sum() == 0.25)
    m.minimize(0.5 * tdo.sum_squares(x) + x.sum() if backend == "quadratic" else x.sum())
    form = m._sensitivity.pipeline().form
    values = lambda W_value: {W: W_value}  # noqa: E731
    W0 = torch.tensor(rng.normal(size=(4, 4)))

    def first_value(W_value):
        return sum(v.sum() for v in form.data_values(W_value) if v.is_floating_point())

    torch.func.grad(first_value)(W0)  # the first evaluation, under a transform
    assert not form._kept._forms
    form.data(values(W0))
    kept = (len(form._kept._free), len(form._kept._forms))
    for _ in range(5):
        form.data(values(torch.tensor(rng.normal(size=(4, 4)))))
    assert (len(form._kept._free), len(form._kept._forms)) == kept
    tensors = [t for canon in form._kept._forms.values()
               for t in (canon.const, canon.lin.vals, canon.quad.vals)]
    assert tensors and not any(torch._C._functorch.is_functorch_wrapped_tensor(t)
                               for t in tensors)
