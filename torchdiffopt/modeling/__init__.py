"""Modelling layer: expressions, variables, parameters, constraints, cones, atoms and the
Model."""

from .atoms import norm1, norm2, norm_inf
from .expressions import (Constant, Expression, Parameter, Relation, Variable, cos, dot, exp, log,
                          sin, sqrt, sum, sum_squares)
from .functions import CoefficientFunction
from .model import ConstraintRef, Model, ObjectiveRef
from .sets import PSD, SOC, ConeConstraint, ExpCone, PowerCone, RotatedSOC

__all__ = ["CoefficientFunction", "ConeConstraint", "Constant", "ConstraintRef", "ExpCone",
           "Expression", "Model", "ObjectiveRef", "PSD", "Parameter", "PowerCone", "Relation",
           "RotatedSOC", "SOC", "Variable", "cos", "dot", "exp", "log", "norm1", "norm2",
           "norm_inf", "sin", "sqrt", "sum", "sum_squares"]
