"""The DiffOpt-style sensitivity API behind :class:`~torchdiffopt.Model`.

The model's pipeline (:mod:`torchdiffopt.pipelines`: quadratic, conic or nonlinear backend)
solves it and factorizes its optimality system once; then

* forward mode: parameter directions ``dθ`` and functional seeds
  (``set_forward_*_function``, raw tangents of the problem's functions) are pushed through
  with one solve: ``dx``, ``d(dual)``, ``d(objective)``;
* reverse mode: seeds on ``x``, duals and the objective are pulled back with one adjoint
  solve to the parameters (``θ̄``) and to the problem's functions (the functional getters).

Seeds persist until :meth:`Sensitivity.empty_input_sensitivities`; seeds on the same object
add up. Duals follow the shadow-price convention ``dual = ∂(optimal objective)/∂(rhs)``;
the pipelines work on the internal minimization, and this class converts: with
``sign = +1`` for ``minimize`` and ``-1`` for ``maximize``, ``dual = -sign·μ`` and
``objective = sign·f``.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import DifferentiationError, NonconvexError, SolverError
from .modeling.expressions import as_expression
from .modeling.functions import CoefficientFunction
from .pipelines import Solved, pipeline_for
from .solvers.batch import status_of


class Sensitivity:
    """Solution state, seeds and results of one model."""

    def __init__(self, model):
        self.model = model
        self._pipeline = None
        self._state: Solved | None = None
        self.status = "optimize_not_called"
        self.empty_input_sensitivities()

    # -- lifecycle ----------------------------------------------------------------------
    def structure_changed(self):
        self._pipeline = None
        self.solution_invalidated()

    def solution_invalidated(self):
        self._state = None
        self._forward = None
        self._reverse = None
        if self.status == "optimal":
            self.status = "optimize_not_called"

    def parameter_tensors(self) -> dict:
        return {p: torch.as_tensor(p.value, dtype=torch.float64) for p in self.model.parameters}

    def pipeline(self):
        if self._pipeline is None:
            self._pipeline = pipeline_for(self.model)
        return self._pipeline

    @property
    def sign(self) -> int:
        return self.model.objective_sign

    def optimize(self):
        self.solution_invalidated()
        model = self.model
        if model.objective_expression is None and not model.constraints:
            raise ValueError("the model is empty: add an objective or constraints")
        pipeline = self.pipeline()
        values = self.parameter_tensors()
        theta = tuple(values[p] for p in pipeline.form.parameters)
        try:
            self._state = pipeline.solve(theta)
        except (SolverError, NonconvexError) as err:
            self.status = status_of(err)
            raise
        self.status = "optimal"

    def solved(self) -> Solved:
        if self._state is None:
            raise DifferentiationError(
                "no solution: call optimize() first (the model was not solved since it or "
                f"its parameters last changed; status: {self.status})"
            )
        return self._state

    def rows_of(self, constraint) -> np.ndarray:
        return self.pipeline().rows_of(constraint)

    @property
    def x(self) -> np.ndarray:
        return self.solved().x

    @property
    def dual(self) -> np.ndarray:
        return -self.sign * self.solved().mu + 0.0

    @property
    def objective_value(self) -> float:
        return self.sign * self.solved().objective

    # -- seeds ----------------------------------------------------------------------------
    def empty_input_sensitivities(self):
        self._param_seeds: dict = {}
        self._objective_seeds: list = []
        self._constraint_seeds: list = []
        self._var_seeds: dict = {}
        self._dual_seeds: list = []
        self._obj_seed = 0.0

    @staticmethod
    def _seed_array(obj, seed, what):
        arr = np.array(seed.detach().cpu().numpy() if isinstance(seed, torch.Tensor) else seed,
                       dtype=np.float64)
        if arr.shape != tuple(obj.shape):
            raise ValueError(f"{what} for {obj.name!r} must have shape {tuple(obj.shape)}, "
                             f"got {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{what} for {obj.name!r} contains NaN or inf")
        return arr

    def _add(self, seeds: dict, obj, arr):
        seeds[obj] = seeds.get(obj, 0.0) + arr

    def set_forward_parameter(self, parameter, direction):
        self.model._own(parameter)
        self._add(self._param_seeds, parameter,
                  self._seed_array(parameter, direction, "forward parameter direction"))

    def set_forward_objective_function(self, expr):
        self._objective_seeds.append(as_expression(expr))

    def set_forward_constraint_function(self, constraint, expr):
        self.model._own(constraint)
        expr = as_expression(expr)
        if expr.degree > 1:
            raise ValueError("a constraint function tangent must be affine")
        if expr.shape != () and expr.shape != tuple(constraint.shape):
            raise ValueError(f"tangent of shape {expr.shape} for constraint {constraint.name!r}"
                             f" of shape {tuple(constraint.shape)}")
        self._constraint_seeds.append((constraint, expr))

    def set_reverse_variable(self, variable, seed):
        self.model._own(variable)
        self._add(self._var_seeds, variable, self._seed_array(variable, seed, "reverse seed"))

    def set_reverse_objective(self, seed):
        self._obj_seed += float(seed)

    def set_reverse_constraint_dual(self, constraint, seed):
        self.model._own(constraint)
        self._dual_seeds.append((constraint, self._seed_array(constraint, seed, "dual seed")))

    # -- forward mode ---------------------------------------------------------------------
    def forward_differentiate(self):
        state = self.solved()
        pipeline = self.pipeline()
        directions = None
        if self._param_seeds:
            directions = tuple(
                torch.as_tensor(self._param_seeds.get(p, np.zeros(p.shape)), dtype=torch.float64)
                for p in pipeline.form.parameters)
        dx, dmu, dobj = pipeline.forward(state, directions, self._objective_seeds,
                                         self._constraint_seeds)
        sign = self.sign
        # "+ 0.0" turns the -0.0 of sign flips into 0.0
        self._forward = {"dx": dx + 0.0, "ddual": -sign * dmu + 0.0, "dobj": sign * dobj + 0.0}

    def forward_result(self, key, obj=None):
        if self._forward is None:
            raise DifferentiationError("no forward result: call forward_differentiate() first")
        value = self._forward[key]
        if obj is None:
            return float(value)
        self.model._own(obj)
        if key == "dx":
            out = value[obj.offset: obj.offset + obj.size].reshape(obj.shape)
        else:
            out = value[self.rows_of(obj)].reshape(obj.shape)
        return float(out) if out.shape == () else out.copy()

    # -- reverse mode ---------------------------------------------------------------------
    def reverse_differentiate(self):
        state = self.solved()
        pipeline = self.pipeline()
        sign = self.sign
        x_bar = np.zeros(self.model.num_variables)
        for var, seed in self._var_seeds.items():
            x_bar[var.offset: var.offset + var.size] += seed.ravel()
        mu_bar = np.zeros(len(state.mu))
        for constraint, seed in self._dual_seeds:
            np.add.at(mu_bar, self.rows_of(constraint).ravel(), -sign * seed.ravel())
        grads, cot = pipeline.reverse(state, x_bar, mu_bar, sign * self._obj_seed)
        self._reverse = {
            "parameters": {p: g.numpy().reshape(p.shape)
                           for p, g in zip(pipeline.form.parameters, grads)},
            "cotangent": cot,
        }

    def _reverse_result(self):
        if self._reverse is None:
            raise DifferentiationError("no reverse result: call reverse_differentiate() first")
        return self._reverse

    def reverse_parameter(self, parameter):
        self.model._own(parameter)
        g = self._reverse_result()["parameters"][parameter]
        return float(g) if g.shape == () else g.copy()

    def reverse_objective_function(self) -> CoefficientFunction:
        cot = self._reverse_result()["cotangent"]
        sign = self.sign
        q_bar = sign * cot.q

        def linear(var):
            return q_bar[var.offset: var.offset + var.size]

        def quadratic(a, b):
            ia = np.arange(a.offset, a.offset + a.size)
            ib = np.arange(b.offset, b.offset + b.size)
            I, J = np.meshgrid(ia, ib, indexing="ij")
            return sign * (cot.P_at(I, J) + cot.P_at(J, I))

        return CoefficientFunction(self.model, (), sign * cot.r, linear, quadratic)

    def reverse_constraint_function(self, constraint) -> CoefficientFunction:
        self.model._own(constraint)
        cot = self._reverse_result()["cotangent"]
        rows = self.rows_of(constraint).ravel()

        def linear(var):
            cols = np.arange(var.offset, var.offset + var.size)
            return cot.C_at(rows[:, None], cols[None, :])

        return CoefficientFunction(self.model, tuple(constraint.shape),
                                   cot.c0[rows], linear)
