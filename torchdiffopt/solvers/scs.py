"""SCS adapter for LP and convex QP (SCS 3 takes the quadratic objective directly).

SCS solves ``min ½ xᵀPx + cᵀx  s.t.  A x + s = b,  s ∈ {0}ᵃ × ℝ₊ᵇ`` with the Lagrangian
``½ xᵀPx + cᵀx + yᵀ(A x - b)``. The internal rows ``C x + c0 ∈ S`` map to

* ``= 0``: ``A = C,  b = -c0`` in the zero cone,               μ = y
* ``≤ 0``: ``A = C,  b = -c0`` in the nonnegative cone,        μ = y
* ``≥ 0``: ``A = -C, b = c0`` in the nonnegative cone,         μ = -y
* bounds ``-x_j ≤ -lb_j`` and ``x_j ≤ ub_j``                   (reduced cost = y_lb - y_ub)

and shadow prices are ``-μ``. SCS is a first-order method: it is run to 1e-9 and the
quadratic backend then polishes its point with one Newton step on the KKT system.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scs

from ..errors import InfeasibleError, SolverError, UnboundedError
from .solution import NumericQP, Solution

DEFAULTS = {"eps_abs": 1e-9, "eps_rel": 1e-9, "max_iters": 200_000, "verbose": False}


def solve_scs(problem: NumericQP, **options) -> Solution:
    """Solve the internal QP with SCS; raise a named error unless it is (nearly) optimal."""
    n = problem.n
    C = sp.csr_matrix(problem.C)
    eq, le, ge = (problem.sense == 0), (problem.sense == -1), (problem.sense == 1)
    has_lb, has_ub = np.isfinite(problem.lb), np.isfinite(problem.ub)
    eye = sp.eye(n, format="csr")
    A = sp.vstack([C[eq], C[le], -C[ge], -eye[has_lb], eye[has_ub]]).tocsc()
    b = np.concatenate((-problem.c0[eq], -problem.c0[le], problem.c0[ge],
                        -problem.lb[has_lb], problem.ub[has_ub]))
    data = {"P": sp.triu(problem.P).tocsc(), "A": A, "b": b, "c": problem.q}
    cone = {"z": int(eq.sum()), "l": int(len(b) - eq.sum())}
    result = scs.SCS(data, cone, **{**DEFAULTS, **options}).solve()
    status = result["info"]["status_val"]
    if status in (-2, -7):
        raise InfeasibleError("infeasible: SCS found a certificate that no point satisfies "
                              "the constraints")
    if status in (-1, -6):
        raise UnboundedError("unbounded: SCS found a direction improving the objective "
                             "without limit")
    if status not in (1, 2):
        raise SolverError(f"SCS stopped without a solution (status {result['info']['status']})")
    y = result["y"]
    k = np.cumsum([0, eq.sum(), le.sum(), ge.sum(), has_lb.sum(), has_ub.sum()])
    mu = np.zeros(problem.m)
    mu[eq], mu[le], mu[ge] = y[k[0]:k[1]], y[k[1]:k[2]], -y[k[2]:k[3]]
    reduced = np.zeros(n)
    reduced[has_lb] += y[k[3]:k[4]]
    reduced[has_ub] -= y[k[4]:k[5]]
    return Solution(x=np.asarray(result["x"], dtype=np.float64), row_shadow=-mu,
                    bound_shadow=reduced)
