"""The conic backend (ConicDerivative), the SCS conic adapter and the torch function conic().

Acceptance values are derived by hand in the comments. Random programs are built from a
chosen primal-dual pair (so a solution exists and is known), with as many variables as
active constraint directions (so it is unique and nondegenerate); their derivatives are
compared with central finite differences of re-solved problems and checked for the adjoint
identity ⟨w, J v⟩ = ⟨Jᵀw, v⟩ with w on dx, dy and ds together.
"""

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from torchdiffopt.backends import cones as C
from torchdiffopt.backends.conic import ConicDerivative
from torchdiffopt.conic_function import conic
from torchdiffopt.errors import (DegenerateSolutionWarning, InfeasibleError, NonconvexError,
                                 UnboundedError)
from torchdiffopt.solvers.cone_program import conic_residuals
from torchdiffopt.solvers.scs_conic import solve_scs_conic

SQRT2 = math.sqrt(2.0)
T64 = torch.float64


def solve(A, b, c, cones, P=None, solver=solve_scs_conic, **kw):
    sol = solver(A, b, c, cones, P)
    return ConicDerivative(A, b, c, cones, sol.x, sol.y, sol.s, P, **kw)


def tensor(a, grad=True):
    return torch.tensor(a, dtype=T64, requires_grad=grad)


# ---------------------------------------------------------------- random programs

def _block(rng, kind, param):
    """``v`` for one cone (``y = Π_{K*}(v)``, ``s = y - v``) and the number of directions
    in which it constrains the primal solution at first order (its active dimension)."""
    if kind == "z":
        return rng.normal(size=1), 1
    if kind == "l":
        v = rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 2.0, size=1)
        return v, int(v[0] > 0)
    if kind == "s":  # eigenvalues away from 0: rank r dual, rank d - r slack
        Q, _ = np.linalg.qr(rng.normal(size=(param, param)))
        lam = rng.uniform(0.5, 2.0, size=param) * rng.choice([-1.0, 1.0], size=param)
        r = int((lam > 0).sum())
        return C.svec((Q * lam) @ Q.T), r * (r + 1) // 2
    cone = {kind: [param]} if kind in ("q", "p") else {kind: 1}
    size = param if kind == "q" else 3
    for _ in range(1000):  # both y and s nonzero, on the curved part of the boundary
        v = rng.normal(size=size)
        y = C.project(v, cone, dual=True)
        eig = np.linalg.eigvalsh(C.projection_derivative(v, cone, dual=True).to_dense())
        curved = size < 3 or ((eig > 0.05) & (eig < 0.95)).any()
        if curved and min(np.linalg.norm(y), np.linalg.norm(y - v)) > 0.2 * np.linalg.norm(v) \
                and not C.kinks(v, cone, dual=True, rtol=1e-2):
            return v, 1
    raise AssertionError("no curved boundary point found")


def random_program(rng, cones, quadratic=False, min_rcond=1e-3):
    """A cone program with known solution ``(x, y, s)``: ``b = A x + s``, ``c = -Aᵀy - P x``;
    redrawn until the derivative matrix at that solution is well conditioned (reciprocal
    condition at least ``min_rcond``), so that finite differences are accurate."""
    for _ in range(50):
        pr = _random_program(rng, cones, quadratic)
        D = ConicDerivative(pr["A"], pr["b"], pr["c"], cones, pr["x"], pr["y"], pr["s"],
                            pr["P"], refine=False)
        if D.rcond >= min_rcond:
            return pr
    raise AssertionError("no well-conditioned instance")


def _random_program(rng, cones, quadratic):
    dims = C.ConeDims.from_dict(cones)
    parts, active = [], 0
    for kind, params in (("z", [None] * dims.z), ("l", [None] * dims.l), ("q", dims.q),
                         ("s", dims.s), ("ep", [None] * dims.ep), ("ed", [None] * dims.ed),
                         ("p", dims.p)):
        for param in params:
            v, a = _block(rng, kind, param)
            parts.append(v)
            active += a
    v = np.concatenate(parts)
    y = C.project(v, dims, dual=True)
    s = y - v
    n = active
    A = rng.normal(size=(dims.size, n))
    x = rng.normal(size=n)
    P = None
    if quadratic:
        G = rng.normal(size=(n, n))
        P = G @ G.T / n
    b = A @ x + s
    c = -A.T @ y - (0 if P is None else P @ x)
    return dict(A=A, b=b, c=c, P=P, x=x, y=y, s=s, cones=cones)


def direction(rng, pr):
    n = pr["A"].shape[1]
    dP = None
    if pr["P"] is not None:
        G = rng.normal(size=(n, n))
        dP = G + G.T
    return (rng.normal(size=pr["A"].shape), rng.normal(size=pr["b"].shape),
            rng.normal(size=pr["c"].shape), dP)


def finite_difference(pr, d, h=1e-6, solver=solve_scs_conic):
    """Central differences of the (refined) solution along the data direction ``d``."""
    def at(t):
        P = None if pr["P"] is None else pr["P"] + t * d[3]
        D = solve(pr["A"] + t * d[0], pr["b"] + t * d[1], pr["c"] + t * d[2], pr["cones"], P,
                  solver)
        return np.concatenate((D.x, D.y, D.s))
    return (at(h) - at(-h)) / (2 * h)


RANDOM = [
    ({"z": 1, "l": 4, "q": [3, 4]}, False),
    ({"l": 3, "q": [2, 5]}, True),
    ({"l": 2, "s": [2, 3]}, False),
    ({"z": 1, "s": [3]}, True),
    ({"z": 1, "ep": 3, "ed": 1}, False),
    ({"l": 2, "p": [0.3, -0.6]}, False),
    ({"z": 1, "l": 3, "q": [3], "s": [2], "ep": 1, "ed": 1, "p": [0.4]}, True),
]


@pytest.mark.parametrize("cones, quadratic", RANDOM, ids=str)
def test_random_programs_match_finite_differences(cones, quadratic):
    rng = np.random.default_rng(7)
    pr = random_program(rng, cones, quadratic)
    D = solve(pr["A"], pr["b"], pr["c"], cones, pr["P"])
    np.testing.assert_allclose(D.x, pr["x"], atol=1e-10)
    np.testing.assert_allclose(D.y, pr["y"], atol=1e-10)
    np.testing.assert_allclose(D.s, pr["s"], atol=1e-10)
    assert D.residual < 1e-13 and not D.singular and not D.kinks
    for _ in range(2):
        d = direction(rng, pr)
        fd = finite_difference(pr, d)
        fwd = np.concatenate(D.jvp(*d))
        np.testing.assert_allclose(fwd, fd, atol=1e-6 * max(1.0, np.abs(fd).max()), rtol=0)
        # reverse mode against the same finite differences: ⟨w, J d⟩
        w = rng.normal(size=fwd.shape)
        n, m = D.n, D.m
        cot = D.vjp(w[:n], w[n:n + m], w[n + m:])
        pairing = sum(np.sum(g * t) for g, t in zip(cot, d) if t is not None)
        assert abs(pairing - w @ fd) <= 1e-6 * max(1.0, abs(w @ fd))


@pytest.mark.parametrize("cones, quadratic", RANDOM, ids=str)
def test_adjoint_identity_to_round_off(cones, quadratic):
    rng = np.random.default_rng(11)
    pr = random_program(rng, cones, quadratic)
    D = solve(pr["A"], pr["b"], pr["c"], cones, pr["P"])
    n, m = D.n, D.m
    for _ in range(3):
        d = direction(rng, pr)
        w = rng.normal(size=n + 2 * m)  # seeds on dx, dy and ds together
        Jv = np.concatenate(D.jvp(*d))
        JTw = D.vjp(w[:n], w[n:n + m], w[n + m:])
        lhs = w @ Jv
        rhs = sum(np.sum(g * t) for g, t in zip(JTw, d) if t is not None)
        assert abs(lhs - rhs) <= 1e-12 * max(1.0, np.abs(w).sum() * np.abs(Jv).max())


def test_many_directions_at_once_match_one_at_a_time():
    rng = np.random.default_rng(3)
    pr = random_program(rng, {"l": 2, "q": [3, 3], "ep": 1}, quadratic=True)
    D = solve(pr["A"], pr["b"], pr["c"], pr["cones"], pr["P"])
    dirs = [direction(rng, pr) for _ in range(3)]
    stacked = D.jvp(*(np.stack(parts) for parts in zip(*dirs)))
    for k, d in enumerate(dirs):
        for got, want in zip(stacked, D.jvp(*d)):
            np.testing.assert_allclose(got[k], want, atol=1e-13)
    seeds = rng.normal(size=(3, D.n)), rng.normal(size=(3, D.m)), rng.normal(size=(3, D.m))
    stacked = D.vjp(*seeds)
    for k in range(3):
        for got, want in zip(stacked, D.vjp(*(s[k] for s in seeds))):
            np.testing.assert_allclose(got[k], want, atol=1e-13)


def test_sparse_path_matches_dense_path():
    rng = np.random.default_rng(5)
    pr = random_program(rng, {"z": 1, "l": 6, "q": [3, 4], "s": [2], "ep": 1})
    A = pr["A"] * (rng.uniform(size=pr["A"].shape) < 0.7)  # some structural zeros
    b = A @ pr["x"] + pr["s"]
    c = -A.T @ pr["y"]
    dense = ConicDerivative(A, b, pr["c"] * 0 + c, pr["cones"], pr["x"], pr["y"], pr["s"])
    sparse = ConicDerivative(sp.csr_matrix(A), b, c, pr["cones"], pr["x"], pr["y"], pr["s"],
                             dense=False)
    assert not sparse.dense and dense.dense
    d = direction(rng, dict(pr, A=A))
    for got, want in zip(sparse.jvp(sp.csr_matrix(d[0]), d[1], d[2]), dense.jvp(*d[:3])):
        np.testing.assert_allclose(got, want, atol=1e-10)
    seeds = rng.normal(size=dense.n), rng.normal(size=dense.m), rng.normal(size=dense.m)
    gs, gd = sparse.vjp(*seeds), dense.vjp(*seeds)
    assert sp.issparse(gs[0])
    mask = A != 0  # the sparse cotangent lives on A's pattern
    np.testing.assert_allclose(gs[0].toarray(), np.where(mask, gd[0], 0.0), atol=1e-10)
    for got, want in zip(gs[1:], gd[1:]):
        np.testing.assert_allclose(got, want, atol=1e-10)


# ---------------------------------------------------------------- acceptance values

def test_soc_example_reverse_gradients_of_the_cone_constants():
    """min x s.t. y ≥ 1/√2, t = 1, (t, x, y) ∈ SOC, variables (t, x, y).

    Rows (s = b - A v): t = 1 is ``s = 1 - t ∈ {0}``; y ≥ 1/√2 is ``s = y - 1/√2 ∈ ℝ₊``
    (``b = -1/√2``); the cone rows are ``s = b_soc + (t, x, y) ∈ SOC`` (``A = -I``,
    ``b_soc = 0``), so ``b_soc`` is the constant term of the expression in the cone.
    Perturbed: √((x + b₁)² + (y + b₂)²) ≤ 1 + b₀ and y ≥ 1/√2, minimized at y = 1/√2:
    x* = -b₁ - √((1 + b₀)² - (1/√2 + b₂)²) = -1/√2 at b = 0, and
    ∂x*/∂b₀ = -(1)/(1/√2) = -√2,  ∂x*/∂b₁ = -1,  ∂x*/∂b₂ = (1/√2)/(1/√2) = 1.
    In this (SCS's, ``s = b - A v``) convention the reverse gradients for a seed of 1 on x
    are (-√2, -1, 1); the objective is x itself, so they are also the shadow prices -y.
    """
    A = np.array([[1.0, 0, 0], [0, 0, -1], [-1, 0, 0], [0, -1, 0], [0, 0, -1]])
    b = np.array([1.0, -1 / SQRT2, 0, 0, 0])
    c = np.array([0.0, 1, 0])
    D = solve(A, b, c, {"z": 1, "l": 1, "q": [3]})
    np.testing.assert_allclose(D.x, [1, -1 / SQRT2, 1 / SQRT2], atol=1e-14)
    _, db, _ = D.vjp(dx=np.array([0.0, 1, 0]))
    np.testing.assert_allclose(db[2:], [-SQRT2, -1, 1], atol=1e-12)
    np.testing.assert_allclose(-D.y[2:], [-SQRT2, -1, 1], atol=1e-12)
    # forward mode gives the same three numbers, one direction each
    for i, want in zip(range(2, 5), [-SQRT2, -1, 1]):
        assert abs(D.jvp(db=np.eye(5)[i])[0][1] - want) < 1e-12


def test_psd_2x2_off_diagonal_constant():
    """min t s.t. [[t, 1+θ], [1+θ, t]] ⪰ 0: t* = |1 + θ|, so dt/dθ = 1 at θ = 0."""
    theta = tensor(0.0)
    I2 = torch.eye(2, dtype=T64)
    B = (1 + theta) * (1 - I2)  # the constant matrix, in the user's symmetric terms
    b = C.svec(B)
    A = -C.svec(I2).reshape(3, 1)  # s = svec(t I + B) = b - A t
    t = conic(A, b, torch.ones(1, dtype=T64), {"s": [2]})
    assert abs(t.item() - 1) < 1e-12
    (dt,) = torch.autograd.grad(t.sum(), theta)
    assert abs(dt.item() - 1) < 1e-10


@pytest.mark.parametrize("p0", [1.0, 4.0])
def test_psd_parameter_in_matrix_and_constant(p0):
    """min x s.t. [[p·x, p], [p, x]] ⪰ 0 (p > 0): p·x ≥ 0 and p x² ≥ p², so x* = √p and
    dx/dp = 1/(2√p): 0.5 at p = 1, 0.25 at p = 4. ``p`` enters both A and b."""
    p = tensor(p0)
    zero, one = torch.zeros((), dtype=T64), torch.ones((), dtype=T64)
    coef = torch.stack([torch.stack([p, zero]), torch.stack([zero, one])])  # of x
    const = torch.stack([torch.stack([zero, p]), torch.stack([p, zero])])
    x = conic(-C.svec(coef).reshape(3, 1), C.svec(const), torch.ones(1, dtype=T64),
              {"s": [2]})
    assert abs(x.item() - math.sqrt(p0)) < 1e-12
    (dx,) = torch.autograd.grad(x.sum(), p)
    assert abs(dx.item() - 0.5 / math.sqrt(p0)) < 1e-10


def test_psd_3x3_constants_and_the_sqrt2_scaling():
    """min x s.t. xI + B ⪰ 0 with B = 11ᵀ - I: eigenvalues of xI + B are x - 1 (twice) and
    x + 2, so x* = 1 = -λ_min(B). Raising every entry of the lower triangle of B by one (in
    the user's symmetric terms: B + 11ᵀ, off-diagonal entries 1 → 2 on both sides) gives
    eigenvalues x - 1, x - 1, x + 5: x* stays 1, dx = 0. Raising only the off-diagonal
    entries gives (x - 1 - t)I + (1 + t)11ᵀ: dx = +1; only the diagonal: dx = -1. (A
    direction of ones on the svec entries would instead raise the off-diagonals by 1/√2.)

    The dual is not unique (any Y ⪰ 0 with Y1 = 0 and tr Y = 1), so M is singular: the
    warning says so, and these directions, which keep a solution path, are still exact."""
    I3 = np.eye(3)
    A, b, c = -C.svec(I3).reshape(6, 1), C.svec(np.ones((3, 3)) - I3), np.ones(1)
    with pytest.warns(DegenerateSolutionWarning, match="singular"):
        D = solve(A, b, c, {"s": [3]})
    assert abs(D.x[0] - 1) < 1e-12
    assert abs(D.jvp(db=C.svec(np.ones((3, 3))))[0][0]) < 1e-10
    assert abs(D.jvp(db=C.svec(np.ones((3, 3)) - I3))[0][0] - 1) < 1e-10
    assert abs(D.jvp(db=C.svec(I3))[0][0] + 1) < 1e-10
    # the same through torch, in symmetric-matrix terms
    B = tensor(np.ones((3, 3)) - I3)
    with pytest.warns(DegenerateSolutionWarning):
        x = conic(torch.tensor(A), C.svec(B), torch.ones(1, dtype=T64), {"s": [3]})
    (gB,) = torch.autograd.grad(x.sum(), B)
    assert abs((gB * torch.ones(3, 3, dtype=T64)).sum().item()) < 1e-10


def test_exp_cone_examples():
    """min z s.t. (p, 1, z) ∈ K_exp: e^p ≤ z, so z* = e^p and dz/dp = e^p.
    max x s.t. (x, 1, q) ∈ K_exp: e^x ≤ q, so x* = log q and dx/dq = 1/q."""
    p = tensor(0.3)
    b = torch.stack([p, torch.ones((), dtype=T64), torch.zeros((), dtype=T64)])
    z = conic(torch.tensor([[0.0], [0.0], [-1.0]], dtype=T64), b, torch.ones(1, dtype=T64),
              {"ep": 1})
    assert abs(z.item() - math.exp(0.3)) < 1e-12
    (dz,) = torch.autograd.grad(z.sum(), p)
    assert abs(dz.item() - math.exp(0.3)) < 1e-10

    q = tensor(2.0)
    b = torch.stack([torch.zeros((), dtype=T64), torch.ones((), dtype=T64), q])
    x = conic(torch.tensor([[-1.0], [0.0], [0.0]], dtype=T64), b, -torch.ones(1, dtype=T64),
              {"ep": 1})
    assert abs(x.item() - math.log(2.0)) < 1e-12
    (dx,) = torch.autograd.grad(x.sum(), q)
    assert abs(dx.item() - 0.5) < 1e-10


def test_lp_closed_form():
    """min -x₁ - x₂ s.t. x₁ + 2x₂ ≤ h₁, 3x₁ + x₂ ≤ h₂, x ≥ 0 at h = (4, 6).
    The vertex solves G x = h: x₁ = (2h₂ - h₁)/5 = 8/5, x₂ = (3h₁ - h₂)/5 = 6/5, so
    dx/dh = G⁻¹ = [[-1/5, 2/5], [3/5, -1/5]] (the rows x ≥ 0 are inactive: zero columns).
    Duals: Gᵀy = -c gives y = (2/5, 1/5) and dy/dc = -G⁻ᵀ = [[1/5, -3/5], [-2/5, 1/5]];
    f* = -(2h₁ + h₂)/5 so the shadow prices are ∂f*/∂h = (-2/5, -1/5) = -y.
    Perturbing G₁₁: dx = -G⁻¹ dG x = -G⁻¹ e₁ x₁ = (8/25, -24/25)."""
    A = np.array([[1.0, 2], [3, 1], [-1, 0], [0, -1]])
    b, c = np.array([4.0, 6, 0, 0]), np.array([-1.0, -1])
    D = solve(A, b, c, {"l": 4})
    np.testing.assert_allclose(D.x, [8 / 5, 6 / 5], atol=1e-12)
    np.testing.assert_allclose(D.y, [2 / 5, 1 / 5, 0, 0], atol=1e-12)
    Jb = np.column_stack([D.jvp(db=e)[0] for e in np.eye(4)])
    np.testing.assert_allclose(Jb, [[-0.2, 0.4, 0, 0], [0.6, -0.2, 0, 0]], atol=1e-12)
    Jc = np.column_stack([D.jvp(dc=e)[1][:2] for e in np.eye(2)])
    np.testing.assert_allclose(Jc, [[0.2, -0.6], [-0.4, 0.2]], atol=1e-12)
    dA = np.zeros((4, 2))
    dA[0, 0] = 1
    np.testing.assert_allclose(D.jvp(dA=dA)[0], [8 / 25, -24 / 25], atol=1e-12)
    # reverse: the same Jacobian, row by row; slack of the x ≥ 0 rows is x itself
    _, db, _ = D.vjp(dx=np.array([1.0, 0]))
    np.testing.assert_allclose(db, [-0.2, 0.4, 0, 0], atol=1e-12)
    _, db, _ = D.vjp(ds=np.array([0.0, 0, 0, 1]))  # s₄ = b₄ + x₂: ∂s₄/∂b = (3/5, -1/5, 0, 1)
    np.testing.assert_allclose(db, [0.6, -0.2, 0, 1], atol=1e-12)


def test_qp_closed_form_simplex_projection():
    """x = argmin ½‖x - a‖² s.t. 1ᵀx = t, x ≥ 0 (P = I, c = -a), a = (.5, .3, -.4, .9), t = 1:
    x = max(a - τ, 0) with support S = {0, 1, 3}, τ = (Σ_S a - t)/|S| = 0.7/3.
    On S, dx_S/da_S = I - 11ᵀ/|S| and dx_S/dt = 1/|S|; zero off S.
    Stationarity x + y₀1 - y_l - a = 0 gives the equality's dual y₀ = τ; indeed
    f* = ½(|S|τ² + Σ_{i∉S} a_i²), df*/dt = -τ = -y₀ (the shadow price)."""
    a = np.array([0.5, 0.3, -0.4, 0.9])
    A = np.vstack((np.ones((1, 4)), -np.eye(4)))
    b = np.r_[1.0, np.zeros(4)]
    D = solve(A, b, -a, {"z": 1, "l": 4}, P=np.eye(4))
    tau = 0.7 / 3
    np.testing.assert_allclose(D.x, np.maximum(a - tau, 0), atol=1e-12)
    assert abs(D.y[0] - tau) < 1e-12
    S = np.array([1.0, 1, 0, 1])
    J = np.diag(S) - np.outer(S, S) / 3
    Ja = np.column_stack([D.jvp(dc=-e)[0] for e in np.eye(4)])
    np.testing.assert_allclose(Ja, J, atol=1e-12)
    np.testing.assert_allclose(D.jvp(db=np.eye(5)[0])[0], S / 3, atol=1e-12)
    _, _, dc, dP = D.vjp(dx=np.array([0.0, 0, 0, 1]))
    np.testing.assert_allclose(-dc, J[3], atol=1e-12)
    np.testing.assert_allclose(dP, dP.T, atol=1e-15)


def test_quadratic_objective_as_a_torch_input():
    """min ½ p x² - x s.t. x ≤ 10 (inactive): x* = 1/p, dx/dp = -1/p² = -0.25 at p = 2."""
    P = tensor([[2.0]])
    A, b = torch.ones(1, 1, dtype=T64), torch.full((1,), 10.0, dtype=T64)
    x = conic(A, b, -torch.ones(1, dtype=T64), {"l": 1}, P=P)
    assert abs(x.item() - 0.5) < 1e-12
    (dP,) = torch.autograd.grad(x.sum(), P)
    assert abs(dP.item() + 0.25) < 1e-10


# ---------------------------------------------------------------- the torch function

@pytest.mark.parametrize("cones", [{"z": 1, "l": 2, "q": [3]}, {"l": 1, "ep": 2}], ids=str)
def test_gradcheck_forward_and_reverse(cones):
    pr = random_program(np.random.default_rng(2), cones)
    inputs = tuple(tensor(pr[k]) for k in "Abc")
    f = lambda A, b, c: conic(A, b, c, cones, return_duals=True)  # noqa: E731
    assert torch.autograd.gradcheck(f, inputs, check_forward_ad=True)


def test_forward_ad_and_torch_func_match_the_backend():
    import torch.autograd.forward_ad as fwAD

    pr = random_program(np.random.default_rng(4), {"l": 2, "q": [3], "s": [2]})
    A, b, c = (torch.tensor(pr[k]) for k in "Abc")
    db = torch.randn(b.shape, dtype=T64, generator=torch.Generator().manual_seed(0))
    with fwAD.dual_level():
        x = conic(A, fwAD.make_dual(b, db), c, pr["cones"])
        dx = fwAD.unpack_dual(x).tangent
    D = solve(pr["A"], pr["b"], pr["c"], pr["cones"])
    np.testing.assert_allclose(dx.numpy(), D.jvp(db=db.numpy())[0], atol=1e-10)
    _, dx_func = torch.func.jvp(lambda b_: conic(A, b_, c, pr["cones"]), (b,), (db,))
    np.testing.assert_allclose(dx_func.numpy(), dx.numpy(), atol=1e-12)
    J_rev = torch.func.jacrev(lambda b_: conic(A, b_, c, pr["cones"]))(b)
    J_fwd = torch.func.jacfwd(lambda b_: conic(A, b_, c, pr["cones"]))(b)
    np.testing.assert_allclose(J_rev.numpy(), J_fwd.numpy(), atol=1e-10)
    np.testing.assert_allclose((J_fwd @ db).numpy(), dx.numpy(), atol=1e-10)
    # vmap over a batch of right-hand sides equals the batched call
    gen = torch.Generator().manual_seed(1)
    bs = b + 0.01 * torch.randn((3, *b.shape), dtype=T64, generator=gen)
    x_vmap = torch.func.vmap(lambda b_: conic(A, b_, c, pr["cones"]))(bs)
    np.testing.assert_allclose(x_vmap.numpy(), conic(A, bs, c, pr["cones"]).numpy(), atol=1e-10)


def test_batch_with_broadcast_inputs_sums_their_gradients():
    rng = np.random.default_rng(8)
    pr = random_program(rng, {"l": 3, "q": [3]})
    B = 3
    bs = np.stack([pr["b"] + 0.05 * rng.normal(size=pr["b"].shape) for _ in range(B)])
    A, c = tensor(pr["A"]), tensor(pr["c"])
    b = tensor(bs)
    x, y, s = conic(A, b, c, pr["cones"], return_duals=True)
    assert x.shape == (B, pr["A"].shape[1]) and y.shape == s.shape == bs.shape
    (x.sum() + y.square().sum()).backward()
    gA = np.zeros_like(pr["A"])
    for j in range(B):
        Aj = tensor(pr["A"])
        xj, yj, _ = conic(Aj, tensor(bs[j]), tensor(pr["c"]), pr["cones"], return_duals=True)
        np.testing.assert_allclose(xj.detach().numpy(), x[j].detach().numpy(), atol=1e-12)
        (xj.sum() + yj.square().sum()).backward()
        gA += Aj.grad.numpy()
    np.testing.assert_allclose(A.grad.numpy(), gA, atol=1e-10)  # sum, not mean
    assert b.grad.shape == bs.shape


def test_outputs_follow_input_dtype():
    pr = random_program(np.random.default_rng(9), {"l": 2, "q": [3]})
    A, b, c = (torch.tensor(pr[k], dtype=torch.float32, requires_grad=True) for k in "Abc")
    x = conic(A, b, c, pr["cones"])
    assert x.dtype == torch.float32
    x.sum().backward()
    assert A.grad.dtype == torch.float32


# ---------------------------------------------------------------- degeneracy and errors

def test_degenerate_duplicate_row_least_squares_meaning():
    """min -x s.t. x ≤ b₁, x ≤ b₂ at b = (1, 1): x* = min(b₁, b₂) has a kink there and the
    dual (y₁ + y₂ = 1) is not unique, so M is singular. The least-squares derivative is the
    minimum-norm element of the subdifferential for the reverse seed, (½, ½), and exact
    along the direction (1, 1), which keeps the rows tied: dx = 1. Never silent zeros."""
    A, b, c = np.ones((2, 1)), np.ones(2), -np.ones(1)
    with pytest.warns(DegenerateSolutionWarning, match="least-squares"):
        D = solve(A, b, c, {"l": 2})
    assert D.singular
    _, db, _ = D.vjp(dx=np.ones(1))
    np.testing.assert_allclose(db, [0.5, 0.5], atol=1e-12)
    assert abs(D.jvp(db=np.ones(2))[0][0] - 1) < 1e-12


def test_weakly_active_constraint_warns():
    """min ½x² s.t. x ≥ 0: x* = 0 with dual y = 0, so the row is binding with a zero dual
    (y = s = 0): x*(b) = max(b, 0) for the row x ≥ b has a kink at b = 0. M is regular;
    the warning names the cone, and the derivative is one of the one-sided ones (0 or 1)."""
    with pytest.warns(DegenerateSolutionWarning, match=r"l\[0\]"):
        D = solve(-np.ones((1, 1)), np.zeros(1), np.zeros(1), {"l": 1}, P=np.eye(1))
    assert not D.singular and D.kinks == ["l[0]"]
    assert D.jvp(db=-np.ones(1))[0][0] in (pytest.approx(0.0, abs=1e-12),
                                           pytest.approx(1.0, abs=1e-12))


def test_solver_errors_name_the_cause():
    with pytest.raises(InfeasibleError, match="infeasible"):  # x ≥ 1 and x ≤ 0
        solve_scs_conic(np.array([[-1.0], [1.0]]), np.array([-1.0, 0.0]), np.ones(1), {"l": 2})
    with pytest.raises(UnboundedError, match="unbounded"):  # min x s.t. x ≤ 1
        solve_scs_conic(np.ones((1, 1)), np.ones(1), np.ones(1), {"l": 1})
    with pytest.raises(NonconvexError):
        solve_scs_conic(np.ones((1, 1)), np.ones(1), np.ones(1), {"l": 1}, P=-np.eye(1))
    with pytest.raises(ValueError, match="inconsistent sizes"):
        solve_scs_conic(np.ones((2, 1)), np.ones(2), np.ones(1), {"l": 3})
    with pytest.raises(ValueError, match="NaN"):
        conic(torch.ones(1, 1, dtype=T64), torch.tensor([np.nan], dtype=T64),
              torch.ones(1, dtype=T64), {"l": 1})
    with pytest.raises(InfeasibleError, match="batch member 1"):
        conic(torch.tensor([[-1.0], [1.0]], dtype=T64),
              torch.tensor([[-1.0, 2.0], [-1.0, 0.0]], dtype=T64),
              torch.ones(1, dtype=T64), {"l": 2})


def test_solver_reports_residuals_and_refinement_reaches_round_off():
    pr = random_program(np.random.default_rng(12), {"z": 1, "l": 2, "q": [3], "ep": 1})
    sol = solve_scs_conic(pr["A"], pr["b"], pr["c"], pr["cones"])
    assert sol.status == "solved" and sol.iterations > 0
    assert set(sol.residuals) == {"primal", "dual", "gap", "slack_cone", "dual_cone"}
    assert max(sol.residuals.values()) < 1e-6
    D = ConicDerivative(pr["A"], pr["b"], pr["c"], pr["cones"], sol.x, sol.y, sol.s)
    refined = conic_residuals(pr["A"], pr["b"], pr["c"], pr["cones"], D.x, D.y, D.s)
    assert max(refined.values()) < 1e-13
