"""Model → nonlinear program callables, torch functions of the variables and parameters.

The compiled form is, always as a *minimization*::

    minimize    f(x; θ)                       (= objective_sign · user objective)
    subject to  g(x; θ) ∈ S_1 × … × S_m,     S_i ∈ {{0}, [0, ∞), (-∞, 0]}
                lb ≤ x ≤ ub

where row ``i`` of ``g`` is the user's normalized constraint function ``lhs - rhs`` (as in
:mod:`torchdiffopt.compile.quadratic`, so the two backends share sign conventions). Values,
gradients, Jacobians and Hessians all come from torch autograd / ``torch.func``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..modeling.expressions import ValueEvaluator
from .quadratic import SENSE_CODES


class NonlinearForm:
    """The compiled structure of a model for the nonlinear backend."""

    def __init__(self, model):
        self.model = model
        self.n = model.num_variables
        self.parameters = list(model.parameters)
        self.objective_expression = model.objective_expression
        self.objective_sign = model.objective_sign
        self.constraints = list(model.constraints)
        self.row_offsets = {}
        senses, offset = [], 0
        for con in self.constraints:
            size = con.relation.expression.size
            self.row_offsets[con] = offset
            senses.append(np.full(size, SENSE_CODES[con.relation.sense], dtype=np.int8))
            offset += size
        self.m = offset
        self.sense = np.concatenate(senses) if senses else np.zeros(0, dtype=np.int8)
        self.lb, self.ub = model.bounds()

    def rows_of(self, constraint) -> np.ndarray:
        return self.row_offsets[constraint.root] + constraint.local_rows

    def _evaluator(self, x, theta) -> ValueEvaluator:
        return ValueEvaluator(x, dict(zip(self.parameters, theta)))

    def objective(self, x: torch.Tensor, theta: tuple) -> torch.Tensor:
        """``f(x; θ)``, the internal (minimized) objective, a 0-d tensor."""
        if self.objective_expression is None:
            return x.new_zeros(())
        value = self._evaluator(x, theta).value(self.objective_expression)
        return self.objective_sign * value.reshape(())

    def constraints_value(self, x: torch.Tensor, theta: tuple) -> torch.Tensor:
        """``g(x; θ)``, all constraint rows ``lhs - rhs``, shape ``(m,)``."""
        if not self.constraints:
            return x.new_zeros(0)
        ev = self._evaluator(x, theta)
        rows = []
        for con in self.constraints:
            value = ev.value(con.relation.expression)
            rows.append(value.reshape(-1).expand(con.relation.expression.size)
                        if value.dim() == 0 else value.reshape(-1))
        return torch.cat(rows)

    def lagrangian(self, x: torch.Tensor, mu: torch.Tensor, theta: tuple) -> torch.Tensor:
        """``L = f + μᵀ g`` over the constraint rows (bound rows are added by the backend:
        they do not depend on θ)."""
        return self.objective(x, theta) + mu @ self.constraints_value(x, theta)
