"""What the conic solver adapters share: the data check, and the check of the answer.

Every adapter (:mod:`.scs_conic`, :mod:`.clarabel_conic`) solves the cone program ::

    min ½ xᵀPx + cᵀx   s.t.   A x + s = b,   s ∈ K

(``K`` a product of SCS's cones, :mod:`torchdiffopt.backends.cones`; PSD blocks in SCS's
√2-scaled lower-triangle ``svec``) and returns a :class:`ConicSolution` in SCS's
conventions, whatever the solver's own: the primal ``x``, the slack ``s = b - A x ∈ K`` and
the dual ``y ∈ K*`` with ``P x + Aᵀy + c = 0`` and ``sᵀy = 0`` (the shadow price of row
``i`` is ``∂f*/∂b_i = -y_i``). That is the point :class:`~torchdiffopt.backends.conic.
ConicDerivative` takes. The point is checked here (:func:`certify`) rather than trusted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from ..backends.cones import ConeDims, project_rows
from ..errors import SolverError

#: largest relative residual (any of :func:`conic_residuals`) accepted from a solver
ACCEPT_RESIDUAL = 1e-6


@dataclass
class ConicSolution:
    """A solver's answer in SCS's conventions: ``x``, ``y`` (dual, in ``K*``), ``s`` (slack,
    in ``K``), the solver's ``status`` (e.g. ``"solved"``, ``"solved inaccurate"``),
    ``iterations``, the relative ``residuals`` measured on the returned point
    (:func:`conic_residuals`; empty where the caller checks them) and the ``solver``'s name.
    """

    x: np.ndarray
    y: np.ndarray
    s: np.ndarray
    status: str
    iterations: int
    residuals: dict = field(default_factory=dict)
    solver: str = ""


@dataclass
class ConeProgram:
    """Checked data of the cone program: ``A`` (m, n) CSC, ``b`` (m,), ``c`` (n,), ``dims``,
    and ``P`` (n, n) CSC, symmetrized and positive semidefinite, or None."""

    A: sp.csc_matrix
    b: np.ndarray
    c: np.ndarray
    dims: ConeDims
    P: sp.csc_matrix | None

    @property
    def shape(self) -> tuple[int, int]:
        return self.A.shape


def cone_program(A, b, c, cones, P=None) -> ConeProgram:
    """Check and convert the data (float64, sparse ``A`` and ``P``, ``P ← ½(P + Pᵀ)``).

    Raises ``ValueError`` for inconsistent sizes or NaN/inf entries and
    :class:`~torchdiffopt.errors.NonconvexError` for an indefinite ``P``."""
    dims = ConeDims.from_dict(cones)
    A = sp.csc_matrix(A, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    c = np.asarray(c, dtype=np.float64).reshape(-1)
    m, n = A.shape
    if b.shape != (m,) or c.shape != (n,) or dims.size != m:
        raise ValueError(f"inconsistent sizes: A {A.shape}, b {b.shape}, c {c.shape}, "
                         f"cones of total size {dims.size}")
    if not (np.isfinite(A.data).all() and np.isfinite(b).all() and np.isfinite(c).all()):
        raise ValueError("the problem data contain NaN or inf")
    if P is not None:
        P = sp.csc_matrix(P, dtype=np.float64)
        if P.shape != (n, n) or not np.isfinite(P.data).all():
            raise ValueError(f"P must be a finite ({n}, {n}) matrix, got shape {P.shape}")
        P = sp.csc_matrix(0.5 * (P + P.T))
        # imported here: backends.quadratic imports this package's solution types
        from ..backends.quadratic import check_convex

        check_convex(P)
    return ConeProgram(A, b, c, dims, P)


def conic_residuals(A, b, c, cones, x, y, s, P=None) -> dict:
    """Relative residuals of a primal-dual point of the cone program, each scaled by
    ``1 + `` the largest term it compares:

    ``primal`` ``‖Ax + s - b‖∞``, ``dual`` ``‖Px + Aᵀy + c‖∞``, ``gap``
    ``|xᵀPx + cᵀx + bᵀy|``, ``slack_cone`` ``‖s - Π_K(s)‖∞`` and ``dual_cone``
    ``‖y - Π_{K*}(y)‖∞``."""
    Px = np.zeros_like(x) if P is None else P @ x
    rows = residual_rows(*(np.asarray(v)[None] for v in (A @ x, A.T @ y, Px, b, c, x, y, s)),
                         cones)
    return {k: float(v[0]) for k, v in rows.items()}


def residual_rows(Ax, Aty, Px, b, c, x, y, s, cones) -> dict:
    """:func:`conic_residuals` of ``k`` programs at once, from the products ``Ax``, ``Aᵀy``,
    ``Px`` and the data and points, all ``(k, ·)`` rows: each residual a ``(k,)`` array."""
    dims = ConeDims.from_dict(cones)
    inf = lambda *a: np.max([np.abs(t).max(axis=1, initial=0.0) for t in a], axis=0)  # noqa: E731
    xPx, cx, by = ((u * v).sum(axis=1) for u, v in ((x, Px), (c, x), (b, y)))
    return {
        "primal": inf(Ax + s - b) / (1 + inf(Ax, s, b)),
        "dual": inf(Px + Aty + c) / (1 + inf(Px, Aty, c)),
        "gap": np.abs(xPx + cx + by) / (1 + np.max(np.abs([xPx, cx, by]), axis=0)),
        "slack_cone": inf(s - project_rows(s, dims)) / (1 + inf(s)),
        "dual_cone": inf(y - project_rows(y, dims, dual=True)) / (1 + inf(y)),
    }


def certify(program: ConeProgram, x, y, s, solver: str, status: str, iterations: int,
            accept: float | None = ACCEPT_RESIDUAL) -> ConicSolution:
    """The :class:`ConicSolution` of a solver's point (SCS's conventions), or a
    :class:`~torchdiffopt.errors.SolverError` naming ``solver`` when a relative residual
    exceeds ``accept``. With ``accept=None`` the point is returned unchecked (no
    ``residuals``): the caller checks a batch of them at once (:func:`inaccuracy`)."""
    x, y, s = (np.asarray(t, dtype=np.float64) for t in (x, y, s))
    sol = ConicSolution(x, y, s, status, iterations, solver=solver)
    if accept is None:
        return sol
    sol.residuals = conic_residuals(program.A, program.b, program.c, program.dims, x, y, s,
                                    program.P)
    error = inaccuracy(sol, accept)
    if error is not None:
        raise error
    return sol


def inaccuracy(sol: ConicSolution, accept: float = ACCEPT_RESIDUAL) -> SolverError | None:
    """The :class:`~torchdiffopt.errors.SolverError` for a point whose ``residuals`` exceed
    ``accept``, or None."""
    res = sol.residuals
    worst = max(res, key=res.get)
    if res[worst] <= accept:
        return None
    detail = ", ".join(f"{k} {v:.1e}" for k, v in res.items())
    return SolverError(f"{sol.solver}'s point is not accurate enough (status {sol.status!r} "
                       f"after {sol.iterations} iterations; relative residuals {detail}, "
                       f"worst {worst}); raise the iteration limit, or rescale the problem")
