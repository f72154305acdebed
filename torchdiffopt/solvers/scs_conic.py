"""SCS adapter for cone programs in SCS's own form.

Solves ``min ½ xᵀPx + cᵀx  s.t.  A x + s = b,  s ∈ K`` (``K`` described by SCS's cone
dictionary, see :mod:`torchdiffopt.backends.cones`) and returns SCS's primal ``x``, dual
``y ∈ K*`` (``P x + Aᵀy + c = 0``; the shadow price of row ``i`` is ``∂f*/∂b_i = -y_i``) and
slack ``s``. SCS is a first-order method: it runs to ``eps_abs = eps_rel = 1e-9`` by
default, and the point it returns is checked here (:func:`conic_residuals`) rather than
trusted; the conic backend then refines it by Newton steps before differentiating.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import scs

from ..backends.cones import ConeDims, project
from ..errors import InfeasibleError, NonconvexError, SolverError, UnboundedError

DEFAULTS = {"eps_abs": 1e-9, "eps_rel": 1e-9, "max_iters": 200_000, "verbose": False}
#: largest relative residual (any of :func:`conic_residuals`) accepted from SCS
ACCEPT_RESIDUAL = 1e-6


@dataclass
class ConicSolution:
    """SCS's answer: ``x``, ``y`` (dual, in ``K*``), ``s`` (slack, in ``K``), its ``status``
    (``"solved"`` or ``"solved inaccurate"``), ``iterations`` and the relative
    ``residuals`` measured on the returned point (:func:`conic_residuals`)."""

    x: np.ndarray
    y: np.ndarray
    s: np.ndarray
    status: str
    iterations: int
    residuals: dict = field(default_factory=dict)


def conic_residuals(A, b, c, cones, x, y, s, P=None) -> dict:
    """Relative residuals of a primal-dual point of the cone program, each scaled by
    ``1 + `` the largest term it compares:

    ``primal`` ``‖Ax + s - b‖∞``, ``dual`` ``‖Px + Aᵀy + c‖∞``, ``gap``
    ``|xᵀPx + cᵀx + bᵀy|``, ``slack_cone`` ``‖s - Π_K(s)‖∞`` and ``dual_cone``
    ``‖y - Π_{K*}(y)‖∞``."""
    dims = ConeDims.from_dict(cones)
    Px = np.zeros_like(x) if P is None else P @ x
    Ax, Aty = A @ x, A.T @ y
    inf = lambda *a: max(np.abs(t).max(initial=0.0) for t in a)  # noqa: E731
    xPx, cx, by = float(x @ Px), float(c @ x), float(b @ y)
    return {
        "primal": inf(Ax + s - b) / (1 + inf(Ax, s, b)),
        "dual": inf(Px + Aty + c) / (1 + inf(Px, Aty, c)),
        "gap": abs(xPx + cx + by) / (1 + max(abs(xPx), abs(cx), abs(by))),
        "slack_cone": inf(s - project(s, dims)) / (1 + inf(s)),
        "dual_cone": inf(y - project(y, dims, dual=True)) / (1 + inf(y)),
    }


def solve_scs_conic(A, b, c, cones, P=None, *, accept: float = ACCEPT_RESIDUAL,
                    **options) -> ConicSolution:
    """Solve the cone program with SCS (``options`` override :data:`DEFAULTS`, e.g.
    ``eps_abs``, ``max_iters``, ``verbose``).

    Raises :class:`~torchdiffopt.errors.InfeasibleError` or
    :class:`~torchdiffopt.errors.UnboundedError` when SCS returns a certificate,
    :class:`~torchdiffopt.errors.NonconvexError` for an indefinite ``P``, ``ValueError`` for
    inconsistent sizes or non-finite data, and :class:`~torchdiffopt.errors.SolverError`
    when SCS stops without a solution or its point has a relative residual above
    ``accept``."""
    dims = ConeDims.from_dict(cones)
    A = sp.csc_matrix(A, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    c = np.asarray(c, dtype=np.float64).reshape(-1)
    m, n = A.shape
    if b.shape != (m,) or c.shape != (n,) or dims.size != m:
        raise ValueError(f"inconsistent sizes: A {A.shape}, b {b.shape}, c {c.shape}, "
                         f"cones of total size {dims.size}")
    if m == 0:
        raise ValueError("SCS needs at least one constraint row")
    if not (np.isfinite(A.data).all() and np.isfinite(b).all() and np.isfinite(c).all()):
        raise ValueError("the problem data contain NaN or inf")
    data = {"A": A, "b": b, "c": c}
    if P is not None:
        P = sp.csc_matrix(P, dtype=np.float64)
        if P.shape != (n, n) or not np.isfinite(P.data).all():
            raise ValueError(f"P must be a finite ({n}, {n}) matrix, got shape {P.shape}")
        P = 0.5 * (P + P.T)
        _check_psd(P)
        data["P"] = sp.triu(P, format="csc")
    result = scs.SCS(data, dims.to_scs(), **{**DEFAULTS, **options}).solve()
    info = result["info"]
    status, code, iters = info["status"], info["status_val"], int(info["iter"])
    if code in (-2, -7):
        raise InfeasibleError(f"infeasible: SCS found a certificate that no x gives "
                              f"A x + s = b with s in the cone (status {status!r})")
    if code in (-1, -6):
        raise UnboundedError(f"unbounded: SCS found a direction improving the objective "
                             f"without limit (status {status!r})")
    if code not in (1, 2):
        raise SolverError(f"SCS stopped without a solution (status {status!r} after "
                          f"{iters} iterations)")
    x, y, s = (np.asarray(result[k], dtype=np.float64) for k in ("x", "y", "s"))
    res = conic_residuals(A, b, c, dims, x, y, s, P)
    worst = max(res, key=res.get)
    if not res[worst] <= accept:
        detail = ", ".join(f"{k} {v:.1e}" for k, v in res.items())
        raise SolverError(f"SCS's point is not accurate enough (status {status!r} after "
                          f"{iters} iterations; relative residuals {detail}, worst {worst}); "
                          "raise max_iters, or rescale the problem")
    return ConicSolution(x, y, s, status, iters, res)


def _check_psd(P: sp.spmatrix) -> None:
    """Raise NonconvexError when the (symmetric) ``P`` has a clearly negative eigenvalue."""
    n = P.shape[0]
    if P.nnz == 0:
        return
    if n <= 2000:
        eig = np.linalg.eigvalsh(P.toarray())
        low, scale = eig[0], max(1.0, np.abs(eig).max())
    else:
        low = spla.eigsh(P, k=1, which="SA", return_eigenvectors=False)[0]
        scale = max(1.0, abs(spla.eigsh(P, k=1, which="LM",
                                             return_eigenvectors=False)[0]))
    if low < -1e-9 * scale:
        raise NonconvexError(f"P is not positive semidefinite (smallest eigenvalue {low:.3e})")
