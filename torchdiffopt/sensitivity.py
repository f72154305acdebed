"""The DiffOpt-style sensitivity API behind :class:`~torchdiffopt.Model`.

Pipeline: the model compiles to a :class:`~torchdiffopt.compile.quadratic.QuadraticForm`,
whose data ``D(θ)`` is a torch function of the parameters; a solver returns the optimum; the
backend factorizes the KKT system once. Then

* forward mode: parameter directions ``dθ`` become data tangents ``dD = (∂D/∂θ) dθ`` by
  ``torch.func.jvp``; functional seeds (``set_forward_*_function``) add raw data tangents;
  one solve with the stored factorization gives ``dx``, ``d(dual)``, ``d(objective)``;
* reverse mode: seeds on ``x``, duals and the objective give data cotangents ``D̄`` in one
  solve; ``θ̄ = (∂D/∂θ)ᵀ D̄`` is one ``torch.autograd.grad`` call.

Seeds persist until :meth:`Sensitivity.empty_input_sensitivities`; seeds on the same object
add up. Duals follow the shadow-price convention ``dual = ∂(optimal objective)/∂(rhs)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from .backends.quadratic import DataTangent, QuadraticKKT
from .compile.quadratic import QuadraticData, QuadraticForm
from .errors import (DifferentiationError, InfeasibleError, NonconvexError, SolverError,
                     UnboundedError)
from .modeling.expressions import Evaluator, as_expression
from .modeling.functions import CoefficientFunction
from .qp_function import solve_and_certify
from .solvers import NumericQP


_STATUS_OF = {InfeasibleError: "infeasible", UnboundedError: "unbounded",
              NonconvexError: "nonconvex"}


@dataclass
class SolvedState:
    """Everything known after a successful ``optimize()``."""

    form: QuadraticForm
    parameters: tuple  # parameter tensors θ the data was evaluated at
    data: QuadraticData
    kkt: QuadraticKKT
    x: np.ndarray
    dual: np.ndarray  # shadow prices of the constraint rows
    objective_value: float


def numeric_problem(data: QuadraticData) -> NumericQP:
    """The solver's view (numpy / scipy) of unbatched QP data."""
    return NumericQP(
        P=data.P_matrix(), q=data.q.detach().numpy().copy(), r=float(data.r),
        C=data.C_matrix(), c0=data.c0.detach().numpy().copy(), sense=data.sense,
        lb=data.lb, ub=data.ub,
    )


class Sensitivity:
    """Solution state, seeds and results of one model."""

    def __init__(self, model):
        self.model = model
        self._form: QuadraticForm | None = None
        self._state: SolvedState | None = None
        self.status = "optimize_not_called"
        self.empty_input_sensitivities()

    # -- lifecycle ----------------------------------------------------------------------
    def structure_changed(self):
        self._form = None
        self.solution_invalidated()

    def solution_invalidated(self):
        self._state = None
        self._forward = None
        self._reverse = None
        if self.status == "optimal":
            self.status = "optimize_not_called"

    def parameter_tensors(self) -> dict:
        return {p: torch.as_tensor(p.value, dtype=torch.float64) for p in self.model.parameters}

    def form(self) -> QuadraticForm:
        if self._form is None:
            self._form = QuadraticForm(self.model)
        return self._form

    def optimize(self):
        self.solution_invalidated()
        form = self.form()
        if form.objective is None and form.m == 0 and form.n == 0:
            raise ValueError("the model is empty")
        values = self.parameter_tensors()
        theta = tuple(values[p] for p in form.parameters)
        data = form.data(values)
        problem = numeric_problem(data)
        try:
            kkt = solve_and_certify(problem, self.model.solver, form.objective_sign < 0)
        except (SolverError, NonconvexError) as err:
            self.status = _STATUS_OF.get(type(err), "solver_error")
            raise
        kkt.warn_if_degenerate()
        x = kkt.x
        internal_obj = 0.5 * x @ (problem.P @ x) + problem.q @ x + problem.r
        sign = form.objective_sign
        self._state = SolvedState(
            form, theta, data, kkt, x, -sign * kkt.mu, float(sign * internal_obj))
        self.status = "optimal"

    def solved(self) -> SolvedState:
        if self._state is None:
            raise DifferentiationError(
                "no solution: call optimize() first (the model was not solved since it or "
                f"its parameters last changed; status: {self.status})"
            )
        return self._state

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
    def _data_tangent(self, state: SolvedState) -> DataTangent:
        form, data = state.form, state.data
        n, m = form.n, form.m
        dP = sp.csr_matrix((n, n))
        dq, dr = np.zeros(n), 0.0
        dC = sp.csr_matrix((m, n))
        dc0 = np.zeros(m)
        if self._param_seeds:
            directions = tuple(
                torch.as_tensor(self._param_seeds.get(p, np.zeros(p.shape)), dtype=torch.float64)
                for p in form.parameters)
            tP, tq, tr, tC, tc0 = (t.numpy() for t in form.data_jvp(state.parameters,
                                                                    directions))
            dP = dP + sp.csr_matrix((tP, (data.P_rows, data.P_cols)), shape=(n, n))
            dq, dr = dq + tq, dr + float(tr)
            dC = dC + sp.csr_matrix((tC, (data.C_rows, data.C_cols)), shape=(m, n))
            dc0 = dc0 + tc0
        ev = Evaluator(self.parameter_tensors())
        sign = form.objective_sign
        for expr in self._objective_seeds:
            canon = ev.canon(expr.sum() if expr.shape else expr)
            i, j = canon.quad.vars
            v = canon.quad.vals.numpy()
            dP = dP + sign * sp.csr_matrix(
                (np.concatenate((v, v)), (np.concatenate((i, j)), np.concatenate((j, i)))),
                shape=(n, n))
            dq = dq + sign * np.bincount(canon.lin.vars[0], canon.lin.vals.numpy(), minlength=n)
            dr += sign * float(canon.const.sum())
        for constraint, expr in self._constraint_seeds:
            rows = form.rows_of(constraint).ravel()
            canon = ev.broadcast(expr, tuple(constraint.shape))
            dC = dC + sp.csr_matrix(
                (canon.lin.vals.numpy(), (rows[canon.lin.rows], canon.lin.vars[0])), shape=(m, n))
            np.add.at(dc0, rows, canon.const.numpy())
        return DataTangent(dP, dq, dr, dC, dc0)

    def forward_differentiate(self):
        state = self.solved()
        dx, dmu, dobj = state.kkt.jvp(self._data_tangent(state))
        sign = state.form.objective_sign
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
            out = value[self.solved().form.rows_of(obj)].reshape(obj.shape)
        return float(out) if out.shape == () else out.copy()

    # -- reverse mode ---------------------------------------------------------------------
    def reverse_differentiate(self):
        state = self.solved()
        form, data = state.form, state.data
        sign = form.objective_sign
        x_bar = np.zeros(form.n)
        for var, seed in self._var_seeds.items():
            x_bar[var.offset: var.offset + var.size] += seed.ravel()
        mu_bar = np.zeros(form.m)
        for constraint, seed in self._dual_seeds:
            np.add.at(mu_bar, form.rows_of(constraint).ravel(), -sign * seed.ravel())
        cot = state.kkt.vjp(x_bar, mu_bar, sign * self._obj_seed)

        grads = {}
        if form.parameters:
            theta = tuple(t.detach().clone().requires_grad_(True) for t in state.parameters)
            with torch.enable_grad():
                values = form.data_values(*theta)
            bars = (cot.P_at(data.P_rows, data.P_cols), cot.q, np.array(cot.r),
                    cot.C_at(data.C_rows, data.C_cols), cot.c0)
            pairs = [(v, torch.as_tensor(b, dtype=v.dtype).reshape(v.shape))
                     for v, b in zip(values, bars) if v.requires_grad]
            if pairs:
                outs = torch.autograd.grad([v for v, _ in pairs], theta,
                                           [b for _, b in pairs], allow_unused=True)
            else:
                outs = [None] * len(theta)
            for p, g in zip(form.parameters, outs):
                grads[p] = np.zeros(p.shape) if g is None else g.numpy().reshape(p.shape)
        self._reverse = {"parameters": grads, "cotangent": cot}

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
        sign = self.solved().form.objective_sign
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
        rows = self.solved().form.rows_of(constraint).ravel()

        def linear(var):
            cols = np.arange(var.offset, var.offset + var.size)
            return cot.C_at(rows[:, None], cols[None, :])

        return CoefficientFunction(self.model, tuple(constraint.shape),
                                   cot.c0[rows], linear)
