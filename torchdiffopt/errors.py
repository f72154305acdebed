"""Errors and warnings raised by torchdiffopt. Each names its cause."""


class SolverError(RuntimeError):
    """The solver did not return an optimal solution (the message says why)."""


class InfeasibleError(SolverError):
    """The problem has no feasible point."""


class UnboundedError(SolverError):
    """The objective is unbounded over the feasible set."""


class NonconvexError(ValueError):
    """A convex backend was given a nonconvex problem (e.g. an indefinite quadratic objective)."""


class DifferentiationError(RuntimeError):
    """Differentiation was asked for in a state that does not allow it (e.g. before a
    successful ``optimize()``), or a result was read before it was computed."""


class DegenerateSolutionWarning(UserWarning):
    """The optimality system is singular at the solution (weakly active constraints,
    degenerate vertex, redundant equalities): derivatives are minimum-norm least-squares
    (or one-sided) derivatives, as the message says."""
