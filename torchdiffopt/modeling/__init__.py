"""Modelling layer: expressions, variables, parameters, constraints and the Model."""

from .expressions import (Constant, Expression, Parameter, Relation, Variable, cos, dot, exp, log,
                          sin, sqrt, sum, sum_squares)
from .functions import CoefficientFunction
from .model import ConstraintRef, Model, ObjectiveRef

__all__ = ["CoefficientFunction", "Constant", "ConstraintRef", "Expression", "Model",
           "ObjectiveRef", "Parameter", "Relation", "Variable", "cos", "dot", "exp", "log", "sin",
           "sqrt", "sum", "sum_squares"]
