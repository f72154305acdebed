"""Euclidean projections onto convex cones, and the derivatives of those projections.

The cones are SCS's, stacked in SCS's order into one product cone ``K``:

=====  ==========================================================================
key    cone (entries of the slack ``s`` in this order)
=====  ==========================================================================
``z``  zero cone ``{0}ᵏ`` (its dual is the free cone ``ℝᵏ``)
``l``  nonnegative orthant ``ℝ₊ᵏ``
``q``  second-order cones, a list of sizes: ``(t, x)`` with ``‖x‖₂ ≤ t``
``s``  PSD cones, a list of matrix orders ``d``: ``svec(X)`` with ``X ⪰ 0``, of length
       ``d(d+1)/2`` (:func:`svec`: the lower triangle column by column, off-diagonal
       entries times √2, so that ``⟨svec X, svec Y⟩ = tr(XY)``)
``ep`` primal exponential cones, a count: ``cl{(x, y, z): y > 0, y·exp(x/y) ≤ z}``
``ed`` dual exponential cones, a count: ``cl{(u, v, w): u < 0, -u·exp(v/u) ≤ e·w}``
``p``  power cones, a list of ``α``: ``{(x, y, z): x, y ≥ 0, x^α y^(1-α) ≥ |z|}``; a
       negative ``α`` stands for the dual power cone of ``|α|``,
       ``{(u, v, w): u, v ≥ 0, (u/α)^α (v/(1-α))^(1-α) ≥ |w|}`` (SCS's convention)
=====  ==========================================================================

For a closed convex cone ``K``, ``Π_K(v)`` is the nearest point of ``K`` to ``v``, and by
Moreau's decomposition ``v = Π_K(v) - Π_{K*}(-v)`` with ``Π_K(v) ⊥ Π_{K*}(-v)``; hence
``Π_{K*}(v) = v + Π_K(-v)`` and ``DΠ_{K*}(v) = I - DΠ_K(-v)``. ``DΠ_K(v)`` is symmetric
with eigenvalues in ``[0, 1]`` wherever it exists (``Π_K`` is the gradient of the convex
function ``½‖v‖² - ½ dist(v, K)²``). Where ``Π_K`` is not differentiable (a kink: ``v`` on
the boundary of ``K`` or of its polar, or at the origin), the derivative returned is the one
of the side ``v`` lies on by the tests below; :func:`kinks` lists the cones where ``v`` is
that close to a kink.

Derivatives, cone by cone (all vectorized over cones of the same kind and size):

* zero / free / nonnegative: diagonal ``0`` / ``1`` / ``[v > 0]``.
* second-order cone, ``v = (t, x)``: ``I`` if ``‖x‖ ≤ t``, ``0`` if ``‖x‖ ≤ -t``, else
  ``½ [[1, x̂ᵀ], [x̂, (1 + t/‖x‖) I - (t/‖x‖) x̂x̂ᵀ]]`` with ``x̂ = x/‖x‖``.
* PSD cone, ``V = QΛQᵀ``: ``DΠ(V)[dV] = Q (B ∘ QᵀdVQ) Qᵀ`` with the divided differences
  ``B_ij = (λᵢ⁺ - λⱼ⁺)/(λᵢ - λⱼ)`` (``1`` if both are positive, ``0`` if neither is).
* exponential and power cones (three-dimensional): where the projection ``p`` lies on the
  smooth part of the boundary ``{g = 0}`` (``g`` convex, ``g ≤ 0`` on ``K``) with
  ``v - p = μ∇g(p)``, ``μ > 0``, implicit differentiation of these conditions gives
  ``DΠ = H⁻¹ - H⁻¹n nᵀH⁻¹ / (nᵀH⁻¹n)`` with ``H = I + μ∇²g(p)`` and ``n ∝ v - p``; for both
  cones ``μ∇²g = κ w wᵀ`` is rank one (below), so ``H⁻¹`` is closed form. Elsewhere
  ``DΠ`` is ``I`` (``v ∈ K``), ``0`` (``v`` in the polar cone) or a 0/1 diagonal.

  - Exponential cone, ``g = y·exp(x/y) - z``: the projection solves Friberg's univariate
    equation (H. A. Friberg, *Projection onto the exponential cone: a univariate
    root-finding problem*, 2021) for ``ρ = x/y`` of the projection; then
    ``p = a (ρ, 1, exp ρ)``, ``v - p = β (1, 1 - ρ, -exp(-ρ))``, ``κ = β/a``,
    ``w = (1, -ρ, 0)``.
  - Power cone, ``g = σz - x^α y^(1-α)`` (``σ = sign z``): the projection is
    ``(X(r), Y(r), σ r)`` with ``X = ½(x + √(x² + 4αr(|z| - r)))``, ``Y`` likewise with
    ``1 - α``, and ``r ∈ (0, |z|)`` the root of ``X^α Y^(1-α) = r`` (Hien 2015), found by
    safeguarded Newton carrying ``r`` and ``μ = |z| - r`` separately (either may be tiny);
    then ``κ = μα(1-α)r``, ``w = (1/X, -1/Y, 0)``.

Accuracy: the optimality conditions of the exponential and power cone projections hold to
about 1e-11 and 1e-15 relative on Friberg's test grid (coordinates ``0, ±e^k``,
``|k| ≤ 20``); the others are closed forms or an eigendecomposition.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.sparse as sp
import torch

#: SCS's cone keys, in the order of the rows.
CONE_KEYS = ("z", "l", "q", "s", "ep", "ed", "p")
#: ``v`` closer than this (relative to ``max(1, ‖v‖∞)``) to a kink of the projection counts
#: as a kink in :func:`kinks`.
KINK_RTOL = 1e-7

_EPS = np.finfo(np.float64).eps
_SQRT2 = math.sqrt(2.0)


# --------------------------------------------------------------------------- cone sizes

@dataclass(frozen=True)
class ConeDims:
    """The sizes of a product cone, in SCS's order (see the module docstring)."""

    z: int = 0
    l: int = 0  # noqa: E741  (SCS's name)
    q: tuple[int, ...] = ()
    s: tuple[int, ...] = ()
    ep: int = 0
    ed: int = 0
    p: tuple[float, ...] = ()

    @classmethod
    def from_dict(cls, cones) -> "ConeDims":
        """From SCS's cone dictionary, e.g. ``{"z": 1, "l": 3, "q": [3], "s": [2], "ep": 1,
        "p": [0.3]}`` (missing keys are empty). A :class:`ConeDims` is returned as is."""
        if isinstance(cones, ConeDims):
            return cones
        unknown = set(cones) - set(CONE_KEYS)
        if unknown:
            raise ValueError(f"unknown cone keys {sorted(unknown)}; supported: {list(CONE_KEYS)}")

        def count(key):
            k = cones.get(key, 0)
            if int(k) != k or k < 0:
                raise ValueError(f"cone {key!r} takes a nonnegative integer count, got {k!r}")
            return int(k)

        def sizes(key):
            vals = tuple(int(d) for d in np.atleast_1d(cones.get(key, ())))
            if any(d < 1 for d in vals):
                raise ValueError(f"cone {key!r} takes a list of positive sizes, got {vals}")
            return vals

        alphas = tuple(float(a) for a in np.atleast_1d(cones.get("p", ())))
        if any(not 0.0 < abs(a) < 1.0 for a in alphas):
            raise ValueError(f"power cone parameters must lie in (-1, 0) ∪ (0, 1), got {alphas}")
        return cls(z=count("z"), l=count("l"), q=sizes("q"), s=sizes("s"), ep=count("ep"),
                   ed=count("ed"), p=alphas)

    @property
    def polyhedral(self) -> bool:
        """Whether only zero and nonnegative cones appear (``DΠ`` piecewise constant)."""
        return not (self.q or self.s or self.ep or self.ed or self.p)

    @property
    def size(self) -> int:
        """Total number of rows."""
        return (self.z + self.l + sum(self.q) + sum(d * (d + 1) // 2 for d in self.s)
                + 3 * (self.ep + self.ed + len(self.p)))

    def to_scs(self) -> dict:
        """SCS's cone dictionary (empty cones left out)."""
        out = {"z": self.z, "l": self.l, "q": list(self.q), "s": list(self.s), "ep": self.ep,
               "ed": self.ed, "p": list(self.p)}
        return {k: v for k, v in out.items() if v}


@dataclass(frozen=True)
class _Group:
    """Cones of one kind (and size) handled together: ``idx`` holds their rows, one cone per
    row of ``idx`` (a flat index array for the separable kinds)."""

    kind: str
    idx: np.ndarray
    param: object = None  # PSD order, or the power cones' α (negative: dual)
    names: tuple = ()  # for messages: ("q[0]", "q[2]", …)


@lru_cache(maxsize=128)
def _groups(dims: ConeDims, dual: bool) -> tuple[_Group, ...]:
    """The product cone (or its dual) as groups of same-kind cones, with their rows. Cached:
    every projection and derivative asks again for the same cones (W4: 386 calls per layer
    call, 34 of 300 ms under cProfile before the cache); read-only."""
    groups, off = [], 0

    def take(n):
        nonlocal off
        idx = np.arange(off, off + n)
        off += n
        return idx

    if dims.z:
        groups.append(_Group("free" if dual else "zero", take(dims.z)))
    if dims.l:
        groups.append(_Group("nonneg", take(dims.l)))
    for key, kind, lengths in (("q", "soc", list(dims.q)),
                               ("s", "psd", [d * (d + 1) // 2 for d in dims.s])):
        starts = off + np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(int)
        orders = dims.q if key == "q" else dims.s
        for size in sorted(set(orders)):
            sel = np.flatnonzero(np.asarray(orders) == size)
            length = size if key == "q" else size * (size + 1) // 2
            groups.append(_Group(kind, starts[sel][:, None] + np.arange(length), size,
                                 tuple(f"{key}[{i}]" for i in sel)))
        off += int(sum(lengths))
    for key, count in (("ep", dims.ep), ("ed", dims.ed)):
        if count:
            kind = "exp" if (key == "ep") != dual else "exp_dual"
            groups.append(_Group(kind, take(3 * count).reshape(count, 3), None,
                                 tuple(f"{key}[{i}]" for i in range(count))))
    if dims.p:
        alpha = np.asarray(dims.p, dtype=np.float64)
        groups.append(_Group("pow", take(3 * len(alpha)).reshape(-1, 3),
                             -alpha if dual else alpha,
                             tuple(f"p[{i}]" for i in range(len(alpha)))))
    return tuple(groups)


# --------------------------------------------------------------------------- svec / smat

@lru_cache(maxsize=None)
def _tri(d: int):
    """Row and column of each svec entry (lower triangle, column by column) and its scale."""
    cols, rows = np.triu_indices(d)  # (row ≤ col) by rows == (col ≥ row) by columns, swapped
    scale = np.where(rows == cols, 1.0, _SQRT2)
    return rows, cols, scale


def svec_entries(d: int):
    """``(rows, cols, scale)`` of the :func:`svec` entries of a ``d × d`` matrix: entry ``k``
    is ``scale[k] · ½(X[rows[k], cols[k]] + X[cols[k], rows[k]])`` (lower triangle, column by
    column; scale 1 on the diagonal, √2 off it)."""
    return _tri(d)


def psd_order(length: int) -> int:
    """The matrix order ``d`` of an svec of ``length = d(d+1)/2`` entries."""
    d = int(round((math.sqrt(8 * length + 1) - 1) / 2))
    if d * (d + 1) // 2 != length:
        raise ValueError(f"{length} is not the length of an svec (d(d+1)/2)")
    return d


def svec(X):
    """SCS's vectorization of the symmetric part ``½(X + Xᵀ)`` of ``X (..., d, d)``: its
    lower triangle column by column, off-diagonal entries times √2 (an isometry:
    ``⟨svec X, svec Y⟩ = tr(XY)`` for symmetric ``X, Y``). numpy arrays or torch tensors
    (differentiable), with any leading dimensions."""
    d = X.shape[-1]
    rows, cols, scale = _tri(d)
    if isinstance(X, torch.Tensor):
        S = 0.5 * (X + X.transpose(-1, -2))
        r, c = torch.as_tensor(rows, device=X.device), torch.as_tensor(cols, device=X.device)
        return S[..., r, c] * torch.as_tensor(scale, dtype=X.dtype, device=X.device)
    X = np.asarray(X)
    return 0.5 * (X + np.swapaxes(X, -1, -2))[..., rows, cols] * scale


def smat(v):
    """The symmetric matrix ``(..., d, d)`` whose :func:`svec` is ``v (..., d(d+1)/2)``;
    numpy arrays or torch tensors (differentiable)."""
    d = psd_order(v.shape[-1])
    rows, cols, scale = _tri(d)
    if isinstance(v, torch.Tensor):
        r, c = torch.as_tensor(rows, device=v.device), torch.as_tensor(cols, device=v.device)
        w = v / torch.as_tensor(scale, dtype=v.dtype, device=v.device)
        X = v.new_zeros(*v.shape[:-1], d, d)
        X[..., r, c] = w
        X[..., c, r] = w
        return X
    v = np.asarray(v, dtype=np.float64)
    X = np.zeros(v.shape[:-1] + (d, d))
    X[..., rows, cols] = v / scale
    X[..., cols, rows] = v / scale
    return X


# --------------------------------------------------------------------------- SOC

def _soc_project(V: np.ndarray) -> np.ndarray:
    t, x = V[:, 0], V[:, 1:]
    nx = np.linalg.norm(x, axis=1)
    out = np.where((nx <= t)[:, None], V, 0.0)
    mid = nx > np.abs(t)
    coef = 0.5 * (1.0 + t[mid] / nx[mid])
    out[mid, 0] = coef * nx[mid]
    out[mid, 1:] = coef[:, None] * x[mid]
    return out


def _soc_derivative(V: np.ndarray) -> np.ndarray:
    """``(k, d, d)``: ``I`` inside the cone (``‖x‖ ≤ t``), ``0`` inside its polar
    (``‖x‖ ≤ -t``), and between them ``½[[1, x̂ᵀ], [x̂, (1 + τ)I - τ x̂x̂ᵀ]]`` with
    ``x̂ = x/‖x‖``, ``τ = t/‖x‖`` (written for every row, then overwritten where the point
    is inside either cone: one array, no masked copies)."""
    k, d = V.shape
    t, x = V[:, 0], V[:, 1:]
    nx = np.linalg.norm(x, axis=1)
    safe = np.where(nx > 0, nx, 1.0)
    xh, tau = x / safe[:, None], t / safe
    D = np.empty((k, d, d))
    D[:, 0, 0] = 0.5
    D[:, 0, 1:] = D[:, 1:, 0] = 0.5 * xh
    np.multiply((-0.5 * tau)[:, None, None] * xh[:, :, None], xh[:, None, :], out=D[:, 1:, 1:])
    diagonal = np.arange(1, d)
    D[:, diagonal, diagonal] += (0.5 * (1.0 + tau))[:, None]
    D[nx <= -t] = 0.0
    D[nx <= t] = np.eye(d)  # (the origin, in both, takes I)
    return D


# --------------------------------------------------------------------------- PSD

def _psd_project(V: np.ndarray) -> np.ndarray:
    lam, Q = np.linalg.eigh(smat(V))
    return svec((Q * np.maximum(lam, 0.0)[:, None, :]) @ np.swapaxes(Q, -1, -2))


def _psd_derivative(V: np.ndarray) -> np.ndarray:
    """``(k, N, N)``: ``DΠ[m, n] = ⟨G_m, B ∘ G_n⟩`` with ``G_n = QᵀE_nQ`` for the
    orthonormal svec basis ``E_n`` (symmetric by construction)."""
    k, N = V.shape
    d = psd_order(N)
    lam, Q = np.linalg.eigh(smat(V))
    li, lj = lam[:, :, None], lam[:, None, :]
    pi, pj = np.maximum(li, 0.0), np.maximum(lj, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        B = np.where((li > 0) & (lj > 0), 1.0,
                     np.where((li <= 0) & (lj <= 0), 0.0, (pi - pj) / (li - lj)))
    rows, cols, scale = _tri(d)
    Qi, Qj = Q[:, rows, :], Q[:, cols, :]  # (k, N, d): rows of Q for each basis entry
    G = (Qi[..., :, None] * Qj[..., None, :] + Qj[..., :, None] * Qi[..., None, :])
    G *= (0.5 * np.where(rows == cols, 1.0, _SQRT2))[None, :, None, None]
    G = G.reshape(k, N, d * d)
    return (G * B.reshape(k, 1, d * d)) @ np.swapaxes(G, -1, -2)


# --------------------------------------------------------------------------- 3-d cones

def _curved_derivative(kt, w, n):
    """``H⁻¹ - H⁻¹n nᵀH⁻¹/(nᵀH⁻¹n)`` with ``H = I + κ w wᵀ``, for ``k`` cones at once, given
    the unit vectors ``ŵ = w/‖w‖``, ``n`` and ``κ̃ = κ‖w‖²`` (``inf`` allowed: the limit
    ``H⁻¹ = I - ŵŵᵀ``), so that extreme points give no ``inf - inf``."""
    with np.errstate(divide="ignore"):
        coef = 1.0 / (1.0 + 1.0 / kt)  # κ̃/(1 + κ̃), 1 at κ̃ = inf, 0 at κ̃ = 0
    Hinv = np.eye(3) - coef[:, None, None] * w[:, :, None] * w[:, None, :]
    Hn = np.einsum("kij,kj->ki", Hinv, n)
    denom = np.einsum("ki,ki->k", n, Hn)
    scale = np.where(denom > 0, 1.0 / np.where(denom > 0, denom, 1.0), 0.0)
    return Hinv - scale[:, None, None] * Hn[:, :, None] * Hn[:, None, :]


def _unit(W):
    return W / np.linalg.norm(W, axis=1, keepdims=True)


def _unit_rows(V):
    """Rows scaled to unit norm (projections onto cones are positively homogeneous)."""
    nrm = np.linalg.norm(V, axis=1)
    return V / np.where(nrm > 0, nrm, 1.0)[:, None], nrm


# exponential cone --------------------------------------------------------------------

def _exp_in_cone(r, s, t):
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        return ((s > 0) & (s * np.exp(r / s) <= t)) | ((r <= 0) & (s == 0) & (t >= 0))


def _exp_in_polar(r, s, t):
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        return ((r > 0) & (r * np.exp(s / r - 1.0) <= -t)) | ((r == 0) & (s <= 0) & (t <= 0))


def _exp_h(r, s, t, rho):
    """Friberg's function of ``ρ`` (increasing on the bracket) and its derivative."""
    ep, en = np.exp(rho), np.exp(-rho)
    f = ((rho - 1) * r + s) * ep - (r - rho * s) * en - (rho * (rho - 1) + 1) * t
    df = (rho * r + s) * ep + (r - (rho - 1) * s) * en - (2 * rho - 1) * t
    return f, df


def _exp_bracket(r, s, t, pdist, ddist):
    """Friberg's bracket ``[low, upr]`` of the root of :func:`_exp_h`."""
    k = len(r)
    low, upr = np.full(k, -np.inf), np.full(k, np.inf)
    baselow, baseupr = np.full(k, -np.inf), np.full(k, np.inf)
    Dp = np.sqrt(np.maximum(pdist ** 2 - np.minimum(s, 0) ** 2, 0.0))
    Dd = np.sqrt(np.maximum(ddist ** 2 - np.minimum(r, 0) ** 2, 0.0))
    root = np.sqrt(r ** 2 + s ** 2 - r * s)
    # ψ for the primal and dual bounds, each by the formula free of cancellation
    psi_p = np.where(r > s, (r - s + root) / np.where(r > s, r, 1.0),
                     -s / np.where(r > s, -1.0, r - s - root))
    pval = ((psi_p - 1) * r + s) / (psi_p * (psi_p - 1) + 1)
    psi_d = np.where(s > r, (r - root) / np.where(s > r, s, 1.0),
                     (r - s) / np.where(s > r, 1.0, r + root))
    dval = (r - psi_d * s) / (psi_d * (psi_d - 1) + 1)

    def pomega(rho):
        val = np.exp(rho) / (rho * (rho - 1) + 1)
        return np.where(rho < 2.0, np.minimum(val, math.exp(2.0) / 3), val)

    def domega(rho):
        val = -np.exp(-rho) / (rho * (rho - 1) + 1)
        return np.where(rho > -1.0, np.maximum(val, -math.e / 3), val)

    low = np.where(t > 0, np.maximum(low, np.log(np.where(t > 0, t, 1.0) / pval)), low)
    upr = np.where(t < 0, np.minimum(upr, -np.log(np.where(t < 0, -t, 1.0) / dval)), upr)
    rp = r > 0
    baselow = np.where(rp, 1 - s / np.where(rp, r, 1.0), baselow)
    low = np.where(rp, np.maximum(low, baselow), low)
    tpu = np.maximum(1e-12, np.minimum(Dd, Dp + t))
    bnd = np.maximum(low, baselow + tpu / np.where(rp, r, 1.0) / pomega(low))
    upr = np.where(rp, np.minimum(upr, bnd), upr)
    sp_ = s > 0
    baseupr = np.where(sp_, r / np.where(sp_, s, 1.0), baseupr)
    upr = np.where(sp_, np.minimum(upr, baseupr), upr)
    tdl = -np.maximum(1e-12, np.minimum(Dp, Dd - t))
    bnd = np.minimum(upr, baseupr - tdl / np.where(sp_, s, 1.0) / domega(upr))
    low = np.where(sp_, np.maximum(low, bnd), low)
    low, upr = np.minimum(low, upr), np.maximum(low, upr)
    low, upr = np.clip(low, baselow, baseupr), np.clip(upr, baselow, baseupr)
    fl, _ = _exp_h(r, s, t, low)
    fu, _ = _exp_h(r, s, t, upr)
    bad = (low != upr) & ~(fl * fu < 0)
    keep_low = (np.abs(fl) < np.abs(fu)) | np.isnan(fl)
    return np.where(bad & ~keep_low, upr, low), np.where(bad & keep_low, low, upr)


def _exp_root(r, s, t, low, upr):
    """The root of the increasing :func:`_exp_h` in ``[low, upr]``: Newton with damped steps
    to the bracket's ends (Friberg's scheme), bisection for the members it does not settle."""
    xl, xh = low.copy(), upr.copy()
    x0 = 0.5 * (xl + xh)
    xx = x0.copy()
    todo = np.ones(len(r), dtype=bool)  # still in Newton
    done = np.zeros(len(r), dtype=bool)  # converged
    for _ in range(20):
        if not todo.any():
            break
        f, df = _exp_h(r, s, t, x0)
        xl = np.where(todo & (f < 0), x0, xl)
        xh = np.where(todo & (f >= 0), x0, xh)
        closed = todo & (xh <= xl)
        done |= closed
        todo &= ~closed
        usable = np.isfinite(f) & (df >= _EPS ** (6 / 7))
        todo &= usable  # the others go to bisection
        xx = np.where(todo, x0 - f / np.where(usable, df, 1.0), xx)
        small = todo & (np.abs(xx - x0) <= _EPS * np.maximum(1.0, np.abs(xx)))
        done |= small
        todo &= ~small
        x0 = np.where(todo & (xx >= xh), np.minimum(0.05 * x0 + 0.95 * xh, xh),
                      np.where(todo & (xx <= xl), np.maximum(0.05 * x0 + 0.95 * xl, xl),
                               np.where(todo, xx, x0)))
    bis = ~done
    for _ in range(200):
        if not bis.any():
            break
        f, _ = _exp_h(r, s, t, x0)
        xl = np.where(bis & (f < 0), x0, xl)
        xh = np.where(bis & ~(f < 0), x0, xh)
        xx = np.where(bis, 0.5 * (xl + xh), xx)
        stop = bis & ((np.abs(xx - x0) <= _EPS * np.maximum(1.0, np.abs(xx)))
                      | (xx == xl) | (xx == xh))
        x0 = np.where(bis, xx, x0)
        bis &= ~stop
    return np.clip(xx, xl, xh)


def _exp_parts(V: np.ndarray):
    """``(Π_K(v), v - Π_K(v), ρ)`` for rows ``v`` of ``V (k, 3)``, ``K`` the exponential cone
    (``ρ`` is NaN where no root search ran).

    Exact closed forms for ``v ∈ K``, ``v ∈ K°`` and ``x, y ≤ 0``; otherwise Friberg's
    algorithm: two heuristic projections (onto the perspective boundary and interior),
    then, unless one is already optimal, the root ``ρ`` of his univariate function in his
    bracket, and for the primal and the polar part the better of heuristic and root."""
    U, nrm = _unit_rows(V)
    r, s, t = U.T
    vp, vd = np.zeros_like(U), np.zeros_like(U)
    in_k, in_polar = _exp_in_cone(r, s, t), _exp_in_polar(r, s, t)
    vp[in_k] = U[in_k]
    vd[in_polar] = U[in_polar]
    flat = (r <= 0) & (s <= 0) & ~in_k & ~in_polar  # projection onto the face y = 0
    vp[flat] = np.column_stack((r[flat], np.zeros(flat.sum()), np.maximum(t[flat], 0)))
    vd[flat] = U[flat] - vp[flat]
    rest = ~(in_k | in_polar | flat)
    rho = np.full(len(U), np.nan)
    if rest.any():
        vp[rest], vd[rest], rho[rest] = _exp_friberg(U[rest])
    return vp * nrm[:, None], vd * nrm[:, None], rho


def _exp_friberg(U):
    """Friberg's algorithm on unit rows ``U`` outside the closed-form cases: ``(p, v - p, ρ)``."""
    r, s, t = U.T
    tol = _EPS ** (2 / 3)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        # heuristic primal: perspective boundary, or interior (raise t)
        vp = np.column_stack((np.minimum(r, 0), np.zeros_like(r), np.maximum(t, 0)))
        pdist = np.linalg.norm(vp - U, axis=1)
        tp = np.maximum(t, s * np.exp(r / np.where(s > 0, s, 1.0)))
        better = (s > 0) & (tp - t < pdist)
        vp[better] = np.column_stack((r, s, tp))[better]
        pdist = np.where(better, tp - t, pdist)
        # heuristic polar: perspective boundary, or interior (lower t)
        vd = np.column_stack((np.zeros_like(r), np.minimum(s, 0), np.minimum(t, 0)))
        ddist = np.linalg.norm(vd - U, axis=1)
        td = np.minimum(t, -r * np.exp(s / np.where(r > 0, r, 1.0) - 1))
        better = (r > 0) & (t - td < ddist)
        vd[better] = np.column_stack((r, s, td))[better]
        ddist = np.where(better, t - td, ddist)

        rho_all = np.full(len(U), np.nan)
        settled = ((np.minimum(pdist, ddist) <= tol)
                   | ((np.abs(vp + vd - U).max(axis=1) <= tol)
                      & (np.einsum("ki,ki->k", vp, vd) <= tol)))
        go = ~settled
        if go.any():
            rg, sg, tg = r[go], s[go], t[go]
            low, upr = _exp_bracket(rg, sg, tg, pdist[go], ddist[go])
            rho = _exp_root(rg, sg, tg, low, upr)
            rho_all[go] = rho
            quad = rho * (rho - 1) + 1
            lin, e = (rho - 1) * rg + sg, np.exp(rho)
            cand = np.column_stack((rho, np.ones_like(rho), e)) * (lin / quad)[:, None]
            dist = np.linalg.norm(cand - U[go], axis=1)
            take = (lin > 0) & np.isfinite(e) & (dist <= pdist[go])
            idx = np.flatnonzero(go)[take]
            vp[idx] = cand[take]
            lin, e = rg - rho * sg, np.exp(-rho)
            cand = np.column_stack((np.ones_like(rho), 1 - rho, -e)) * (lin / quad)[:, None]
            dist = np.linalg.norm(cand - U[go], axis=1)
            take = (lin > 0) & np.isfinite(e) & (dist <= ddist[go])
            idx = np.flatnonzero(go)[take]
            vd[idx] = cand[take]
    return vp, vd, rho_all


def _exp_project(V: np.ndarray) -> np.ndarray:
    return _exp_parts(V)[0]


def _exp_derivative(V: np.ndarray) -> np.ndarray:
    U, _ = _unit_rows(V)
    r, s, t = U.T
    vp, vd, rho = _exp_parts(U)
    D = np.zeros((len(U), 3, 3))
    in_k, in_polar = _exp_in_cone(r, s, t), _exp_in_polar(r, s, t)
    flat = (r <= 0) & (s <= 0) & ~in_k & ~in_polar
    D[in_k] = np.eye(3)
    D[flat, 0, 0] = 1.0
    D[flat, 2, 2] = (t[flat] > 0).astype(float)
    rest = ~(in_k | in_polar | flat)
    # from the root ρ: p = a (ρ, 1, exp ρ), v - p = β (1, 1 - ρ, -exp(-ρ)), κ = β/a,
    # w = (1, -ρ, 0)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        quad = rho * (rho - 1) + 1
        a = ((rho - 1) * r + s) / quad
        beta = np.maximum((r - rho * s) / quad, 0.0)
        curved = rest & np.isfinite(rho) & (a > 0)
        if curved.any():
            rc = rho[curved]
            w = np.column_stack((np.ones_like(rc), -rc, np.zeros_like(rc)))
            kt = beta[curved] / a[curved] * (1 + rc * rc)
            # the normal (1, 1 - ρ, -exp(-ρ)), scaled by exp ρ where ρ < 0 to stay finite
            en, ep = np.exp(-np.abs(rc)), np.ones_like(rc)
            neg = rc < 0
            n = np.where(neg[:, None], np.column_stack((en, (1 - rc) * en, -ep)),
                         np.column_stack((ep, 1 - rc, -en)))
            D[curved] = _curved_derivative(kt, _unit(w), _unit(n))
    # settled by Friberg's heuristics within round-off (no root search): the same formula
    # with ρ, κ read off p and v - p where p is off the face y = 0, else that face's
    rim = rest & ~curved & (vp[:, 1] > 0) & (np.linalg.norm(vd, axis=1) > 0)
    if rim.any():
        p, d = vp[rim], vd[rim]
        rc = p[:, 0] / p[:, 1]
        w = np.column_stack((np.ones_like(rc), -rc, np.zeros_like(rc)))
        D[rim] = _curved_derivative(np.maximum(d[:, 0], 0) / p[:, 1] * (1 + rc * rc),
                                    _unit(w), _unit(d))
    face = rest & ~curved & ~rim
    D[face, 0, 0] = (vp[face, 0] < 0)
    D[face, 2, 2] = (vp[face, 2] > 0)
    return D


def _exp_case(V: np.ndarray) -> np.ndarray:
    """Which formula of the projection applies (for locating kinks)."""
    r, s, t = V.T
    case = np.full(len(V), 4)
    case[(r <= 0) & (s <= 0)] = np.where(t[(r <= 0) & (s <= 0)] > 0, 3, 5)
    case[_exp_in_polar(r, s, t)] = 2
    case[_exp_in_cone(r, s, t)] = 1
    return case


# power cone --------------------------------------------------------------------------

def _pow_in_cone(x, y, z, a):
    with np.errstate(invalid="ignore", divide="ignore"):
        return (x >= 0) & (y >= 0) & (np.power(np.maximum(x, 0), a)
                                      * np.power(np.maximum(y, 0), 1 - a) >= np.abs(z))


def _pow_in_polar(x, y, z, a):
    with np.errstate(invalid="ignore", divide="ignore"):
        return (x <= 0) & (y <= 0) & (np.power(np.maximum(-x, 0) / a, a)
                                      * np.power(np.maximum(-y, 0) / (1 - a), 1 - a)
                                      >= np.abs(z))


def _pow_xy(x0, a, r, mu):
    """``X = ½(x0 + √(x0² + 4arμ))`` without cancellation, and ``dX/dr`` along ``μ = |z| - r``."""
    delta = 4 * a * r * mu
    root = np.sqrt(x0 * x0 + delta)
    X = np.where(x0 >= 0, 0.5 * (x0 + root), 0.5 * delta / np.where(x0 >= 0, 1.0, root - x0))
    dX = a * (mu - r) / np.where(root > 0, root, 1.0)
    return X, dX


def _pow_radius(x0, y0, az, a):
    """The root ``r ∈ (0, |z|)`` of ``Φ(r) = X(r)^α Y(r)^(1-α) - r`` (``Φ(0) ≥ 0 > Φ(|z|)``):
    Newton steps kept inside a shrinking sign bracket, bisection where a step leaves it.
    ``r`` and ``μ = |z| - r`` are carried separately, each to full relative precision (the
    projection's ``X`` and ``Y`` depend on the product ``rμ``, and either may be tiny).
    Returns ``(r, μ)``."""
    r, mu = 0.5 * az, 0.5 * az
    lo, hi = np.zeros_like(az), az.copy()  # bracket of r ...
    mu_hi, mu_lo = az.copy(), np.zeros_like(az)  # ... and of μ at its ends
    todo = np.ones(len(az), dtype=bool)
    for _ in range(200):
        i = np.flatnonzero(todo)
        ai, ri, mi = a[i], r[i], mu[i]
        X, dX = _pow_xy(x0[i], ai, ri, mi)
        Y, dY = _pow_xy(y0[i], 1 - ai, ri, mi)
        phi = np.power(X, ai) * np.power(Y, 1 - ai)
        F = phi - ri
        up = F > 0
        lo[i], mu_hi[i] = np.where(up, ri, lo[i]), np.where(up, mi, mu_hi[i])
        hi[i], mu_lo[i] = np.where(up, hi[i], ri), np.where(up, mu_lo[i], mi)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            step = -F / (phi * (ai * dX / X + (1 - ai) * dY / Y) - 1)
        newton = (np.isfinite(step) & (ri + step >= lo[i]) & (ri + step <= hi[i])
                  & (mi - step >= mu_lo[i]) & (mi - step <= mu_hi[i]))
        r[i] = np.where(newton, ri + step, 0.5 * (lo[i] + hi[i]))
        mu[i] = np.where(newton, mi - step, 0.5 * (mu_lo[i] + mu_hi[i]))
        small = 4 * _EPS * np.minimum(r[i], mu[i])  # resolution of the smaller of r, μ
        width = np.where(r[i] <= mu[i], hi[i] - lo[i], mu_hi[i] - mu_lo[i])
        settled = (newton & (np.abs(step) <= small)) | (width <= small)
        todo[i[settled]] = False
        if not todo.any():
            break
    return r, mu


def _pow_parts(V: np.ndarray, alpha: np.ndarray):
    """``(Π_K(v), v - Π_K(v))`` for rows of ``V (k, 3)``, ``K`` the power cone of ``α``."""
    U, nrm = _unit_rows(V)
    x, y, z = U.T
    vp = np.zeros_like(U)
    in_k, in_polar = _pow_in_cone(x, y, z, alpha), _pow_in_polar(x, y, z, alpha)
    vp[in_k] = U[in_k]
    flat = (z == 0) & ~in_k & ~in_polar
    vp[flat] = np.column_stack((np.maximum(x, 0), np.maximum(y, 0), np.zeros_like(x)))[flat]
    vd = U - vp
    rest = ~(in_k | in_polar | flat)
    if rest.any():
        a, az = alpha[rest], np.abs(z[rest])
        rad, mu = _pow_radius(x[rest], y[rest], az, a)
        X, _ = _pow_xy(x[rest], a, rad, mu)
        Y, _ = _pow_xy(y[rest], 1 - a, rad, mu)
        vp[rest] = np.column_stack((X, Y, np.sign(z[rest]) * rad))
        vd[rest] = np.column_stack((x[rest] - X, y[rest] - Y, np.sign(z[rest]) * mu))
    return vp * nrm[:, None], vd * nrm[:, None]


def _pow_derivative_primal(V: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    U, _ = _unit_rows(V)
    x, y, z = U.T
    vp, vd = _pow_parts(U, alpha)
    D = np.zeros((len(U), 3, 3))
    in_k, in_polar = _pow_in_cone(x, y, z, alpha), _pow_in_polar(x, y, z, alpha)
    D[in_k] = np.eye(3)
    flat = (z == 0) & ~in_k & ~in_polar
    D[flat, 0, 0], D[flat, 1, 1] = (x[flat] > 0), (y[flat] > 0)
    curved = ~(in_k | in_polar | flat)
    if curved.any():
        # κ = μα(1-α)r, w = (1/X, -1/Y, 0) ∝ (Y, -X, 0), κ̃ = κ‖w‖² = κ(X² + Y²)/(XY)²
        p, d, a = vp[curved], vd[curved], alpha[curved]
        X, Y = p[:, 0], p[:, 1]
        rad, mu = np.abs(p[:, 2]), np.abs(d[:, 2])
        with np.errstate(divide="ignore", invalid="ignore"):
            kt = mu * a * (1 - a) * rad * (X * X + Y * Y) / (X * Y) ** 2
        kt = np.where(np.isnan(kt), np.inf, kt)
        w = np.column_stack((Y, -X, np.zeros_like(X)))
        D[curved] = _curved_derivative(kt, _unit(w), _unit(d))
    return D


def _pow_case(V: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    x, y, z = V.T
    case = np.where(z > 0, 4, np.where(z < 0, 6, 3))
    case[_pow_in_polar(x, y, z, alpha)] = 2
    case[_pow_in_cone(x, y, z, alpha)] = 1
    return case


def _signed_power(V, alpha, primal_fn):
    """``(α < 0, primal_fn(±V, |α|))``: ``primal_fn`` of the primal power cone of ``|α|``
    evaluated at ``V`` for the primal cones and at ``-V`` for the dual ones (``α < 0``),
    which the caller then maps through Moreau's identity."""
    neg = alpha < 0
    return neg, primal_fn(np.where(neg[:, None], -V, V), np.abs(alpha))


# --------------------------------------------------------------------------- dispatch

def _project_group(g: _Group, V: np.ndarray) -> np.ndarray:
    if g.kind == "zero":
        return np.zeros_like(V)
    if g.kind == "free":
        return V.copy()
    if g.kind == "nonneg":
        return np.maximum(V, 0.0)
    if g.kind == "soc":
        return _soc_project(V)
    if g.kind == "psd":
        return _psd_project(V)
    if g.kind == "exp":
        return _exp_project(V)
    if g.kind == "exp_dual":
        return V + _exp_project(-V)
    neg, P = _signed_power(V, g.param, lambda W, a: _pow_parts(W, a)[0])
    return np.where(neg[:, None], V + P, P)


def _derivative_group(g: _Group, V: np.ndarray) -> np.ndarray:
    """Diagonal ``(k,)`` for the separable kinds, blocks ``(k, d, d)`` for the others."""
    if g.kind == "zero":
        return np.zeros_like(V)
    if g.kind == "free":
        return np.ones_like(V)
    if g.kind == "nonneg":
        return (V > 0).astype(np.float64)
    if g.kind == "soc":
        return _soc_derivative(V)
    if g.kind == "psd":
        return _psd_derivative(V)
    if g.kind == "exp":
        return _exp_derivative(V)
    if g.kind == "exp_dual":
        return np.eye(3) - _exp_derivative(-V)
    neg, D = _signed_power(V, g.param, _pow_derivative_primal)
    return np.where(neg[:, None, None], np.eye(3) - D, D)


def _check(v, dims: ConeDims) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    if v.shape != (dims.size,):
        raise ValueError(f"expected a vector of the cone's size {dims.size}, got shape {v.shape}")
    return v


def project(v, cones, dual: bool = False) -> np.ndarray:
    """``Π_K(v)`` (``Π_{K*}(v)`` with ``dual=True``) for the product cone described by
    ``cones`` (SCS's dictionary or a :class:`ConeDims`)."""
    dims = ConeDims.from_dict(cones)
    v = _check(v, dims)
    out = np.empty_like(v)
    for g in _groups(dims, dual):
        out[g.idx] = _project_group(g, v[g.idx])
    return out


def _over_batch(g: _Group, B: int) -> _Group:
    """The group for ``B`` stacked copies of its cones (per-cone parameters repeated)."""
    if isinstance(g.param, np.ndarray):
        return dataclasses.replace(g, param=np.tile(g.param, B))
    return g


def project_rows(V, cones, dual: bool = False) -> np.ndarray:
    """:func:`project` of every row of ``V (B, size)``: ``(B, size)``, each cone group
    projected for the whole batch at once."""
    dims = ConeDims.from_dict(cones)
    V = np.asarray(V, dtype=np.float64)
    out = np.empty_like(V)
    for g in _groups(dims, dual):
        W = V[:, g.idx]
        out[:, g.idx] = _project_group(_over_batch(g, len(V)),
                                       W.reshape(-1, *W.shape[2:])).reshape(W.shape)
    return out


def projection_derivative_blocks(V, cones, dual: bool = False):
    """``DΠ_K`` (``DΠ_{K*}`` with ``dual=True``) at every row of ``V (B, size)``, block
    diagonal: ``(diag, blocks)`` with ``diag (B, size)`` the derivative on the zero, free and
    nonnegative rows (zero where a block sits) and ``blocks`` a list of ``(idx (k, d),
    mats (B, k, d, d))``, one entry per group of same-kind, same-size cones (``idx[j]`` the
    rows of its ``j``-th cone). Each cone group is differentiated for the whole batch at
    once."""
    dims = ConeDims.from_dict(cones)
    V = np.asarray(V, dtype=np.float64)
    B = V.shape[0]
    diag, blocks = np.zeros_like(V), []
    for g in _groups(dims, dual):
        W = V[:, g.idx]
        D = _derivative_group(_over_batch(g, B), W.reshape(-1, *W.shape[2:]))
        if g.idx.ndim == 1:
            diag[:, g.idx] = D.reshape(W.shape)
        else:
            d = g.idx.shape[1]
            blocks.append((g.idx, D.reshape(B, -1, d, d)))
    return diag, blocks


class ProjectionDerivative:
    """``DΠ_K(v)`` for a product cone: a symmetric block-diagonal matrix, kept as a diagonal
    (zero, free and nonnegative rows) plus dense blocks (one per cone of the other kinds).
    Being symmetric, it is its own transpose (``T``)."""

    def __init__(self, size: int, diag: np.ndarray, blocks: list):
        self.shape = (size, size)
        self._diag = diag  # zero where a block sits
        self._blocks = blocks  # [(idx (k, d), mats (k, d, d))]

    @property
    def T(self) -> "ProjectionDerivative":
        return self

    def matvec(self, dv: np.ndarray) -> np.ndarray:
        """``DΠ dv`` for ``dv`` of shape ``(N,)`` or ``(N, r)`` (``r`` vectors at once)."""
        dv = np.asarray(dv, dtype=np.float64)
        cols = dv.reshape(self.shape[0], -1)
        out = self._diag[:, None] * cols
        for idx, mats in self._blocks:
            out[idx] = np.einsum("kij,kjr->kir", mats, cols[idx])
        return out.reshape(dv.shape)

    def to_dense(self) -> np.ndarray:
        return self.matvec(np.eye(self.shape[0]))

    def to_sparse(self) -> sp.csr_matrix:
        rows, cols, vals = [np.flatnonzero(self._diag)], [np.flatnonzero(self._diag)], \
            [self._diag[self._diag != 0]]
        for idx, mats in self._blocks:
            d = idx.shape[1]
            rows.append(np.repeat(idx, d, axis=1).ravel())
            cols.append(np.tile(idx, (1, d)).ravel())
            vals.append(mats.ravel())
        return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                             shape=self.shape)


def projection_derivative(v, cones, dual: bool = False) -> ProjectionDerivative:
    """``DΠ_K(v)`` (``DΠ_{K*}(v)`` with ``dual=True``) as a :class:`ProjectionDerivative`."""
    dims = ConeDims.from_dict(cones)
    v = _check(v, dims)
    diag, blocks = np.zeros_like(v), []
    for g in _groups(dims, dual):
        D = _derivative_group(g, v[g.idx])
        if g.idx.ndim == 1:
            diag[g.idx] = D
        else:
            blocks.append((g.idx, D))
    return ProjectionDerivative(dims.size, diag, blocks)


def _kinks_3d(W: np.ndarray, alpha, tol: np.ndarray) -> np.ndarray:
    """Rows of ``W`` near a kink of the projection onto the exponential cone (``alpha`` None)
    or the power cones of ``alpha``: the applicable formula changes within ``tol`` (one per
    row), or the projection lies within ``tol`` of the cone's nonsmooth edge (``y = 0``,
    resp. ``x = 0`` or ``y = 0``), where the curvature of the boundary blows up."""
    steps = np.vstack((np.zeros(3), np.eye(3), -np.eye(3)))
    pts = (W[:, None, :] + tol[:, None, None] * steps[None]).reshape(-1, 3)
    if alpha is None:
        case = _exp_case(pts).reshape(-1, 7)
        vp = _exp_parts(W)[0]
        edge = (case[:, 0] == 4) & (vp[:, 1] <= tol)
    else:
        case = _pow_case(pts, np.repeat(alpha, 7)).reshape(-1, 7)
        vp = _pow_parts(W, alpha)[0]
        edge = (case[:, 0] >= 4) & (np.minimum(vp[:, 0], vp[:, 1]) <= tol)
    return (case != case[:, :1]).any(axis=1) | edge


def kinks(v, cones, dual: bool = False, rtol: float = KINK_RTOL) -> list[str]:
    """The cones (as ``"l[3]"``, ``"q[0]"``, ``"s[1]"``, ``"ep[0]"``, …) at which ``v`` lies
    within ``rtol · max(1, ‖v‖∞)`` of a point where ``Π_K`` (``Π_{K*}``) is not
    differentiable. At a primal-dual solution ``(s, y)`` with ``v = y - s`` these are the
    cones where strict complementarity fails (``y`` and ``s`` both on the boundary's
    nonsmooth part, e.g. an inequality with ``y_i = s_i = 0``)."""
    dims = ConeDims.from_dict(cones)
    return kinks_rows(_check(v, dims)[None], dims, dual, rtol)[0]


def kinks_rows(V, cones, dual: bool = False, rtol: float = KINK_RTOL) -> list[list[str]]:
    """:func:`kinks` of every row of ``V (B, size)``, each cone group tested for the whole
    batch at once."""
    dims = ConeDims.from_dict(cones)
    V = np.asarray(V, dtype=np.float64)
    B = len(V)
    tol = rtol * np.maximum(1.0, np.abs(V).max(axis=1, initial=0.0))  # (B,)
    out: list[list[str]] = [[] for _ in range(B)]
    for g in _groups(dims, dual):
        if g.kind in ("zero", "free"):
            continue
        W = V[:, g.idx]
        if g.kind == "nonneg":
            for b, i in zip(*np.nonzero(np.abs(W) <= tol[:, None])):
                out[b].append(f"l[{i}]")
            continue
        flat = W.reshape(-1, W.shape[-1])
        tol_flat = np.repeat(tol, W.shape[1])
        if g.kind == "soc":
            bad = np.abs(np.linalg.norm(flat[:, 1:], axis=1) - np.abs(flat[:, 0])) <= tol_flat
        elif g.kind == "psd":
            bad = np.abs(np.linalg.eigvalsh(smat(flat))).min(axis=1) <= tol_flat
        else:  # three-dimensional cones
            group = _over_batch(g, B)
            if g.kind == "exp_dual":
                flat = -flat
            elif g.kind == "pow":
                flat = np.where((group.param < 0)[:, None], -flat, flat)
            bad = _kinks_3d(flat, np.abs(group.param) if g.kind == "pow" else None, tol_flat)
        for b, k in zip(*np.nonzero(bad.reshape(B, -1))):
            out[b].append(g.names[k])
    return out
