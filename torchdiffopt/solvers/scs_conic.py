"""SCS adapter for cone programs in SCS's own form.

Solves ``min ½ xᵀPx + cᵀx  s.t.  A x + s = b,  s ∈ K`` (``K`` described by SCS's cone
dictionary, see :mod:`torchdiffopt.backends.cones`) and returns SCS's primal ``x``, dual
``y ∈ K*`` (``P x + Aᵀy + c = 0``; the shadow price of row ``i`` is ``∂f*/∂b_i = -y_i``) and
slack ``s`` (:class:`~.cone_program.ConicSolution`). SCS is a first-order method: it runs
to ``eps_abs = eps_rel = 1e-9`` by default, and the point it returns is checked
(:func:`~.cone_program.certify`) rather than trusted; the conic backend then refines it by
Newton steps before differentiating.
"""

from __future__ import annotations

import scipy.sparse as sp
import scs

from ..errors import InfeasibleError, SolverError, UnboundedError
from .cone_program import ACCEPT_RESIDUAL, ConicSolution, certify, cone_program

DEFAULTS = {"eps_abs": 1e-9, "eps_rel": 1e-9, "max_iters": 200_000, "verbose": False}


def solve_scs_conic(A, b, c, cones, P=None, *, accept: float = ACCEPT_RESIDUAL,
                    **options) -> ConicSolution:
    """Solve the cone program with SCS (``options`` override :data:`DEFAULTS`, e.g.
    ``eps_abs``, ``max_iters``, ``verbose``).

    Raises :class:`~torchdiffopt.errors.InfeasibleError` or
    :class:`~torchdiffopt.errors.UnboundedError` when SCS returns a certificate,
    :class:`~torchdiffopt.errors.NonconvexError` for an indefinite ``P``, ``ValueError`` for
    inconsistent sizes, non-finite data or no rows, and
    :class:`~torchdiffopt.errors.SolverError` when SCS stops without a solution or its point
    has a relative residual above ``accept`` (raise ``max_iters``)."""
    pr = cone_program(A, b, c, cones, P)
    if pr.shape[0] == 0:
        raise ValueError("SCS needs at least one constraint row")
    data = {"A": pr.A, "b": pr.b, "c": pr.c}
    if pr.P is not None:
        data["P"] = sp.triu(pr.P, format="csc")
    result = scs.SCS(data, pr.dims.to_scs(), **{**DEFAULTS, **options}).solve()
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
    return certify(pr, result["x"], result["y"], result["s"], "SCS", status, iters, accept)
