"""Conic backend: the derivative of a cone program's solution through its residual map.

Problem (SCS's form; ``K`` a product of the cones of :mod:`.cones`, ``K*`` its dual)::

    primal   min ½ xᵀPx + cᵀx   s.t.   A x + s = b,   s ∈ K
    dual     y ∈ K*,   P x + Aᵀy + c = 0,   sᵀy = 0

``y`` is SCS's dual variable. With the Lagrangian ``½ xᵀPx + cᵀx + yᵀ(A x + s - b)`` the
**shadow price** of row ``i`` is ``∂f*/∂b_i = -y_i`` (and ``∂f*/∂c = x``, ``∂f*/∂A = y xᵀ``).
For example a row ``aᵀx ≤ h`` stored as ``s = h - aᵀx ∈ ℝ₊`` (``b_i = h``) has shadow price
``∂f*/∂h = -y_i ≤ 0``; a row ``aᵀx ≥ h`` stored as ``s = aᵀx - h`` (``b_i = -h``) has
``∂f*/∂h = y_i ≥ 0``.

**Residual map** (Agrawal, Barratt, Boyd, Busseti, Moursi, *Differentiating through a cone
program*, 2019). With ``z = (u, v)``, ``u = x``, ``v = y - s`` and Moreau's decomposition
``y = Π_{K*}(v)``, ``s = Π_{K*}(v) - v`` (so ``y ∈ K*``, ``s ∈ K``, ``y ⊥ s`` hold for every
``v``), the optimality conditions are ``R(z; A, b, c, P) = 0`` for ::

    R(u, v) = [ P u + Aᵀ Π_{K*}(v) + c ;  b - A u + v - Π_{K*}(v) ]

whose Jacobian, with ``D = DΠ_{K*}(v)`` (symmetric, :mod:`.cones`), is ::

    M = [[P, Aᵀ D], [-A, I - D]].

Without ``P`` this is the leading ``(n+m)`` block of the paper's ``((Q - I) DΠ(z) + I)``
with the skew-symmetric ``Q = [[0, Aᵀ, c], [-A, 0, b], [-cᵀ, -bᵀ, 0]]`` and ``w = 1``: the
paper's homogeneous ``(n+m+1)`` matrix always has ``z`` itself in its null space (``Π`` is
positively homogeneous, so ``DΠ(z) z = Π(z)``), and fixing ``w = 1`` removes exactly that
direction; its ``w`` row is ``-uᵀ`` times the first block row plus ``-Π_{K*}(v)ᵀ`` times the
second (``cᵀx + bᵀy + xᵀPx = yᵀs = 0``), so nothing is lost. ``M`` is nonsingular exactly
when the solution is unique and strictly complementary enough for the solution map to be
differentiable (the paper's condition), and then:

* **forward**: ``M dz = -dR`` with ``dR = [dP x + dAᵀy + dc ; db - dA x]``, and
  ``dx = du``, ``dy = D dv``, ``ds = D dv - dv``;
* **reverse** (the true adjoint, a solve with ``Mᵀ``, not ``M``): for cotangents
  ``(x̄, ȳ, s̄)``, ``Mᵀ r = -[x̄ ; D(ȳ + s̄) - s̄]``, then ``c̄ = r₁``, ``b̄ = r₂``,
  ``Ā = y r₁ᵀ - r₂ xᵀ``, ``P̄ = ½(r₁xᵀ + x r₁ᵀ)``.

``M`` is factorized once (dense LU for ``n + m`` up to ``DENSE_MAX_ORDER``, else sparse
SuperLU) and every ``jvp`` / ``vjp`` reuses it. Before that, the solver's point is refined by
Newton steps on ``R`` (Busseti, Moursi, Boyd, *Solution refinement at regular points of
conic problems*, 2019) with the factorization at the solver's point; ``M`` is then
refactorized once at the refined point, which is what ``jvp`` / ``vjp`` use.

**Singular M** (a non-unique primal or dual solution): the derivative is defined as the
minimum-norm least-squares solution ``dz = -M⁺ dR`` (SVD pseudo-inverse when dense, LSMR to
1e-14 when sparse) and reverse mode is its exact adjoint ``r = -(M⁺)ᵀ z̄``. Along a data
direction that keeps a differentiable solution path (``dR`` in the range of ``M``), this is
an exact tangent of that path, the one of least norm; otherwise it minimizes the residual of
the linearized optimality conditions. A :class:`~torchdiffopt.errors.DegenerateSolutionWarning`
says so, as it does when strict complementarity fails at some cone (:func:`.cones.kinks`),
where the derivative is one-sided (the side of the solver's point).
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp

from ..errors import warn_degenerate
from ..linalg.factorization import DENSE_MAX_ORDER, SparseFactorization
from .cones import ConeDims, kinks, project, projection_derivative

#: estimated reciprocal condition number of ``M`` below which it is treated as singular
SINGULAR_RCOND = 1e-11
#: singular values below this fraction of the largest are dropped by the pseudo-inverse
PINV_RTOL = 1e-11
#: at most this many refinement steps
REFINE_STEPS = 8


class _LinearSystem:
    """``M`` factorized once; ``solve(rhs, transpose)`` for ``rhs`` of shape (N,) or (N, k)."""

    def __init__(self, M, dense: bool):
        self.order = M.shape[0]
        self.dense = dense
        self._pinv = self._lu = None
        if dense:
            M = np.asarray(M, dtype=np.float64)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", sla.LinAlgWarning)
                lu = sla.lu_factor(M, check_finite=False)
            anorm = np.abs(M).sum(axis=0).max(initial=0.0)
            self.rcond = float(sla.lapack.dgecon(lu[0], anorm, norm="1")[0]) if anorm else 0.0
            self.singular = not self.rcond > SINGULAR_RCOND
            if self.singular:
                U, sv, Vt = np.linalg.svd(M)
                keep = sv > PINV_RTOL * sv.max(initial=0.0)
                self._pinv = (Vt[keep].T / sv[keep]) @ U[:, keep].T
            else:
                self._lu = lu
            return
        self._sparse = SparseFactorization(M, rtol=SINGULAR_RCOND)
        self.rcond, self.singular = self._sparse.pivot_ratio, self._sparse.singular

    def solve(self, rhs: np.ndarray, transpose: bool = False) -> np.ndarray:
        rhs = np.asarray(rhs, dtype=np.float64)
        if not self.dense:
            return self._sparse.solve(rhs, transpose)
        if self._pinv is not None:
            return (self._pinv.T if transpose else self._pinv) @ rhs
        return sla.lu_solve(self._lu, rhs, trans=1 if transpose else 0, check_finite=False)


class ResidualMap:
    """The residual map ``R(u, v)`` of one cone program, its Jacobian ``M`` and the
    refinement of a solver's point (module docstring).

    Parameters: ``A`` (m, n) dense or scipy.sparse, ``b`` (m,), ``c`` (n,), ``cones`` (SCS's
    dictionary, ``{"z": …, "l": …, "q": […], "s": […], "ep": …, "ed": …, "p": […]}``),
    optionally ``P`` (n, n) symmetric positive semidefinite (only ``½(P + Pᵀ)`` is used).
    ``dense`` forces dense (True) or sparse (False) matrices ``M``; by default dense up to
    order ``DENSE_MAX_ORDER``.
    """

    def __init__(self, A, b, c, cones, P=None, dense: bool | None = None):
        self.dims = ConeDims.from_dict(cones)
        self._sparse_A = sp.issparse(A)
        self.A = sp.csr_matrix(A, dtype=np.float64) if self._sparse_A \
            else np.asarray(A, dtype=np.float64)
        m, n = self.A.shape
        self.b = np.asarray(b, dtype=np.float64).reshape(-1)
        self.c = np.asarray(c, dtype=np.float64).reshape(-1)
        if self.b.shape != (m,) or self.c.shape != (n,) or self.dims.size != m:
            raise ValueError(f"inconsistent sizes: A {self.A.shape}, b {self.b.shape}, "
                             f"c {self.c.shape}, cones of total size {self.dims.size}")
        self.has_P = P is not None
        if self.has_P:
            Ps = sp.csr_matrix(P, dtype=np.float64) if sp.issparse(P) \
                else np.asarray(P, dtype=np.float64)
            if Ps.shape != (n, n):
                raise ValueError(f"P must be ({n}, {n}), got {Ps.shape}")
            self.P = 0.5 * (Ps + Ps.T)
        else:
            self.P = sp.csr_matrix((n, n))
        self.m, self.n = m, n
        self.dense = (n + m <= DENSE_MAX_ORDER) if dense is None else bool(dense)

    def refined_point(self, x, y, s, refine: bool = True):
        """``(u, v, D, system)`` at the solver's point ``(x, y, s)``, refined by Newton steps
        on ``R`` with ``refine``: ``u = x``, ``v = y - s``, ``D = DΠ_{K*}(v)`` and ``M``
        factorized there."""
        u, v = self.start(x, y, s)
        D, system = self._linearize(v)
        if refine:
            steps = REFINE_STEPS if (system.dense or not system.singular) else 0
            z0 = np.concatenate((u, v))[None]
            z = newton_refine(z0, lambda z, _: self.R(z[0, :self.n], z[0, self.n:])[None],
                              lambda r, _: system.solve(r[0])[None], self.floor(z0), steps)[0]
            if not np.array_equal(z, z0[0]):
                u, v = z[:self.n], z[self.n:]
                D, system = self._linearize(v)
        return u, v, D, system

    def start(self, x, y, s):
        """The point ``(u, v) = (x, y - s)`` of a solver's answer."""
        return (np.asarray(x, dtype=np.float64).reshape(self.n),
                np.asarray(y, dtype=np.float64).reshape(self.m)
                - np.asarray(s, dtype=np.float64).reshape(self.m))

    def floor(self, z: np.ndarray) -> np.ndarray:
        """The residual ``‖R‖∞`` below which refining the points ``z (k, n + m)`` stops:
        round-off at their scale and the data's."""
        scale = max(1.0, np.abs(self.b).max(initial=0.0), np.abs(self.c).max(initial=0.0))
        return 4 * np.finfo(float).eps * np.maximum(scale, np.abs(z).max(axis=1, initial=0.0))

    def R(self, u, v):  # noqa: N802  (the module docstring's name)
        """The residual map ``R(u, v)`` (module docstring)."""
        y = project(v, self.dims, dual=True)
        return np.concatenate((self.P @ u + self.A.T @ y + self.c,
                               self.b - self.A @ u + v - y))

    def _linearize(self, v):
        D = projection_derivative(v, self.dims, dual=True)
        if self.dense:
            A = self.A.toarray() if self._sparse_A else self.A
            P = self.P.toarray() if sp.issparse(self.P) else self.P
            Dd = D.to_dense()
            M = np.block([[P, D.matvec(A).T], [-A, np.eye(self.m) - Dd]])
        else:
            Ds = D.to_sparse()
            A = sp.csr_matrix(self.A)
            M = sp.bmat([[sp.csr_matrix(self.P), A.T @ Ds], [-A, sp.eye(self.m) - Ds]],
                         format="csc")
        return D, _LinearSystem(M, self.dense)


def newton_refine(z, residual, solve, floor, steps: int = REFINE_STEPS) -> np.ndarray:
    """Newton steps ``z ← z - M⁻¹R(z)`` on a batch of points ``z (k, n + m)`` with ``M``
    fixed (factorized at the starting points): ``residual(rows, members)`` and
    ``solve(rows, members)`` map the rows of the given members (indices into ``z``). A
    member's step is kept only if it lowers ``‖R‖∞``; the member stops below its ``floor``,
    at a rejected step, or after a step gaining less than a factor 2. Returns the new points
    (Busseti, Moursi, Boyd, *Solution refinement at regular points of conic problems*)."""
    z = np.array(z, dtype=np.float64)
    members = np.arange(len(z))
    r = residual(z, members)
    norm = np.abs(r).max(axis=1, initial=0.0)
    active = norm > floor
    for _ in range(steps):
        idx = np.flatnonzero(active)
        if not len(idx):
            break
        z_new = z[idx] - solve(r[idx], idx)
        r_new = residual(z_new, idx)
        norm_new = np.abs(r_new).max(axis=1, initial=0.0)
        better = norm_new < norm[idx]
        keep = idx[better]
        slow = norm_new[better] > 0.5 * norm[keep]
        z[keep], r[keep], norm[keep] = z_new[better], r_new[better], norm_new[better]
        active[idx[~better]] = False
        active[keep[slow]] = False
        active &= norm > floor
    return z


class ConicDerivative(ResidualMap):
    """The derivative of ``(A, b, c[, P]) ↦ (x, y, s)`` at a solution of the cone program (see
    the module docstring), from one factorization of ``M``.

    Parameters: those of :class:`ResidualMap`, and the solver's ``x, y, s`` (SCS's
    convention). ``refine`` polishes the point first (recommended: first-order solvers stop
    near 1e-9, too coarse for finite-difference-grade derivatives).

    ``warn`` (default) warns with DegenerateSolutionWarning where ``M`` is singular or
    strict complementarity fails; a caller that reports a batch at once passes False.

    Attributes: ``x, y, s`` (refined), ``residual`` (``‖R(z)‖∞`` at that point), ``singular``,
    ``rcond`` (estimated reciprocal condition number of ``M``), ``kinks`` (cones where strict
    complementarity fails, :func:`.cones.kinks`), ``D`` (``DΠ_{K*}(v)``) and ``system``
    (``M`` factorized: ``system.solve(rhs, transpose)``).
    """

    def __init__(self, A, b, c, cones, x, y, s, P=None, *, refine: bool = True,
                 dense: bool | None = None, warn: bool = True):
        super().__init__(A, b, c, cones, P, dense)
        u, v, D, system = self.refined_point(x, y, s, refine)
        self.D, self.system = D, system
        self.x = u
        self.y = project(v, self.dims, dual=True)
        self.s = self.y - v
        self.residual = float(np.abs(self.R(u, v)).max(initial=0.0))
        self.singular, self.rcond = system.singular, system.rcond
        self.kinks = kinks(v, self.dims, dual=True)
        if warn:
            self._warn()

    def _warn(self):
        if self.singular:
            warn_degenerate(
                f"the cone program's derivative matrix M is singular (reciprocal condition "
                f"{self.rcond:.1e}): the primal or dual solution is not unique. Derivatives "
                "are the minimum-norm least-squares solution of the linearized optimality "
                "conditions (exact along data directions that keep a solution path)")
        if self.kinks:
            shown = ", ".join(self.kinks[:8]) + (" …" if len(self.kinks) > 8 else "")
            warn_degenerate(
                f"strict complementarity fails at cones {shown} (slack and dual both on a "
                "nonsmooth part of the boundary): the solution map has a kink there and "
                "derivatives are one-sided, taken on the side of the solver's point")

    def _split_solve(self, rhs, transpose):
        out = -self.system.solve(rhs, transpose=transpose)
        return out[:self.n], out[self.n:]

    # ------------------------------------------------------------------ public API
    def jvp(self, dA=None, db=None, dc=None, dP=None):
        """Forward mode: the tangents ``(dx, dy, ds)`` of the solution for a tangent of the data
        (any of them None for zero). ``dA`` (m, n) dense or sparse, ``db`` (m,), ``dc`` (n,),
        ``dP`` (n, n) (only its symmetric part matters); dense arguments may carry a leading
        dimension of ``k`` directions (``dA (k, m, n)``, ``db (k, m)``, …), solved together."""
        k = _directions(dA, 3) or _directions(db, 2) or _directions(dc, 2) \
            or _directions(dP, 3)
        K = k or 1
        x, y = self.x, self.y
        rhs_u = np.zeros((K, self.n))
        rhs_v = np.zeros((K, self.m))
        if dc is not None:
            rhs_u += np.asarray(dc, dtype=np.float64).reshape(-1, self.n)
        if db is not None:
            rhs_v += np.asarray(db, dtype=np.float64).reshape(-1, self.m)
        if dA is not None:
            if sp.issparse(dA):
                rhs_u += dA.T @ y
                rhs_v -= dA @ x
            else:
                dA = np.asarray(dA, dtype=np.float64).reshape(-1, self.m, self.n)
                rhs_u += np.einsum("kij,i->kj", dA, y)
                rhs_v -= dA @ x
        if dP is not None:
            if sp.issparse(dP):
                rhs_u += 0.5 * (dP @ x + dP.T @ x)
            else:
                dP = np.asarray(dP, dtype=np.float64).reshape(-1, self.n, self.n)
                rhs_u += 0.5 * (dP @ x + np.einsum("kij,i->kj", dP, x))
        du, dv = self._split_solve(np.concatenate((rhs_u, rhs_v), axis=1).T, False)
        Ddv = self.D.matvec(dv)
        out = (du.T, Ddv.T, (Ddv - dv).T)
        return out if k else tuple(o[0] for o in out)

    def adjoint(self, dx=None, dy=None, ds=None):
        """The adjoint vectors ``(r₁, r₂)`` of cotangents ``(dx, dy, ds)`` of the solution
        (module docstring; shapes ``(n,)``, ``(m,)``, or ``(k, n)``, ``(k, m)`` for ``k``
        cotangents): the data cotangents are ``c̄ = r₁``, ``b̄ = r₂``, ``Ā = y r₁ᵀ - r₂ xᵀ``,
        ``P̄ = ½(r₁xᵀ + x r₁ᵀ)``, which can be read at any entries (:meth:`vjp` forms them)."""
        k = _directions(dx, 2) or _directions(dy, 2) or _directions(ds, 2)
        K = k or 1

        def rows(t, size):
            return np.zeros((K, size)) if t is None \
                else np.broadcast_to(np.asarray(t, dtype=np.float64).reshape(-1, size),
                                     (K, size))
        xb, yb, sb = rows(dx, self.n), rows(dy, self.m), rows(ds, self.m)
        zv = self.D.matvec((yb + sb).T) - sb.T
        r1, r2 = self._split_solve(np.concatenate((xb.T, zv)), True)
        return (r1.T, r2.T) if k else (r1[:, 0], r2[:, 0])

    def vjp(self, dx=None, dy=None, ds=None):
        """Reverse mode: the cotangents of the data for cotangents ``(dx, dy, ds)`` of the
        solution (any of them None for zero; each may carry a leading dimension of ``k``).

        Returns ``(dA, db, dc)``, and ``(dA, db, dc, dP)`` when the object was built with
        ``P`` (``dP`` symmetric). ``dA`` is dense when ``A`` was given dense; when ``A`` is
        sparse it is the cotangent of ``A``'s stored entries, as a sparse matrix of ``A``'s
        pattern (a list of them for ``k`` cotangents)."""
        k = _directions(dx, 2) or _directions(dy, 2) or _directions(ds, 2)
        K = k or 1
        r1, r2 = (r.reshape(K, -1) for r in self.adjoint(dx, dy, ds))  # (K, n), (K, m)
        x, y = self.x, self.y
        if self._sparse_A:
            coo = self.A.tocoo()
            dA = [sp.csr_matrix((y[coo.row] * r1[j, coo.col] - r2[j, coo.row] * x[coo.col],
                                 (coo.row, coo.col)), shape=self.A.shape) for j in range(K)]
        else:
            dA = y[None, :, None] * r1[:, None, :] - r2[:, :, None] * x[None, None, :]
        out = [dA, r2, r1]
        if self.has_P:
            out.append(0.5 * (r1[:, :, None] * x[None, None, :] + x[None, :, None]
                              * r1[:, None, :]))
        return tuple(out) if k else tuple(o[0] for o in out)


def _directions(t, ndim: int):
    """The leading number of directions of a dense argument with ``ndim`` dimensions, or 0."""
    if t is None or sp.issparse(t):
        return 0
    t = np.asarray(t)
    return t.shape[0] if t.ndim == ndim else 0
