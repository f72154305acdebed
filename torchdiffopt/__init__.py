"""torchdiffopt: differentiable optimization in PyTorch.

Build a model with parameters, solve it, and differentiate its solution map
θ ↦ (x*(θ), λ*(θ), f*(θ)) in forward and reverse mode through the optimality conditions.
"""

from .errors import (DegenerateSolutionWarning, DifferentiationError, InfeasibleError,
                     NonconvexError, SolverError, UnboundedError)
from . import functional
from .layer import Layer
from .modeling import (CoefficientFunction, ConstraintRef, Expression, Model, Parameter,
                       Variable, cos, dot, exp, log, sin, sqrt, sum, sum_squares)

__version__ = "0.1.0"


def nonlinear_diff_model(solver: str | None = None) -> Model:
    """A model differentiated through the KKT conditions of a smooth NLP at a local
    solution (LPs and QPs too)."""
    return Model(solver=solver, backend="nonlinear")


def diff_model(solver: str | None = None) -> Model:
    """A model whose differentiation backend is picked from the problem class (the
    quadratic KKT backend for LP and QP, the nonlinear one for nonlinear expressions)."""
    return Model(solver=solver, backend="auto")


def quadratic_diff_model(solver: str | None = None) -> Model:
    """A model differentiated through the KKT conditions of an LP / convex QP."""
    return Model(solver=solver, backend="quadratic")


__all__ = [
    "CoefficientFunction", "ConstraintRef", "DegenerateSolutionWarning", "DifferentiationError",
    "Expression", "InfeasibleError", "Layer", "Model", "NonconvexError", "Parameter", "SolverError",
    "UnboundedError", "Variable", "cos", "diff_model", "dot", "exp", "functional", "log",
    "nonlinear_diff_model", "quadratic_diff_model", "sin", "sqrt", "sum", "sum_squares",
]
