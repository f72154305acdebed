"""Cone projections and their derivatives (torchdiffopt.backends.cones).

Each projection is checked against the defining properties of a projection onto a closed
convex cone, with membership tests written here from the cones' definitions (not from the
implementation): ``Π(v) ∈ K``, ``Π(v) - v ∈ K*``, ``⟨Π(v), Π(v) - v⟩ = 0``. Each derivative
is checked against central finite differences, for symmetry and for eigenvalues in [0, 1].
"""

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from torchdiffopt.backends import cones as C

SQRT2 = math.sqrt(2.0)

CASES = [
    {"z": 2, "l": 3},
    {"q": [1, 2, 3, 3, 5]},
    {"s": [1, 2, 3, 4]},
    {"ep": 4},
    {"ed": 4},
    {"p": [0.3, 0.5, 0.9, -0.2, -0.7]},
    {"z": 1, "l": 2, "q": [3], "s": [2], "ep": 1, "ed": 1, "p": [0.4, -0.6]},
]


# ---------------------------------------------------------------- membership, from definitions

def _exp(t):
    return math.exp(t) if t < 700 else math.inf


def _in_cone(kind, w, tol, alpha=None):
    """``w`` in the cone (``kind`` of :data:`C.CONE_KEYS`, or ``"f"`` for the free cone)."""
    if kind == "f":
        return True
    if kind == "z":
        return np.abs(w).max() <= tol
    if kind == "l":
        return w.min() >= -tol
    if kind == "q":
        return np.linalg.norm(w[1:]) <= w[0] + tol
    if kind == "s":
        return np.linalg.eigvalsh(C.smat(w)).min() >= -tol
    # the 3-d cones: w within about tol of K when a nearby point, moved into K's
    # direction of growth by tol in each coordinate, satisfies the definition
    x, y, z = w
    if kind == "ep":  # cl{y > 0, y exp(x/y) <= z}
        x, y, z = x - tol, y + tol, z + tol
        return y > 0 and y * _exp(x / y) <= z
    if kind == "ed":  # cl{u < 0, -u exp(v/u) <= e w}
        u, v, w_ = x - tol, y + tol, z + tol
        return u < 0 and -u * _exp(v / u) <= math.e * w_
    if kind == "p":
        a = abs(alpha)
        x, y = x + tol, y + tol
        if min(x, y) < 0:
            return False
        if alpha > 0:
            return x ** a * y ** (1 - a) >= abs(z) - tol
        return (x / a) ** a * (y / (1 - a)) ** (1 - a) >= abs(z) - tol
    raise AssertionError(kind)


def _pieces(cones, dual=False):
    """``(kind, slice, α)`` per cone, in SCS's row order; the dual swaps z ↔ free,
    ep ↔ ed and the sign of α."""
    dims = C.ConeDims.from_dict(cones)
    flip = {"z": "f", "ep": "ed", "ed": "ep"} if dual else {}
    out, off = [], 0
    for _ in range(dims.z):
        out.append((flip.get("z", "z"), slice(off, off + 1), None))
        off += 1
    for _ in range(dims.l):
        out.append(("l", slice(off, off + 1), None))
        off += 1
    for d in dims.q:
        out.append(("q", slice(off, off + d), None))
        off += d
    for d in dims.s:
        out.append(("s", slice(off, off + d * (d + 1) // 2), None))
        off += d * (d + 1) // 2
    for key, count in (("ep", dims.ep), ("ed", dims.ed)):
        for _ in range(count):
            out.append((flip.get(key, key), slice(off, off + 3), None))
            off += 3
    for a in dims.p:
        out.append(("p", slice(off, off + 3), -a if dual else a))
        off += 3
    return out


def _check_projection(v, cones, dual, rtol):
    p = C.project(v, cones, dual=dual)
    scale = max(1.0, np.abs(v).max())
    tol = rtol * scale
    for kind, sl, a in _pieces(cones, dual):
        assert _in_cone(kind, p[sl], tol, a), (kind, v[sl], p[sl])
    for kind, sl, a in _pieces(cones, not dual):  # p - v in the dual cone
        assert _in_cone(kind, p[sl] - v[sl], tol, a), (kind, v[sl], p[sl])
    assert abs(p @ (p - v)) <= rtol * scale ** 2
    np.testing.assert_allclose(C.project(p, cones, dual=dual), p, atol=tol, rtol=0)


def _points(rng, size, count):
    """Random points at scales from 1e-3 to 1e3."""
    return rng.normal(size=(count, size)) * np.exp(rng.uniform(-7, 7, size=(count, 1)))


# ---------------------------------------------------------------- svec, sizes

def test_svec_layout_is_scs_lower_triangle_by_columns():
    X = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 5.0], [3.0, 5.0, 6.0]])
    # (0,0), (1,0), (2,0), (1,1), (2,1), (2,2), off-diagonal entries times √2
    np.testing.assert_allclose(C.svec(X), [1, 2 * SQRT2, 3 * SQRT2, 4, 5 * SQRT2, 6])
    np.testing.assert_allclose(C.smat(C.svec(X)), X)


def test_svec_is_an_isometry_and_takes_the_symmetric_part(rng):
    X, Y = rng.normal(size=(2, 4, 4))
    X, Y = X + X.T, Y + Y.T
    assert abs(C.svec(X) @ C.svec(Y) - np.trace(X @ Y)) < 1e-12
    N = rng.normal(size=(4, 4))
    np.testing.assert_allclose(C.svec(N), C.svec(0.5 * (N + N.T)))


def test_svec_smat_torch_match_numpy_and_are_differentiable(rng):
    X = rng.normal(size=(2, 3, 3))
    Xt = torch.tensor(X, requires_grad=True)
    np.testing.assert_allclose(C.svec(Xt).detach().numpy(), C.svec(X))
    v = torch.tensor(C.svec(X), requires_grad=True)
    np.testing.assert_allclose(C.smat(v).detach().numpy(), C.smat(C.svec(X)))
    assert torch.autograd.gradcheck(C.svec, (Xt,))
    assert torch.autograd.gradcheck(C.smat, (v,))


def test_cone_dims_parse_and_validate():
    dims = C.ConeDims.from_dict({"z": 1, "l": 2, "q": [3], "s": [3], "ep": 1, "p": [0.5]})
    assert dims.size == 1 + 2 + 3 + 6 + 3 + 3
    assert dims.to_scs() == {"z": 1, "l": 2, "q": [3], "s": [3], "ep": 1, "p": [0.5]}
    with pytest.raises(ValueError, match="unknown cone keys"):
        C.ConeDims.from_dict({"f": 1})
    with pytest.raises(ValueError, match="power cone"):
        C.ConeDims.from_dict({"p": [1.5]})
    with pytest.raises(ValueError, match="nonnegative integer"):
        C.ConeDims.from_dict({"l": -1})
    with pytest.raises(ValueError, match="cone's size"):
        C.project(np.zeros(3), {"l": 2})


# ---------------------------------------------------------------- projections

def test_known_projections():
    # SOC: (0, 1, 0) -> (1/2, 1/2, 0); interior and polar points
    np.testing.assert_allclose(C.project([0.0, 1.0, 0.0], {"q": [3]}), [0.5, 0.5, 0.0])
    np.testing.assert_allclose(C.project([2.0, 1.0, 0.0], {"q": [3]}), [2.0, 1.0, 0.0])
    np.testing.assert_allclose(C.project([-2.0, 1.0, 0.0], {"q": [3]}), 0.0)
    # PSD: diag(1, -1) -> diag(1, 0)
    np.testing.assert_allclose(C.project(C.svec(np.diag([1.0, -1.0])), {"s": [2]}),
                               C.svec(np.diag([1.0, 0.0])), atol=1e-15)
    # exponential cone: (x, y, z) with x, y < 0 -> (x, 0, max(z, 0)); members stay; polar -> 0
    np.testing.assert_allclose(C.project([-1.0, -2.0, 3.0], {"ep": 1}), [-1.0, 0.0, 3.0])
    np.testing.assert_allclose(C.project([0.0, 1.0, 2.0], {"ep": 1}), [0.0, 1.0, 2.0])
    np.testing.assert_allclose(C.project([1.0, 0.0, -1.0], {"ep": 1}), 0.0)
    # power cone α = ½ (a rotated SOC: xy ≥ z²): (1, 1, 0.5) is inside
    np.testing.assert_allclose(C.project([1.0, 1.0, 0.5], {"p": [0.5]}), [1.0, 1.0, 0.5])
    # dual cones via Moreau: Π_{K*}(v) = v + Π_K(-v); the zero cone's dual is free
    np.testing.assert_allclose(C.project([3.0, -1.0], {"z": 2}, dual=True), [3.0, -1.0])
    np.testing.assert_allclose(C.project([3.0, -1.0], {"z": 2}), 0.0)


@pytest.mark.parametrize("cones", CASES, ids=str)
@pytest.mark.parametrize("dual", [False, True])
def test_projection_properties(rng, cones, dual):
    size = C.ConeDims.from_dict(cones).size
    for v in _points(rng, size, 25):
        _check_projection(v, cones, dual, rtol=1e-10)


@pytest.mark.parametrize("cones", CASES, ids=str)
def test_moreau_decomposition(rng, cones):
    size = C.ConeDims.from_dict(cones).size
    for v in _points(rng, size, 30):
        p, q = C.project(v, cones), C.project(-v, cones, dual=True)
        scale = max(1.0, np.abs(v).max())
        np.testing.assert_allclose(p - q, v, atol=1e-12 * scale, rtol=0)
        assert abs(p @ q) <= 1e-10 * scale ** 2


@pytest.mark.parametrize("cones", [{"ep": 1}, {"p": [0.1]}, {"p": [0.5]}, {"p": [0.95]}],
                         ids=str)
def test_three_dimensional_cones_over_a_wide_range(cones):
    """Friberg's test grid: every coordinate in {0, ±e^k, k = -20, -16, …, 20}."""
    dom = np.concatenate((-np.exp(np.arange(-20, 21, 4.0)), [0.0], np.exp(np.arange(-20, 21, 4.0))))
    grid = np.array(np.meshgrid(dom, dom, dom, indexing="ij")).reshape(3, -1).T
    key, param = next(iter(cones.items()))
    many = {key: len(grid)} if key == "ep" else {key: param * len(grid)}
    v = grid.ravel()
    p = C.project(v, many)
    pv = (p - v).reshape(-1, 3)
    P = p.reshape(-1, 3)
    scale = np.maximum(1.0, np.linalg.norm(grid, axis=1))
    # relative optimality conditions, as Friberg reports them
    assert (np.abs(np.einsum("ki,ki->k", P, pv)) / scale ** 2).max() < 1e-10
    dual = C.project(pv.ravel(), many, dual=True).reshape(-1, 3)
    assert (np.linalg.norm(dual - pv, axis=1) / scale).max() < 1e-10
    again = C.project(p, many).reshape(-1, 3)
    assert (np.linalg.norm(again - P, axis=1) / scale).max() < 1e-10


# ---------------------------------------------------------------- derivatives

def _fd_jacobian(cones, dual, v, h):
    cols = []
    for e in np.eye(len(v)):
        cols.append((C.project(v + h * e, cones, dual) - C.project(v - h * e, cones, dual))
                    / (2 * h))
    return np.column_stack(cols)


@pytest.mark.parametrize("cones", CASES, ids=str)
@pytest.mark.parametrize("dual", [False, True])
def test_derivative_matches_finite_differences(rng, cones, dual):
    size = C.ConeDims.from_dict(cones).size
    checked = 0
    for v in _points(rng, size, 12):
        if C.kinks(v, cones, dual, rtol=1e-4):  # FD would straddle a kink
            continue
        J = C.projection_derivative(v, cones, dual).to_dense()
        J_fd = _fd_jacobian(cones, dual, v, 1e-6 * max(1.0, np.linalg.norm(v)))
        np.testing.assert_allclose(J, J_fd, atol=1e-6 * max(1.0, np.abs(J_fd).max()), rtol=0)
        checked += 1
    assert checked >= 4


@pytest.mark.parametrize("cones", CASES, ids=str)
def test_derivative_is_symmetric_firmly_nonexpansive_and_consistent(rng, cones):
    size = C.ConeDims.from_dict(cones).size
    for v in _points(rng, size, 10):
        for dual in (False, True):
            D = C.projection_derivative(v, cones, dual)
            J = D.to_dense()
            np.testing.assert_allclose(J, J.T, atol=1e-12)
            eig = np.linalg.eigvalsh(0.5 * (J + J.T))
            assert eig.min() >= -1e-10 and eig.max() <= 1 + 1e-10
            np.testing.assert_allclose(D.to_sparse().toarray(), J, atol=1e-15)
            assert sp.issparse(D.to_sparse())
            W = rng.normal(size=(size, 3))
            np.testing.assert_allclose(D.matvec(W), J @ W, atol=1e-12)
            np.testing.assert_allclose(D.T.matvec(W[:, 0]), J.T @ W[:, 0], atol=1e-12)
        # DΠ_{K*}(v) = I - DΠ_K(-v)
        np.testing.assert_allclose(C.projection_derivative(v, cones, dual=True).to_dense(),
                                   np.eye(size) - C.projection_derivative(-v, cones).to_dense(),
                                   atol=1e-12)


def test_known_derivatives():
    # SOC at (0, 1, 0): ½ [[1, x̂ᵀ], [x̂, I - 0 x̂x̂ᵀ]] with x̂ = (1, 0)  (t/‖x‖ = 0)
    J = C.projection_derivative([0.0, 1.0, 0.0], {"q": [3]}).to_dense()
    np.testing.assert_allclose(J, 0.5 * np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1.0]]))
    # PSD at diag(2, -1): divided difference 2/(2 - (-1)) = 2/3 on the off-diagonal entry
    J = C.projection_derivative(C.svec(np.diag([2.0, -1.0])), {"s": [2]}).to_dense()
    np.testing.assert_allclose(J, np.diag([1.0, 2 / 3, 0.0]), atol=1e-15)
    # exponential cone, face x, y < 0: Π = (x, 0, max(z, 0))
    J = C.projection_derivative([-1.0, -2.0, 3.0], {"ep": 1}).to_dense()
    np.testing.assert_allclose(J, np.diag([1.0, 0.0, 1.0]))


def test_kinks_of_rows_are_the_kinks_of_each_row():
    """kinks_rows against kinks row by row, on rows with kinks in every kind of cone (each
    member with its own scale, hence its own tolerance) and random rows, primal and dual."""
    cones = {"z": 1, "l": 2, "q": [3], "s": [2], "ep": 1, "ed": 1, "p": [0.3, -0.6]}
    kinked = np.concatenate(([0.5], [0.0, 1.0], [1.0, 1.0, 0.0], C.svec(np.diag([1.0, 0.0])),
                             [1.0, 1.0, math.e], [-1.0, -1.0, -math.e], [0.0, 0.0, 0.0],
                             [0.0, 0.0, 0.0]))
    rng = np.random.default_rng(4)
    V = np.vstack((kinked, 100 * kinked, rng.normal(size=(3, len(kinked)))))
    for dual in (False, True):
        rows = C.kinks_rows(V, cones, dual)
        assert rows == [C.kinks(v, cones, dual) for v in V]
        assert rows[0]


def test_kinks_are_reported():
    assert C.kinks([0.0, 1.0], {"l": 2}) == ["l[0]"]
    assert C.kinks([1.0, 1.0, 0.0, 2.0, 0.5, 0.5], {"q": [3, 3]}) == ["q[0]"]  # ‖x‖ = t
    assert C.kinks(C.svec(np.diag([1.0, 0.0])), {"s": [2]}) == ["s[0]"]
    assert C.kinks([1.0, 1.0, math.e], {"ep": 1}) == ["ep[0]"]  # on the boundary y e^{x/y} = z
    assert C.kinks([0.0, 0.0, 0.0], {"p": [0.3]}) == ["p[0]"]  # the origin
    rng = np.random.default_rng(1)
    assert not C.kinks(rng.normal(size=6), {"l": 6})


def test_rowwise_projection_and_derivative_match_one_row_at_a_time():
    """:func:`~C.project_rows` and :func:`~C.projection_derivative_blocks` (the batched
    refinement's) against :func:`project` and :func:`projection_derivative` row by row, every
    cone kind (power cones of both signs: their per-cone α repeats over the batch)."""
    cones = {"z": 2, "l": 3, "q": [3, 4, 3], "s": [2, 3], "ep": 2, "ed": 1, "p": [0.3, -0.6]}
    V = np.random.default_rng(0).normal(size=(5, C.ConeDims.from_dict(cones).size))
    for dual in (False, True):
        P = C.project_rows(V, cones, dual)
        diag, blocks = C.projection_derivative_blocks(V, cones, dual)
        for j, v in enumerate(V):
            np.testing.assert_array_equal(P[j], C.project(v, cones, dual))
            D = np.diag(diag[j])
            for idx, mats in blocks:
                for cone, mat in zip(idx, mats[j]):
                    assert not D[np.ix_(cone, cone)].any()  # blocks and diagonal disjoint
                    D[np.ix_(cone, cone)] = mat
            np.testing.assert_array_equal(D, C.projection_derivative(v, cones, dual).to_dense())