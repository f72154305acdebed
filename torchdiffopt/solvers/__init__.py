"""Solver adapters and their registry. Each adapter maps a :class:`NumericQP` to a
:class:`Solution` or raises a named :class:`~torchdiffopt.errors.SolverError`."""

from .highs import solve_highs
from .scs import solve_scs
from .solution import NumericQP, Solution

QP_SOLVERS = {"highs": solve_highs, "scs": solve_scs}

#: HiGHS's QP solver is an active-set method whose null space is dense (it stops past
#: 4,000 free directions and slows down well before); larger QPs go to SCS.
HIGHS_QP_MAX_VARIABLES = 2000


def qp_solver(name: str, problem: NumericQP | None = None):
    """The QP solver called ``name``. ``"auto"`` (or None) picks HiGHS for LPs of any size
    and QPs up to :data:`HIGHS_QP_MAX_VARIABLES` variables, SCS for larger QPs."""
    if name in (None, "auto"):
        is_qp = problem is not None and problem.P.count_nonzero() > 0
        large = problem is not None and problem.n > HIGHS_QP_MAX_VARIABLES
        return solve_scs if is_qp and large else solve_highs
    key = str(name).lower()
    if key not in QP_SOLVERS:
        raise ValueError(f"unknown solver {name!r}; available: {sorted(QP_SOLVERS)} or 'auto'")
    return QP_SOLVERS[key]


__all__ = ["NumericQP", "Solution", "qp_solver", "solve_highs", "solve_scs"]
