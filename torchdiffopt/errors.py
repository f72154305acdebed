"""Errors and warnings raised by torchdiffopt. Each names its cause."""

import os
import sys
import warnings

import torch


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


def warn_degenerate(message: str) -> None:
    """Issue a :class:`DegenerateSolutionWarning` attributed to the first caller outside
    torchdiffopt and torch (the user's line), however deep in a layer, an autograd Function
    or a ``torch.func`` transform it is raised."""
    skip = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(torch.__file__))
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    warnings.warn(DegenerateSolutionWarning(message), stacklevel=level + 1)
