"""Solver adapters and their registry. Each adapter maps a :class:`NumericQP` to a
:class:`Solution` or raises a named :class:`~torchdiffopt.errors.SolverError`."""

from .highs import solve_highs
from .solution import NumericQP, Solution

QP_SOLVERS = {"highs": solve_highs}


def qp_solver(name: str):
    """The QP solver called ``name`` (``"auto"`` picks HiGHS)."""
    key = "highs" if name in (None, "auto") else str(name).lower()
    if key not in QP_SOLVERS:
        raise ValueError(f"unknown solver {name!r}; available: {sorted(QP_SOLVERS)} or 'auto'")
    return QP_SOLVERS[key]


__all__ = ["NumericQP", "Solution", "qp_solver", "solve_highs"]
