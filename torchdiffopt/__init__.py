"""torchdiffopt: differentiable optimization in PyTorch.

Build a model with parameters, solve it, and differentiate its solution map
θ ↦ (x*(θ), λ*(θ), f*(θ)) in forward and reverse mode through the optimality conditions.
"""

from .errors import (DegenerateSolutionWarning, DifferentiationError, InfeasibleError,
                     NonconvexError, SolverError, UnboundedError)
from . import functional
from .layer import Layer
from .modeling import (PSD, SOC, CoefficientFunction, ConstraintRef, ExpCone, Expression, Model,
                       Parameter, PowerCone, RotatedSOC, Variable, cos, dot, exp, log, norm1,
                       norm2, norm_inf, sin, sqrt, sum, sum_squares)

__version__ = "0.1.0"


def nonlinear_diff_model(solver: str | None = None) -> Model:
    """A model differentiated through the KKT conditions of a smooth NLP at a local
    solution (LPs and QPs too)."""
    return Model(solver=solver, backend="nonlinear")


def diff_model(solver: str | None = None) -> Model:
    """A model whose differentiation backend is picked from the problem class (the conic
    backend when cones or norm atoms appear, else the quadratic KKT backend for LP and QP,
    else the nonlinear one)."""
    return Model(solver=solver, backend="auto")


def quadratic_diff_model(solver: str | None = None) -> Model:
    """A model differentiated through the KKT conditions of an LP / convex QP."""
    return Model(solver=solver, backend="quadratic")


def conic_diff_model(solver: str | None = None) -> Model:
    """A model solved as a cone program by Clarabel (None or ``"auto"``: Clarabel, SCS where
    Clarabel is not installed; ``"scs"``, ``"clarabel"``, ``"ipm"``) and differentiated
    through the residual map of its homogeneous self-dual embedding (cones, norm atoms;
    LPs and QPs too)."""
    return Model(solver=solver, backend="conic")


__all__ = [
    "CoefficientFunction", "ConstraintRef", "DegenerateSolutionWarning", "DifferentiationError",
    "ExpCone", "Expression", "InfeasibleError", "Layer", "Model", "NonconvexError", "PSD",
    "Parameter", "PowerCone", "RotatedSOC", "SOC", "SolverError", "UnboundedError", "Variable",
    "conic_diff_model", "cos", "diff_model", "dot", "exp", "functional", "log",
    "nonlinear_diff_model", "norm1", "norm2", "norm_inf", "quadratic_diff_model", "sin", "sqrt",
    "sum", "sum_squares",
]
