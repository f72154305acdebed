"""torchdiffopt: differentiable optimization in PyTorch.

Build a model with parameters, solve it, and differentiate its solution map
θ ↦ (x*(θ), λ*(θ), f*(θ)) in forward and reverse mode through the optimality conditions.
"""

from .errors import (DegenerateSolutionWarning, DifferentiationError, InfeasibleError,
                     NonconvexError, SolverError, UnboundedError)
from . import functional
from .layer import Layer
from .modeling import (CoefficientFunction, ConstraintRef, Expression, Model, Parameter,
                       Variable, dot, sum, sum_squares)

__version__ = "0.1.0"


def diff_model(solver: str | None = None) -> Model:
    """A model whose differentiation backend is picked from the problem class (the
    quadratic KKT backend for LP and QP)."""
    return Model(solver=solver, backend="quadratic")


def quadratic_diff_model(solver: str | None = None) -> Model:
    """A model differentiated through the KKT conditions of an LP / convex QP."""
    return Model(solver=solver, backend="quadratic")


__all__ = [
    "CoefficientFunction", "ConstraintRef", "DegenerateSolutionWarning", "DifferentiationError",
    "Expression", "InfeasibleError", "Layer", "Model", "NonconvexError", "Parameter", "SolverError",
    "UnboundedError", "Variable", "diff_model", "functional", "dot", "quadratic_diff_model", "sum",
    "sum_squares",
]
