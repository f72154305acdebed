"""The :class:`Model`: variables, parameters, constraints and an objective, plus solving and
the DiffOpt-style sensitivity API (implemented in :mod:`torchdiffopt.sensitivity`)."""

from __future__ import annotations

import numpy as np

import torch

from .expressions import Expression, Parameter, Relation, ValueEvaluator, Variable, as_expression
from .sets import PSD


BACKENDS = ("auto", "quadratic", "nonlinear", "conic")


class ConstraintRef:
    """A constraint ``lhs - rhs ∈ S`` (or ``function ∈ K`` for a cone, :mod:`.sets`) of any
    shape; indexing gives a reference to some rows.

    Its dual is the shadow price ``∂(optimal objective)/∂(rhs)`` of each row, for ``minimize``
    and ``maximize`` alike (so ``≥`` constraints of a minimization have duals ≥ 0, and a cone
    constraint's dual, shaped like the constraint, lies in the dual cone).
    """

    def __init__(self, model, relation: Relation, name: str, root=None, local_rows=None):
        self.model = model
        self.relation = relation
        self.name = name
        self.root = self if root is None else root
        shape = relation.expression.shape
        self.local_rows = (np.arange(relation.expression.size) if local_rows is None
                           else np.asarray(local_rows))
        self.shape = shape if local_rows is None else np.asarray(local_rows).shape

    def __getitem__(self, key):
        rows = self.local_rows.reshape(self.shape)[key]
        return ConstraintRef(self.model, self.relation, f"{self.name}[{key}]", self.root,
                             np.asarray(rows))

    @property
    def sense(self) -> str:
        return self.relation.sense

    def __repr__(self):
        return f"ConstraintRef({self.name!r}, {self.sense}, shape={self.shape})"


class ObjectiveRef:
    """Stands for the optimal objective value (e.g. among a layer's outputs)."""

    def __init__(self, model):
        self.model = model

    def __repr__(self):
        return "ObjectiveRef()"


class Model:
    """An optimization model with parameters, solved and differentiated as a whole.

    ``solver`` names the solver (``"highs"``, ``"scs"``, ``"clarabel"``, ``"slsqp"``; ``None``
    or ``"auto"`` picks one) and ``backend`` the differentiation backend: ``"quadratic"`` (KKT
    of an LP or convex QP), ``"nonlinear"`` (KKT of a smooth NLP at a local solution),
    ``"conic"`` (the residual map of a cone program, solved by SCS or Clarabel) or ``"auto"``
    (conic when a cone constraint or a norm atom appears, else nonlinear when the objective
    is more than quadratic or a constraint not affine, else quadratic, or conic when the
    solver is Clarabel).
    """

    def __init__(self, solver: str | None = None, backend: str = "auto"):
        from ..sensitivity import Sensitivity

        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
        self.solver = "auto" if solver is None else solver
        self.backend = backend
        self._variables: list[Variable] = []
        self._start: list[np.ndarray] = []
        self._lb: list[np.ndarray] = []
        self._ub: list[np.ndarray] = []
        self.num_variables = 0
        self.parameters: list[Parameter] = []
        self.constraints: list[ConstraintRef] = []
        self.objective_expression: Expression | None = None
        self.objective_sign = 1
        self.objective = ObjectiveRef(self)
        self._names: set[str] = set()
        self._sensitivity = Sensitivity(self)

    # -- building -----------------------------------------------------------------------
    def _name(self, name, prefix):
        if name is None:
            name = f"{prefix}{len(self._names) + 1}"
        self._names.add(name)
        return name

    def _changed(self):
        self._sensitivity.structure_changed()

    def variable(self, shape=(), lb=None, ub=None, name: str | None = None,
                 start=None, psd: bool = False) -> Variable:
        """A block of variables of ``shape`` (``()``, ``n`` or ``(m, n)``) with optional bounds
        and start values (numbers or arrays broadcast to ``shape``; start values are used by
        the nonlinear backend's local solver).

        ``psd=True`` makes a square matrix variable symmetric positive semidefinite: it adds
        the constraints ``X[i, j] == X[j, i]`` (``i > j``, named ``"<name>_symmetric"``) and
        ``tdo.PSD(X)`` (``"<name>_psd"``), which need the conic backend."""
        shape = (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)
        if psd and (len(shape) != 2 or shape[0] != shape[1]):
            raise ValueError(f"psd=True needs a square matrix shape (n, n), got {shape}")
        var = Variable(self, self.num_variables, shape, self._name(name, "x"))
        size = var.size
        lower = np.broadcast_to(np.asarray(-np.inf if lb is None else lb, float), shape).ravel()
        upper = np.broadcast_to(np.asarray(np.inf if ub is None else ub, float), shape).ravel()
        if np.any(np.isnan(lower)) or np.any(np.isnan(upper)):
            raise ValueError(f"bounds of variable {var.name!r} contain NaN")
        if np.any(lower > upper) or np.any(lower == np.inf) or np.any(upper == -np.inf):
            raise ValueError(f"variable {var.name!r} has bounds that no value meets: a lower "
                             "bound above its upper bound, a lower bound of +inf or an upper "
                             "bound of -inf")
        self._variables.append(var)
        self._start.append(np.full(size, np.nan))
        if start is not None:
            self._start[-1] = np.broadcast_to(np.asarray(start, float), shape).ravel().copy()
        self._lb.append(lower.copy())
        self._ub.append(upper.copy())
        self.num_variables += size
        self._changed()
        if psd:
            rows, cols = np.tril_indices(shape[0], -1)
            if len(rows):
                self.constraint(var[rows, cols] == var[cols, rows], name=f"{var.name}_symmetric")
            self.constraint(PSD(var), name=f"{var.name}_psd")
        return var

    def set_start_value(self, variable: Variable, value) -> None:
        """Start the nonlinear backend's local solver at ``value`` for this variable."""
        self._own(variable)
        k = self._variables.index(variable)
        self._start[k] = np.broadcast_to(np.asarray(value, float), variable.shape).ravel().copy()

    def start_values(self) -> np.ndarray:
        """Start values over the flat variable vector (NaN where none was given)."""
        return np.concatenate(self._start) if self._start else np.zeros(0)

    def bounds(self):
        """``(lb, ub)`` arrays over the flat variable vector."""
        if not self._variables:
            return np.zeros(0), np.zeros(0)
        return np.concatenate(self._lb), np.concatenate(self._ub)

    def parameter(self, value, name: str | None = None) -> Parameter:
        """A parameter θ with an initial ``value`` (number, vector or matrix)."""
        param = Parameter(self, _checked_value(value, None, name), self._name(name, "p"))
        self.parameters.append(param)
        self._changed()
        return param

    def set_parameter_value(self, parameter: Parameter, value) -> None:
        """Change a parameter's value (takes effect at the next :meth:`optimize`)."""
        self._own(parameter)
        parameter.value = _checked_value(value, parameter.shape, parameter.name)
        self._sensitivity.solution_invalidated()

    def parameter_value(self, parameter: Parameter):
        return _unwrap(parameter.value)

    def constraint(self, relation: Relation, name: str | None = None) -> ConstraintRef:
        """Add ``lhs <= rhs``, ``lhs >= rhs`` or ``lhs == rhs`` (any shape), or a cone
        constraint (``tdo.SOC(t, x)``, ``tdo.PSD(X)``, …, see :mod:`.sets`)."""
        if not isinstance(relation, Relation):
            raise TypeError("constraint() takes a relation such as `A @ x <= b` or a cone "
                            "such as `tdo.SOC(t, x)`")
        ref = ConstraintRef(self, relation, self._name(name, "c"))
        self.constraints.append(ref)
        self._changed()
        return ref

    def minimize(self, expr) -> None:
        self._set_objective(expr, 1)

    def maximize(self, expr) -> None:
        self._set_objective(expr, -1)

    def _set_objective(self, expr, sign):
        expr = as_expression(expr)
        if expr.size != 1:
            raise ValueError(f"the objective must be a scalar, got shape {expr.shape}")
        self.objective_expression = expr if expr.shape == () else expr.sum()
        self.objective_sign = sign
        self._changed()

    def _own(self, obj):
        if getattr(obj, "model", self) is not self:
            raise ValueError(f"{obj!r} belongs to another model")

    # -- solving and reading the solution -----------------------------------------------
    def optimize(self) -> None:
        """Solve at the current parameter values. Raises a named error if the problem is
        infeasible, unbounded, nonconvex or the solver fails (``status`` records it)."""
        self._sensitivity.optimize()

    @property
    def status(self) -> str:
        """``"optimize_not_called"``, ``"optimal"`` or the cause of the last failure."""
        return self._sensitivity.status

    @property
    def objective_value(self) -> float:
        return self._sensitivity.objective_value

    def value(self, expr):
        """Value of any expression of variables and parameters at the solution."""
        x = torch.as_tensor(self._sensitivity.x)
        value = ValueEvaluator(x, self._sensitivity.parameter_tensors()).value(as_expression(expr))
        return _unwrap(value.detach().numpy())

    def dual(self, constraint: ConstraintRef):
        """Shadow prices ``∂(optimal objective)/∂(rhs)`` of a constraint's rows."""
        self._own(constraint)
        dual = self._sensitivity.dual
        return _unwrap(dual[self._sensitivity.rows_of(constraint)].reshape(constraint.shape))

    # -- sensitivity API (DiffOpt.jl names without "!") ---------------------------------
    def empty_input_sensitivities(self) -> None:
        """Forget every forward and reverse seed."""
        self._sensitivity.empty_input_sensitivities()

    def set_forward_parameter(self, parameter: Parameter, direction) -> None:
        """Seed a direction ``dθ`` on a parameter (array of its shape); seeds add up."""
        self._sensitivity.set_forward_parameter(parameter, direction)

    def set_forward_objective_function(self, expr) -> None:
        """Seed a tangent of the objective function (an expression of the variables, up to
        quadratic, or a constant): the objective becomes ``f + t·expr``."""
        self._sensitivity.set_forward_objective_function(expr)

    def set_forward_constraint_function(self, constraint: ConstraintRef, expr) -> None:
        """Seed a tangent of the normalized constraint function ``lhs - rhs`` (an affine
        expression of the constraint's shape, or a constant)."""
        self._sensitivity.set_forward_constraint_function(constraint, expr)

    def forward_differentiate(self) -> None:
        """Push the forward seeds through the solution map (one solve with the stored
        factorization)."""
        self._sensitivity.forward_differentiate()

    def get_forward_variable(self, variable: Variable):
        """``dx`` for the seeded direction, of the variable's shape."""
        return self._sensitivity.forward_result("dx", variable)

    def get_forward_objective(self) -> float:
        """``d(optimal objective)`` for the seeded direction."""
        return self._sensitivity.forward_result("dobj")

    def get_forward_constraint_dual(self, constraint: ConstraintRef):
        """``d(dual)`` of a constraint for the seeded direction (shadow-price convention)."""
        return self._sensitivity.forward_result("ddual", constraint)

    def set_reverse_variable(self, variable: Variable, seed) -> None:
        """Seed ``∂loss/∂x`` (array of the variable's shape); seeds add up."""
        self._sensitivity.set_reverse_variable(variable, seed)

    def set_reverse_objective(self, seed) -> None:
        """Seed ``∂loss/∂(optimal objective)``."""
        self._sensitivity.set_reverse_objective(seed)

    def set_reverse_constraint_dual(self, constraint: ConstraintRef, seed) -> None:
        """Seed ``∂loss/∂(dual)`` of a constraint (shadow-price convention)."""
        self._sensitivity.set_reverse_constraint_dual(constraint, seed)

    def reverse_differentiate(self) -> None:
        """Pull the reverse seeds back to the data and the parameters (one solve with the
        stored factorization)."""
        self._sensitivity.reverse_differentiate()

    def get_reverse_parameter(self, parameter: Parameter):
        """``∂loss/∂θ`` for a parameter, of its shape."""
        return self._sensitivity.reverse_parameter(parameter)

    def get_reverse_objective_function(self):
        """``∂loss/∂(objective coefficients)`` as a function whose coefficients can be read."""
        return self._sensitivity.reverse_objective_function()

    def get_reverse_constraint_function(self, constraint: ConstraintRef):
        """``∂loss/∂(coefficients of lhs - rhs)`` as an affine function: its coefficient on
        ``x_j`` is the cotangent of ``x_j``'s coefficient, its constant that of the constant
        term."""
        return self._sensitivity.reverse_constraint_function(constraint)

    @property
    def variables(self) -> list:
        return list(self._variables)


def _checked_value(value, shape, name) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    arr = np.array(value, dtype=np.float64)
    if shape is not None and arr.shape != shape:
        raise ValueError(f"parameter {name!r} has shape {shape}, got a value of shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"parameter {name!r}: value contains NaN or inf")
    return arr


def _unwrap(arr):
    arr = np.asarray(arr)
    return float(arr) if arr.shape == () else arr


__all__ = ["ConstraintRef", "Model", "ObjectiveRef"]
