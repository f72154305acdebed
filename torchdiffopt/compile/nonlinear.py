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

import torch

from ..modeling.expressions import ValueEvaluator
from .layout import ModelLayout


class NonlinearForm(ModelLayout):
    """The compiled structure of a model for the nonlinear backend."""

    def __init__(self, model):
        super().__init__(model)
        self.reject_cones("nonlinear")

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
