"""Local NLP solver: SciPy's SLSQP with exact first derivatives.

Choice: SLSQP (sequential least squares QP) installs with SciPy everywhere, handles
equalities, inequalities and bounds, and converges to a tight tolerance on smooth problems.
Its multipliers and its last digits are not trusted: the nonlinear backend re-identifies the
active set, estimates the multipliers and polishes the point with Newton steps on the KKT
system (exact Hessian from torch) until the relative KKT residual is ~1e-12
(:mod:`torchdiffopt.backends.nonlinear`). Ipopt (cyipopt) needs a system Ipopt library that
this project's machines cannot install from the package registries, so it is not the default.

Internal problem (see :mod:`torchdiffopt.compile.nonlinear`): minimize ``f(x)`` subject to
``g(x) ∈ S`` row by row (``= 0``, ``≥ 0``, ``≤ 0``) and ``lb ≤ x ≤ ub``.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize

from ..errors import InfeasibleError, SolverError


def _last_value(fn):
    """``fn`` remembering its last argument and value: SLSQP asks the equality and the
    inequality blocks for the same point one after the other, and each evaluation of all
    rows (or of their Jacobian, a reverse-mode pass per row) would otherwise run twice."""
    last = [None, None]

    def cached(x):
        if last[0] is None or not np.array_equal(last[0], x):
            last[0], last[1] = np.array(x, copy=True), fn(x)
        return last[1]

    return cached


def solve_slsqp(fun, grad, cons, cons_jac, sense: np.ndarray, lb, ub, x0: np.ndarray,
                max_iter: int = 300, tol: float = 1e-12) -> np.ndarray:
    """Minimize ``fun`` from ``x0``; ``cons(x)`` returns all rows ``g(x)``, ``cons_jac(x)``
    their Jacobian. Returns the point; raises a named error when SLSQP fails."""
    cons, cons_jac = _last_value(cons), _last_value(cons_jac)  # "eq" and "ineq" share them
    constraints = []
    eq, ge, le = sense == 0, sense == 1, sense == -1
    if eq.any():
        constraints.append({"type": "eq", "fun": lambda x: cons(x)[eq],
                            "jac": lambda x: cons_jac(x)[eq]})
    if (ge | le).any():
        sign = np.where(le, -1.0, 1.0)[ge | le]  # SLSQP's "ineq" means fun(x) ≥ 0
        constraints.append({"type": "ineq", "fun": lambda x: sign * cons(x)[ge | le],
                            "jac": lambda x: sign[:, None] * cons_jac(x)[ge | le]})
    bounds = [(lo if np.isfinite(lo) else None, hi if np.isfinite(hi) else None)
              for lo, hi in zip(lb, ub)]
    start = np.clip(x0, lb, ub)
    result = minimize(fun, start, jac=grad, method="SLSQP", bounds=bounds,
                      constraints=constraints, options={"maxiter": max_iter, "ftol": tol})
    if result.status == 4 or (result.status == 8 and "incompatible" in result.message):
        raise InfeasibleError(f"locally infeasible: SLSQP reports '{result.message}' "
                              "(no feasible point found near the start)")
    rows = cons(result.x)
    violation = np.where(eq, np.abs(rows), np.maximum(-np.where(le, -rows, rows), 0.0))
    worst = float(violation.max(initial=0.0))
    if not result.success and worst > 1e-6 * (1.0 + np.abs(result.x).max(initial=0.0)):
        raise InfeasibleError(f"locally infeasible: SLSQP stopped ('{result.message}') at a "
                              f"point violating the constraints by {worst:.1e}")
    if not result.success and result.status != 8:
        raise SolverError(f"SLSQP failed: {result.message} (status {result.status})")
    if not np.all(np.isfinite(result.x)):
        raise SolverError("SLSQP returned a non-finite point")
    return result.x
