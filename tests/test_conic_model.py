"""Cone programs through the modelling API: cones as constraints, norm atoms, the conic
backend behind the sensitivity API and the layer.

Acceptance values are derived by hand in the docstrings. Random SOCPs, SDPs, exponential-
and power-cone programs are the known-solution programs of test_conic.py written as models
(every piece of data a parameter); their derivatives are checked against central finite
differences of re-solved models and for the adjoint identity ⟨w, Jv⟩ = ⟨Jᵀw, v⟩.
"""

import math

import numpy as np
import pytest
import torch

import torchdiffopt as tdo
from helpers import central_difference, forward_derivative as forward
from torchdiffopt.backends.cones import ConeDims, smat
from torchdiffopt.pipelines import ConicPipeline, QuadraticPipeline, pipeline_for

SQRT2 = math.sqrt(2.0)


def reverse(model, **seeds):
    """Seed ``variable=(var, seed)``, ``dual=(con, seed)`` or ``objective=seed`` alone and
    differentiate backward."""
    model.empty_input_sensitivities()
    if "variable" in seeds:
        model.set_reverse_variable(*seeds["variable"])
    if "dual" in seeds:
        model.set_reverse_constraint_dual(*seeds["dual"])
    if "objective" in seeds:
        model.set_reverse_objective(seeds["objective"])
    model.reverse_differentiate()


# ---------------------------------------------------------------- acceptance values

def test_soc_example_reverse_gradients_of_the_cone_constants():
    """min x s.t. y ≥ 1/√2, t = 1, (t, x, y) ∈ SOC, with parameters p placed as the constants
    of the cone's arguments: √((x + p₁)² + (y + p₂)²) ≤ 1 + p₀ (t = 1). At p = 0 the optimum
    is y = 1/√2 (binding), x* = -p₁ - √((1 + p₀)² - (1/√2 + p₂)²) = -1/√2, so
    ∂x*/∂p₀ = -(1 + p₀)/√(…) = -√2, ∂x*/∂p₁ = -1, ∂x*/∂p₂ = (1/√2 + p₂)/√(…) = 1.
    The cone's dual is the shadow price ∂f*/∂r of the shift (t, x, y) - r ∈ SOC, i.e. -∂f*/∂p
    = (√2, 1, -1) (f* = x*), which lies on the cone's boundary."""
    m = tdo.conic_diff_model()
    v = m.variable(3, name="v")  # (t, x, y)
    p = m.parameter(np.zeros(3), name="p")
    m.constraint(v[2] >= 1 / SQRT2)
    m.constraint(v[0] == 1)
    soc = m.constraint(tdo.SOC(v[0] + p[0], v[1:] + p[1:]), name="soc")
    m.minimize(v[1])
    m.optimize()
    np.testing.assert_allclose(m.value(v), [1, -1 / SQRT2, 1 / SQRT2], atol=1e-13)
    np.testing.assert_allclose(m.dual(soc), [SQRT2, 1, -1], atol=1e-12)
    reverse(m, variable=(v, [0.0, 1.0, 0.0]))
    np.testing.assert_allclose(m.get_reverse_parameter(p), [-SQRT2, -1, 1], atol=1e-12)
    grad = m.get_reverse_constraint_function(soc)
    np.testing.assert_allclose(grad.constant, [-SQRT2, -1, 1], atol=1e-12)
    for i, want in enumerate([-SQRT2, -1, 1]):  # forward mode: one direction each
        assert forward(m, p, v, np.eye(3)[i])[1] == pytest.approx(want, abs=1e-12)


def test_psd_2x2_off_diagonal_constant_and_its_dual():
    """min t s.t. [[t, 1+θ], [1+θ, t]] ⪰ 0: t* = |1 + θ|, dt/dθ = 1 at θ = 0. The dual Y ⪰ 0
    has tr Y = 1 (stationarity in t) and Y ⊥ X* = 11ᵀ, so Y = ½[[1, -1], [-1, 1]], returned
    as a symmetric matrix; it is the shadow price of shifting the matrix (X - R ⪰ 0)."""
    m = tdo.conic_diff_model()
    t = m.variable(name="t")
    theta = m.parameter(0.0, name="theta")
    psd = m.constraint(tdo.PSD(t * np.eye(2) + (1 + theta) * (1 - np.eye(2))))
    m.minimize(t)
    m.optimize()
    assert m.value(t) == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(m.dual(psd), [[0.5, -0.5], [-0.5, 0.5]], atol=1e-12)
    assert forward(m, theta, t) == pytest.approx(1.0, abs=1e-10)
    assert m.get_forward_objective() == pytest.approx(1.0, abs=1e-10)
    reverse(m, variable=(t, 1.0))
    assert m.get_reverse_parameter(theta) == pytest.approx(1.0, abs=1e-10)
    # the same derivative through the data: dX = θ-direction (off-diagonal ones)
    m.empty_input_sensitivities()
    m.set_forward_constraint_function(psd, 1 - np.eye(2))
    m.forward_differentiate()
    assert m.get_forward_variable(t) == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("p0", [1.0, 4.0])
def test_psd_parameter_in_coefficient_and_constant(p0):
    """min x s.t. [[p·x, p], [p, x]] ⪰ 0 (p > 0): p·x ≥ 0 and p x² ≥ p², so x* = √p and
    dx/dp = 1/(2√p): 0.5 at p = 1 (and 0.25 at p = 4). p enters A and b."""
    m = tdo.conic_diff_model()
    x = m.variable(name="x")
    p = m.parameter(p0, name="p")
    E = np.eye(2)
    m.constraint(tdo.PSD((p * x) * np.outer(E[0], E[0]) + p * (1 - E) + x * np.outer(E[1], E[1])))
    m.minimize(x)
    m.optimize()
    assert m.value(x) == pytest.approx(math.sqrt(p0), abs=1e-12)
    assert forward(m, p, x) == pytest.approx(0.5 / math.sqrt(p0), abs=1e-10)
    reverse(m, variable=(x, 1.0))
    assert m.get_reverse_parameter(p) == pytest.approx(0.5 / math.sqrt(p0), abs=1e-10)


def test_psd_3x3_triangle_constants():
    """min x s.t. xI + B ⪰ 0, B = 11ᵀ - I: eigenvalues x - 1 (twice), x + 2, so x* = 1.
    Raising all six lower-triangle constants by one (the symmetric B + 11ᵀ) gives eigenvalues
    x - 1, x - 1, x + 5: dx = 0. Off-diagonals only: (x - 1 - ε)I + (1 + ε)11ᵀ, dx = +1;
    diagonal only: dx = -1. The dual is not unique (M singular: warned), but these directions
    keep a solution path, so they are exact; through a matrix parameter B and through the
    functional API alike. Reverse: ∂x*/∂B is the minimum-norm element, (11ᵀ - 3I)/6
    (symmetric, pairing to 0, +1, -1 with the three directions)."""
    m = tdo.conic_diff_model()
    x = m.variable(name="x")
    B = m.parameter(np.ones((3, 3)) - np.eye(3), name="B")
    psd = m.constraint(tdo.PSD(x * np.eye(3) + B))
    m.minimize(x)
    with pytest.warns(tdo.DegenerateSolutionWarning, match="singular"):
        m.optimize()
    assert m.value(x) == pytest.approx(1.0, abs=1e-12)
    for direction, want in ((np.ones((3, 3)), 0.0), (1 - np.eye(3), 1.0), (np.eye(3), -1.0)):
        assert forward(m, B, x, direction) == pytest.approx(want, abs=1e-10)
        m.empty_input_sensitivities()
        m.set_forward_constraint_function(psd, direction)
        m.forward_differentiate()
        assert m.get_forward_variable(x) == pytest.approx(want, abs=1e-10)
    reverse(m, variable=(x, 1.0))
    gB = m.get_reverse_parameter(B)
    np.testing.assert_allclose(gB, (np.ones((3, 3)) - 3 * np.eye(3)) / 6, atol=1e-10)
    np.testing.assert_allclose(m.get_reverse_constraint_function(psd).constant, gB, atol=1e-12)


def test_exp_cone_examples():
    """min z s.t. (p, 1, z) ∈ K_exp: eᵖ ≤ z, so z* = eᵖ and dz/dp = eᵖ.
    max x s.t. (x, 1, q) ∈ K_exp: eˣ ≤ q, so x* = log q and dx/dq = 1/q."""
    m = tdo.conic_diff_model()
    z = m.variable(name="z")
    p = m.parameter(0.3, name="p")
    m.constraint(tdo.ExpCone(p, 1.0, z))
    m.minimize(z)
    m.optimize()
    assert m.value(z) == pytest.approx(math.exp(0.3), abs=1e-12)
    assert forward(m, p, z) == pytest.approx(math.exp(0.3), abs=1e-10)

    m = tdo.conic_diff_model()
    x = m.variable(name="x")
    q = m.parameter(2.0, name="q")
    m.constraint(tdo.ExpCone(x, 1.0, q))
    m.maximize(x)
    m.optimize()
    assert m.value(x) == pytest.approx(math.log(2.0), abs=1e-12)
    assert forward(m, q, x) == pytest.approx(0.5, abs=1e-10)
    reverse(m, variable=(x, 1.0))
    assert m.get_reverse_parameter(q) == pytest.approx(0.5, abs=1e-10)


def test_exp_cones_broadcast_one_cone_per_entry():
    """min Σ zᵢ s.t. (pᵢ, 1, zᵢ) ∈ K_exp: zᵢ* = e^{pᵢ} and ∂f*/∂pᵢ = e^{pᵢ}; the constraint
    (and its dual) has shape (3, 3), row i the cone (pᵢ, 1, zᵢ)."""
    m = tdo.conic_diff_model()
    z = m.variable(3, name="z")
    p = m.parameter(np.array([-0.5, 0.0, 0.7]), name="p")
    cone = m.constraint(tdo.ExpCone(p, 1.0, z))
    m.minimize(z.sum())
    m.optimize()
    assert cone.shape == (3, 3) and m.dual(cone).shape == (3, 3)
    np.testing.assert_allclose(m.value(z), np.exp(p.value), atol=1e-12)
    reverse(m, objective=1.0)
    np.testing.assert_allclose(m.get_reverse_parameter(p), np.exp(p.value), atol=1e-10)


def test_rotated_soc_and_power_cone():
    """min u s.t. 2·u·p ≥ ‖q‖² (rotated SOC with parameters as arguments): u* = ‖q‖²/(2p),
    ∂u/∂p = -‖q‖²/(2p²), ∂u/∂q = q/p. max z s.t. (p, 1, z) ∈ K_pow(α): z* = p^α,
    dz/dp = α p^(α-1)."""
    m = tdo.conic_diff_model()
    u = m.variable(name="u")
    p = m.parameter(2.0, name="p")
    q = m.parameter(np.array([3.0, 4.0]), name="q")
    m.constraint(tdo.RotatedSOC(u, p, q))
    m.minimize(u)
    m.optimize()
    assert m.value(u) == pytest.approx(25 / 4, abs=1e-11)
    assert forward(m, p, u) == pytest.approx(-25 / 8, abs=1e-9)
    reverse(m, variable=(u, 1.0))
    np.testing.assert_allclose(m.get_reverse_parameter(q), [1.5, 2.0], atol=1e-9)

    alpha = 0.3
    m = tdo.conic_diff_model()
    z = m.variable(name="z")
    p = m.parameter(2.0, name="p")
    m.constraint(tdo.PowerCone(p, 1.0, z, alpha))
    m.maximize(z)
    m.optimize()
    assert m.value(z) == pytest.approx(2.0 ** alpha, abs=1e-11)
    assert forward(m, p, z) == pytest.approx(alpha * 2.0 ** (alpha - 1), abs=1e-9)


def test_psd_variable():
    """min ⟨C, X⟩ s.t. tr X = 1, X ⪰ 0 (a psd=True variable): f* = λ_min(C), X* = vvᵀ for
    its unit eigenvector v, and ∂f*/∂C = vvᵀ."""
    m = tdo.conic_diff_model()
    X = m.variable((3, 3), psd=True, name="X")
    C = m.parameter(np.diag([1.0, 2.0, 3.0]) + 0.1, name="C")
    m.constraint(tdo.sum(X * np.eye(3)) == 1)
    m.minimize(tdo.sum(C * X))
    m.optimize()
    lam, V = np.linalg.eigh(C.value)
    assert m.objective_value == pytest.approx(lam[0], abs=1e-11)
    np.testing.assert_allclose(m.value(X), np.outer(V[:, 0], V[:, 0]), atol=1e-10)
    reverse(m, objective=1.0)
    np.testing.assert_allclose(m.get_reverse_parameter(C), np.outer(V[:, 0], V[:, 0]),
                               atol=1e-10)
    assert [c.name for c in m.constraints[:2]] == ["X_symmetric", "X_psd"]


# ---------------------------------------------------------------- norm atoms

@pytest.mark.parametrize("atom, scale", [(tdo.norm2, math.sqrt), (tdo.norm_inf, lambda n: n)])
def test_norm_objective_projection_onto_a_hyperplane(atom, scale):
    """min ‖x - a‖ s.t. Σx = s: x* = a - δ1 with δ = (Σa - s)/n for both norms (any other
    point moves some coordinate further); f* = |Σa - s|/√n (2-norm) or /n (∞-norm), so the
    equality's dual is ∂f*/∂s = -sign(Σa - s)/√n (or /n), and ∂x*/∂a = I - 11ᵀ/n."""
    n = 4
    a0 = np.array([1.0, -2.0, 0.5, 3.0])
    m = tdo.conic_diff_model()
    x = m.variable(n, name="x")
    a = m.parameter(a0, name="a")
    s = m.parameter(1.0, name="s")
    plane = m.constraint(x.sum() == s)
    m.minimize(atom(x - a))
    m.optimize()
    delta = (a0.sum() - 1.0) / n
    np.testing.assert_allclose(m.value(x), a0 - delta, atol=1e-11)
    assert m.objective_value == pytest.approx(abs(a0.sum() - 1.0) / scale(n), abs=1e-11)
    assert m.dual(plane) == pytest.approx(-1 / scale(n), abs=1e-10)
    assert m.value(atom(x - a)) == pytest.approx(m.objective_value, abs=1e-11)
    w = np.array([1.0, 2.0, -1.0, 0.5])
    reverse(m, variable=(x, w))
    np.testing.assert_allclose(m.get_reverse_parameter(a), w - w.mean(), atol=1e-10)
    assert m.get_reverse_parameter(s) == pytest.approx(w.mean(), abs=1e-10)


def test_norm1_with_a_parameter_weight_is_soft_thresholding():
    """min λ‖x‖₁ + ½‖x - a‖²: xᵢ = sign(aᵢ)·max(|aᵢ| - λ, 0), so ∂xᵢ/∂λ = -sign(aᵢ) on the
    support and 0 off it, ∂x/∂a = diag(support)."""
    a0 = np.array([2.0, -0.3, -1.5, 0.4])
    m = tdo.diff_model()
    x = m.variable(4, name="x")
    a = m.parameter(a0, name="a")
    lam = m.parameter(1.0, name="lam")
    m.minimize(lam * tdo.norm1(x) + 0.5 * tdo.sum_squares(x - a))
    m.optimize()
    assert isinstance(pipeline_for(m), ConicPipeline)
    support = np.abs(a0) > 1.0
    np.testing.assert_allclose(m.value(x), np.sign(a0) * np.maximum(np.abs(a0) - 1, 0),
                               atol=1e-11)
    np.testing.assert_allclose(forward(m, lam, x), -np.sign(a0) * support, atol=1e-10)
    reverse(m, variable=(x, np.ones(4)))
    np.testing.assert_allclose(m.get_reverse_parameter(a), support.astype(float), atol=1e-10)


def test_norm2_in_a_constraint():
    """max cᵀx s.t. ‖x‖₂ ≤ r: x* = r c/‖c‖, f* = r‖c‖, so the dual (∂f*/∂r) is ‖c‖ and
    dx*/dr = c/‖c‖; written r >= norm2(x) it is the same constraint."""
    c0 = np.array([1.0, 2.0, 2.0])
    for flip in (False, True):
        m = tdo.conic_diff_model()
        x = m.variable(3, name="x")
        r = m.parameter(1.5, name="r")
        ball = m.constraint(r >= tdo.norm2(x) if flip else tdo.norm2(x) <= r)
        m.maximize(c0 @ x)
        m.optimize()
        np.testing.assert_allclose(m.value(x), 1.5 * c0 / 3, atol=1e-11)
        assert m.dual(ball) == pytest.approx(-3.0 if flip else 3.0, abs=1e-10)
        np.testing.assert_allclose(forward(m, r, x), c0 / 3, atol=1e-10)
        assert m.get_forward_objective() == pytest.approx(3.0, abs=1e-10)


def test_inactive_norm_bound_is_not_degenerate():
    """min ‖x - a‖² s.t. ‖x‖₂ ≤ 5 at ‖a‖ < 5: x* = a, dx*/da = I, dual 0. The lone norm2 row
    compiles to one SOC (no epigraph variable), so the solution stays unique and no
    DegenerateSolutionWarning is raised (the test configuration turns it into an error)."""
    m = tdo.conic_diff_model()
    x = m.variable(2, name="x")
    a = m.parameter(np.array([0.1, 0.2]), name="a")
    ball = m.constraint(tdo.norm2(x) <= 5.0)
    m.minimize(tdo.sum_squares(x - a))
    m.optimize()
    np.testing.assert_allclose(m.value(x), [0.1, 0.2], atol=1e-12)
    assert m.dual(ball) == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(forward(m, a, x, np.array([1.0, -2.0])), [1.0, -2.0], atol=1e-12)


@pytest.mark.parametrize("form", ["inlined <=", "inlined >=", "shared epigraph"])
def test_weighted_norm_in_a_constraint_fd_and_adjoint(form):
    """min ½‖x - c‖² s.t. w·‖x - z‖₂ + gᵀx ≤ h (binding), every piece of data a parameter,
    the norm's weight w included: forward mode against central finite differences, reverse
    mode by the adjoint identity, and the functional API on the row by its own adjoint
    identity. Written as ``<=``, as ``>=``, or with the atom shared by two rows (then it keeps
    its epigraph variable)."""
    rng = np.random.default_rng(3)
    m = tdo.conic_diff_model()
    x = m.variable(3, name="x")
    prm = {"c": m.parameter(np.array([2.0, -1.0, 1.5]), name="c"),
           "w": m.parameter(1.3, name="w"), "z": m.parameter(rng.normal(size=3), name="z"),
           "g": m.parameter(rng.normal(size=3), name="g"), "h": m.parameter(0.8, name="h")}
    norm = tdo.norm2(x - prm["z"])
    lhs = prm["w"] * norm + prm["g"] @ x
    row = m.constraint(prm["h"] >= lhs if form == "inlined >=" else lhs <= prm["h"])
    if form == "shared epigraph":
        m.constraint(norm <= 50.0)
    m.minimize(0.5 * tdo.sum_squares(x - prm["c"]))
    params = list(prm.values())

    def outputs():
        m.optimize()
        return np.concatenate([m.value(x), [m.dual(row), m.objective_value]])

    base = outputs()
    assert abs(base[3]) > 1e-2  # the row binds
    v = {p: rng.normal(size=p.shape) for p in params}
    m.empty_input_sensitivities()
    for p in params:
        m.set_forward_parameter(p, v[p])
    m.forward_differentiate()
    jv = np.r_[m.get_forward_variable(x), m.get_forward_constraint_dual(row),
               m.get_forward_objective()]
    fd = central_difference(m, v, outputs)
    outputs()
    np.testing.assert_allclose(jv, fd, atol=1e-7)
    w = rng.normal(size=5)
    reverse(m, variable=(x, w[:3]), dual=(row, w[3]), objective=w[4])
    vjp = sum(float(np.sum(m.get_reverse_parameter(p) * v[p])) for p in params)
    assert w @ jv == pytest.approx(vjp, rel=1e-10, abs=1e-12)
    # functional API on the row: ⟨x̄, dx⟩ = ⟨C̄, dC⟩ + c̄0·dc0
    coef, const = rng.normal(size=3), 0.7
    m.empty_input_sensitivities()
    m.set_forward_constraint_function(row, coef @ x + const)
    m.forward_differentiate()
    lhs_value = w[:3] @ m.get_forward_variable(x)
    reverse(m, variable=(x, w[:3]))
    grad = m.get_reverse_constraint_function(row)
    assert lhs_value == pytest.approx(grad.coefficient(x) @ coef + grad.constant * const,
                                      rel=1e-9, abs=1e-12)


def test_nonconvex_uses_of_atoms_and_bad_cones_are_named():
    def build(relation=None, objective=None, sense="minimize"):
        m = tdo.conic_diff_model()
        x, t = m.variable(2, name="x"), m.variable(name="t")
        w = m.parameter(-1.0, name="w")
        if relation is not None:
            m.constraint(relation(x, t, w), name="bad")
        getattr(m, sense)(t if objective is None else objective(x, t, w))
        return m

    with pytest.raises(tdo.NonconvexError, match=r"'bad'.*norm2.*bounded from below"):
        build(lambda x, t, w: tdo.norm2(x) >= t).optimize()
    with pytest.raises(tdo.NonconvexError, match=r"'bad'.*norm1.*equality"):
        build(lambda x, t, w: tdo.norm1(x) == t).optimize()
    with pytest.raises(tdo.NonconvexError, match="norm_inf.*maximized"):
        build(objective=lambda x, t, w: tdo.norm_inf(x), sense="maximize").optimize()
    m = build(objective=lambda x, t, w: w * tdo.norm2(x) + t)  # the weight is a parameter
    with pytest.raises(tdo.NonconvexError, match="negative weight"):
        m.optimize()
    assert m.status == "nonconvex"
    with pytest.raises(ValueError, match="linearly"):
        build(objective=lambda x, t, w: tdo.norm2(x) ** 2).optimize()
    with pytest.raises(ValueError, match="cannot be arguments"):
        tdo.SOC(1.0, tdo.norm2(np.ones(2) + build().variables[0]))
    with pytest.raises(ValueError, match="square"):
        tdo.PSD(np.ones((2, 3)))
    with pytest.raises(ValueError, match="alpha"):
        tdo.PowerCone(1.0, 1.0, 1.0, 1.5)
    with pytest.raises(ValueError, match="scalar"):
        tdo.SOC(np.ones(2), np.ones(2))
    for backend in ("quadratic", "nonlinear"):
        m = tdo.Model(backend=backend)
        x = m.variable(2)
        m.constraint(tdo.SOC(1.0, x))
        m.minimize(x.sum())
        with pytest.raises(ValueError, match="soc cone.*backend='conic'"):
            m.optimize()
    m = tdo.quadratic_diff_model()
    x = m.variable(2)
    m.minimize(tdo.norm2(x))
    with pytest.raises(ValueError, match="conic backend"):
        m.optimize()
    m = tdo.Model(solver="highs", backend="conic")
    m.variable()
    m.minimize(m.variables[0])
    with pytest.raises(ValueError, match="SCS"):
        m.optimize()


def test_infeasible_and_unbounded_conic_models():
    m = tdo.diff_model()
    x = m.variable(2, name="x")
    m.constraint(tdo.SOC(1.0, x))
    m.constraint(x[0] >= 2)
    m.minimize(x.sum())
    with pytest.raises(tdo.InfeasibleError):
        m.optimize()
    assert m.status == "infeasible"
    m = tdo.diff_model()
    t, x = m.variable(name="t"), m.variable(2, name="x")
    m.constraint(tdo.SOC(t, x))
    m.maximize(t)
    with pytest.raises(tdo.UnboundedError):
        m.optimize()
    assert m.status == "unbounded"


def test_auto_backend_rule():
    m = tdo.diff_model()
    x = m.variable(2)
    m.constraint(x >= 0)
    m.minimize(x.sum())
    assert isinstance(pipeline_for(m), QuadraticPipeline)
    m.constraint(tdo.SOC(1.0, x))
    assert isinstance(pipeline_for(m), ConicPipeline)
    assert "conic" in tdo.Model(backend="conic").backend


# ---------------------------------------------------------------- random programs

def model_of(pr):
    """The cone program ``min ½xᵀPx + cᵀx s.t. b - Ax ∈ K`` of test_conic.random_program as
    a model: A, b, c (and P) parameters, one constraint per cone (PSD blocks as the
    symmetric matrices smat(b - Ax))."""
    dims = ConeDims.from_dict(pr["cones"])
    m = tdo.conic_diff_model()
    x = m.variable(pr["A"].shape[1], name="x")
    params = [m.parameter(pr[k], name=k) for k in ("A", "b", "c")]
    A, b, c = params
    s = b - A @ x
    cons, off = [], 0

    def take(k):
        nonlocal off
        off += k
        return s[off - k: off]
    if dims.z:
        cons.append(m.constraint(take(dims.z) == 0))
    if dims.l:
        cons.append(m.constraint(take(dims.l) >= 0))
    for k in dims.q:
        block = take(k)
        cons.append(m.constraint(tdo.SOC(block[0], block[1:])))
    for d in dims.s:
        N = d * (d + 1) // 2
        basis = smat(np.eye(N)).reshape(N, d * d).T  # column k: smat(e_k), flattened
        cons.append(m.constraint(tdo.PSD((basis @ take(N)).reshape(d, d))))
    for _ in range(dims.ep):
        block = take(3)
        cons.append(m.constraint(tdo.ExpCone(block[0], block[1], block[2])))
    for alpha in dims.p:
        block = take(3)
        cons.append(m.constraint(tdo.PowerCone(block[0], block[1], block[2], alpha)))
    objective = c @ x
    if pr["P"] is not None:
        P = m.parameter(pr["P"], name="P")
        params.append(P)
        objective = objective + 0.5 * (x @ P @ x)
    m.minimize(objective)
    return m, x, params, cons


RANDOM = [
    ({"z": 1, "l": 3, "q": [3, 4]}, False),
    ({"l": 2, "q": [2, 5]}, True),
    ({"l": 2, "s": [2, 3]}, False),
    ({"z": 1, "s": [3]}, True),
    ({"z": 1, "l": 1, "ep": 2}, False),
    ({"l": 2, "p": [0.3, 0.7]}, False),
    ({"z": 1, "l": 2, "q": [3], "s": [2], "ep": 1, "p": [0.4]}, True),
]


@pytest.mark.parametrize("cones, quadratic", RANDOM, ids=str)
def test_random_cone_programs_through_the_model(cones, quadratic):
    from test_conic import random_program

    rng = np.random.default_rng(21)
    pr = random_program(rng, cones, quadratic)
    m, x, params, cons = model_of(pr)

    def outputs():
        m.optimize()
        return np.concatenate([m.value(x)] + [np.ravel(m.dual(c)) for c in cons]
                              + [[m.objective_value]])

    base = outputs()
    np.testing.assert_allclose(m.value(x), pr["x"], atol=1e-9)
    v = {p: rng.normal(size=p.shape) for p in params}
    m.empty_input_sensitivities()
    for p in params:
        m.set_forward_parameter(p, v[p])
    m.forward_differentiate()
    jv = np.concatenate([m.get_forward_variable(x)]
                        + [np.ravel(m.get_forward_constraint_dual(c)) for c in cons]
                        + [[m.get_forward_objective()]])
    fd = central_difference(m, v, outputs)
    np.testing.assert_allclose(outputs(), base, atol=1e-12)
    np.testing.assert_allclose(jv, fd, rtol=0, atol=1e-7 * max(1.0, np.abs(fd).max()))

    # reverse mode: the adjoint identity ⟨w, J v⟩ = ⟨Jᵀw, v⟩ with seeds on everything
    w = rng.normal(size=jv.shape)
    m.empty_input_sensitivities()
    m.set_reverse_variable(x, w[:x.size])
    k = x.size
    for c in cons:
        size = int(np.prod(c.shape))
        seed = w[k: k + size].reshape(c.shape)
        m.set_reverse_constraint_dual(c, seed)
        k += size
    m.set_reverse_objective(w[-1])
    m.reverse_differentiate()
    vjp = sum(float(np.sum(m.get_reverse_parameter(p) * v[p])) for p in params)
    assert abs(w @ jv - vjp) <= 1e-10 * max(1.0, np.abs(w).sum() * np.abs(jv).max())


@pytest.mark.parametrize("kind", ["soc", "psd"])
def test_functional_api_on_cone_constraints_is_adjoint(kind):
    """A tangent of a cone constraint's function (coefficients and constants) pushed forward,
    against the reverse getter's cotangent: ⟨x̄, dx⟩ = ⟨C̄, dC⟩ + ⟨c̄0, dc0⟩."""
    from test_conic import random_program

    rng = np.random.default_rng(4)
    cones = {"l": 2, "q": [4]} if kind == "soc" else {"l": 2, "s": [3]}
    m, x, _, cons = model_of(random_program(rng, cones))
    m.optimize()
    cone = cons[-1]
    n = x.size
    coef = rng.normal(size=tuple(cone.shape) + (n,))
    const = rng.normal(size=cone.shape)
    tangent = (coef.reshape(-1, n) @ x).reshape(cone.shape) + const
    m.empty_input_sensitivities()
    m.set_forward_constraint_function(cone, tangent)
    m.forward_differentiate()
    w = rng.normal(size=n)
    lhs = w @ m.get_forward_variable(x)
    reverse(m, variable=(x, w))
    grad = m.get_reverse_constraint_function(cone)
    rhs = np.sum(grad.coefficient(x) * coef) + np.sum(grad.constant * const)
    assert lhs == pytest.approx(rhs, rel=1e-9, abs=1e-11)
    if kind == "psd":  # user-facing cotangents of a symmetric matrix are symmetric
        np.testing.assert_allclose(grad.constant, grad.constant.T, atol=1e-14)


@pytest.mark.parametrize("kind, seed", [("lp", 1), ("qp", 2), ("qp", 6)])
def test_lp_and_qp_through_the_conic_backend_match_the_quadratic_one(kind, seed):
    from problems import random_qp

    quad = random_qp(np.random.default_rng(seed), kind)
    con = random_qp(np.random.default_rng(seed), kind, solver="scs")
    con.model.backend = "conic"
    con.model._sensitivity.structure_changed()
    w = np.random.default_rng(seed + 10).normal(size=quad.x.size)
    for prob in (quad, con):
        prob.solve_at(prob.values)
        prob.model.empty_input_sensitivities()
        for p in prob.params:
            prob.model.set_forward_parameter(p, np.ones(p.shape))
        prob.model.forward_differentiate()
    assert isinstance(pipeline_for(con.model), ConicPipeline)
    np.testing.assert_allclose(con.outputs(), quad.outputs(), atol=1e-9)
    np.testing.assert_allclose(con.model.get_forward_variable(con.x),
                               quad.model.get_forward_variable(quad.x), atol=1e-8)
    for a, b in zip(con.constraints, quad.constraints):
        np.testing.assert_allclose(con.model.get_forward_constraint_dual(a),
                                   quad.model.get_forward_constraint_dual(b), atol=1e-8)
    for prob in (quad, con):
        reverse(prob.model, variable=(prob.x, w))
    for a, b in zip(con.params, quad.params):
        np.testing.assert_allclose(con.model.get_reverse_parameter(a),
                                   quad.model.get_reverse_parameter(b), atol=1e-8)
    for a, b in zip(con.constraints, quad.constraints):
        ga, gb = (prob.model.get_reverse_constraint_function(c)
                  for prob, c in ((con, a), (quad, b)))
        np.testing.assert_allclose(ga.coefficient(con.x), gb.coefficient(quad.x), atol=1e-8)
        np.testing.assert_allclose(ga.constant, gb.constant, atol=1e-8)


# ---------------------------------------------------------------- the layer

def ball_layer(**kw):
    m = tdo.conic_diff_model()
    x = m.variable(3, name="x")
    r = m.parameter(1.0, name="r")
    c = m.parameter(np.array([1.0, 2.0, 2.0]), name="c")
    ball = m.constraint(tdo.norm2(x) <= r)
    m.maximize(c @ x)
    return tdo.Layer(m, parameters=[r, c], outputs=[x, ball, m.objective], **kw)


def test_layer_on_the_conic_backend():
    """x* = r c/‖c‖, dual ‖c‖, f* = r‖c‖: gradients by hand, gradcheck (with forward AD),
    jacobian, vmap; an unbroadcast c's gradient is the sum over the batch."""
    layer = ball_layer()
    assert layer.memberwise and not layer.nonlinear
    R = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    C = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64, requires_grad=True)
    x, dual, f = layer(R, C)
    torch.testing.assert_close(x, R[:, None] * C / 3)
    torch.testing.assert_close(dual, torch.full((2,), 3.0, dtype=torch.float64))
    f.sum().backward()
    torch.testing.assert_close(R.grad, torch.full((2,), 3.0, dtype=torch.float64))
    torch.testing.assert_close(C.grad, 3.0 * C.detach() / 3)  # Σ_b r_b c/‖c‖ = 3c/3
    torch.autograd.gradcheck(lambda a, b: layer(a, b), (R.detach().requires_grad_(),
                                                       C.detach().requires_grad_()),
                             check_forward_ad=True, fast_mode=True, atol=1e-6, rtol=1e-5)
    J = layer.jacobian(R.detach(), C.detach())
    torch.testing.assert_close(J[0][0], (C / 3).detach().expand(2, 3))
    vm = torch.func.vmap(layer)(R.detach()[:, None], C.detach().expand(2, 3))
    torch.testing.assert_close(vm[0][:, 0], x.detach())


def test_conic_layer_failed_members_give_nan():
    layer = ball_layer(on_failure="nan")
    x, _, _ = layer(torch.tensor([1.0, -1.0]), torch.ones(3))  # the second ball is empty
    assert layer.last_status == ["optimal", "infeasible"]
    assert torch.isfinite(x[0]).all() and torch.isnan(x[1]).all()
    assert x.dtype == torch.float32  # outputs follow the inputs' dtype
