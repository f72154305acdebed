"""Solver adapters and their registries. Each QP adapter maps a :class:`NumericQP` to a
:class:`Solution`, each conic adapter a cone program in SCS's form to a
:class:`~.cone_program.ConicSolution`, or raises a named
:class:`~torchdiffopt.errors.SolverError`."""

from importlib.util import find_spec

from .clarabel_conic import ClarabelSequence, require_clarabel, solve_clarabel_conic
from .cone_program import ConicSolution
from .conic_ipm import solve_conic_ipm, solve_ipm_conic
from .daqp import solve_daqp_qp
from .highs import solve_highs
from .scs import solve_scs
from .scs_conic import solve_scs_conic
from .solution import NumericQP, Solution

QP_SOLVERS = {"highs": solve_highs, "scs": solve_scs, "daqp": solve_daqp_qp}
CONIC_SOLVERS = {"scs": solve_scs_conic, "clarabel": solve_clarabel_conic,
                 "ipm": solve_ipm_conic}
#: the batched form of a conic adapter, where it has one: the conic layer solves a whole
#: batch with it in one call
BATCHED_CONIC_SOLVERS = {solve_ipm_conic: solve_conic_ipm}
#: the sequenced form of a per-member conic adapter, where it has one: the conic layer solves
#: the members each thread takes on one solver, updating its data
SEQUENCED_CONIC_SOLVERS = {solve_clarabel_conic: ClarabelSequence}

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


def conic_solver(name: str | None):
    """The conic solver called ``name``: ``"clarabel"`` (an ImportError saying how to
    install it when it is missing), ``"scs"`` or ``"ipm"`` (the batched torch interior point
    of :mod:`.conic_ipm`: zero, nonnegative and second-order cones, CPU or CUDA). ``"auto"``
    (or None) is Clarabel, a dependency of the package, and SCS where it is not installed:
    an interior point's answers are accurate to about 1e-8 where SCS's first-order ones
    reach 1e-4 to 1e-6, so the Newton refinement and the derivatives start closer, and on
    the small and medium programs of a layer it is also the faster (benchmark W4, 64
    portfolios: 64 against 98 ms forward and backward; cvxpy's default for the same
    reason)."""
    if name in (None, "auto"):
        key = "clarabel" if find_spec("clarabel") is not None else "scs"
    else:
        key = str(name).lower()
    if key not in CONIC_SOLVERS:
        raise ValueError(f"the conic backend solves with Clarabel ('clarabel' or 'auto'), "
                         f"SCS ('scs') or its batched interior point ('ipm'), got "
                         f"solver={name!r}")
    if key == "clarabel":
        require_clarabel()
    return CONIC_SOLVERS[key]


__all__ = ["BATCHED_CONIC_SOLVERS", "SEQUENCED_CONIC_SOLVERS", "ConicSolution", "NumericQP",
           "Solution", "conic_solver", "qp_solver", "solve_clarabel_conic", "solve_conic_ipm",
           "solve_daqp_qp", "solve_highs", "solve_ipm_conic", "solve_scs", "solve_scs_conic"]
