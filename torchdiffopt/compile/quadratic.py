"""Model → quadratic program data, as a torch function of the parameters.

The compiled form is the quadratic program, always as a *minimization*::

    minimize    ½ xᵀ P x + qᵀ x + r
    subject to  C x + c0  ∈ S_1 × … × S_m,     S_i ∈ {{0}, [0, ∞), (-∞, 0]}
                lb ≤ x ≤ ub

Row ``i`` of ``C x + c0`` is the normalized constraint function ``lhs - rhs`` of the
user's constraint (no sign flip), so the functional API's tangents and cotangents of a
constraint function are tangents and cotangents of its rows of ``(C, c0)``. A ``maximize``
objective is negated: ``objective_sign`` (+1 or -1) maps the internal objective back.

``P``, ``C`` are sparse, stored as fixed ``(rows, cols)`` patterns with value tensors. The
values are torch functions of the parameter tensors (computed by :meth:`QuadraticForm.data`),
so the chain rule from data to parameters is torch autograd / ``torch.func``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from ..modeling.atoms import atoms_in
from ..modeling.canonical import Canon, cat_last, scatter_add_last
from ..modeling.expressions import Evaluator, KeptForms
from .layout import DataForm


@dataclass
class QuadraticData:
    """Numeric data of the compiled quadratic program (see the module docstring)."""

    n: int
    m: int
    P_rows: np.ndarray
    P_cols: np.ndarray
    P_vals: torch.Tensor
    q: torch.Tensor
    r: torch.Tensor  # shape (*batch,)
    C_rows: np.ndarray
    C_cols: np.ndarray
    C_vals: torch.Tensor
    c0: torch.Tensor
    sense: np.ndarray  # int8: 0 for ==, +1 for ≥ 0, -1 for ≤ 0
    lb: np.ndarray
    ub: np.ndarray

    def values(self) -> tuple:
        """The parameter-dependent tensors, in a fixed order (for autograd and jvp)."""
        return (self.P_vals, self.q, self.r, self.C_vals, self.c0)

    def P_matrix(self) -> sp.csr_matrix:
        return sp.csr_matrix(
            (self.P_vals.detach().numpy(), (self.P_rows, self.P_cols)), shape=(self.n, self.n)
        )

    def C_matrix(self) -> sp.csr_matrix:
        return sp.csr_matrix(
            (self.C_vals.detach().numpy(), (self.C_rows, self.C_cols)), shape=(self.m, self.n)
        )


def quadratic_objective(obj: Canon | None, sign: float, n: int, dtype=torch.float64):
    """``(P_rows, P_cols, P_vals, q, r)`` of ``sign · obj`` over ``n`` variables, with
    ``Σ v x_i x_j = ½ xᵀPx`` (``P_ij += v`` and ``P_ji += v``); zeros for no objective."""
    if obj is None:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, torch.zeros(0, dtype=dtype), torch.zeros(n, dtype=dtype), \
            torch.zeros((), dtype=dtype)
    i, j = obj.quad.vars
    return (np.concatenate((i, j)), np.concatenate((j, i)),
            sign * torch.cat((obj.quad.vals, obj.quad.vals), dim=-1),
            sign * scatter_add_last(obj.lin.vals, obj.lin.vars[0], n), sign * obj.const[..., 0])


class QuadraticForm(DataForm):
    """The compiled structure of a model: variable count, constraint rows, objective sense.

    Built once per model structure; :meth:`data` evaluates it for any parameter tensors.
    """

    def __init__(self, model):
        super().__init__(model)
        # for data(): the parameter-free parts, evaluated once
        self._kept = KeptForms([self.objective_expression]
                               + [con.relation.expression for con in self.constraints])
        self.reject_cones("quadratic")
        if atoms_in([self.objective_expression]
                    + [c.relation.expression for c in self.constraints]):
            raise ValueError("norm atoms (norm2, norm1, norm_inf) are reformulated with cones by "
                             "the conic backend: use backend='conic' or 'auto' "
                             "(tdo.conic_diff_model, tdo.diff_model)")
        for con in self.constraints:
            expr = con.relation.expression
            if expr.degree > 1:
                kind = "quadratic" if expr.degree == 2 else "nonlinear"
                raise ValueError(
                    f"constraint {con.name!r} is {kind}: the quadratic backend takes linear "
                    "constraints only (backend='nonlinear' takes any smooth constraint)"
                )

    def data(self, parameter_values: dict) -> QuadraticData:
        """Evaluate ``P, q, r, C, c0`` for ``parameter_values`` (Parameter → tensor)."""
        ev = Evaluator(parameter_values, kept=self._kept)
        dtype = ev.dtype
        obj = None if self.objective_expression is None else ev.canon(self.objective_expression)
        P_rows, P_cols, P_vals, q, r = quadratic_objective(obj, float(self.objective_sign),
                                                           self.n, dtype)
        row_parts, col_parts, val_parts, const_parts = [], [], [], []
        for con in self.constraints:
            canon = ev.canon(con.relation.expression)
            offset = self.row_offsets[con]
            row_parts.append(canon.lin.rows + offset)
            col_parts.append(canon.lin.vars[0])
            val_parts.append(canon.lin.vals)
            const_parts.append(canon.const)
        if self.constraints:
            C_rows = np.concatenate(row_parts)
            C_cols = np.concatenate(col_parts)
            C_vals = cat_last(val_parts)
            c0 = cat_last(const_parts)
        else:
            C_rows = C_cols = np.zeros(0, dtype=np.int64)
            C_vals = torch.zeros(0, dtype=dtype)
            c0 = torch.zeros(0, dtype=dtype)
        return QuadraticData(
            self.n, self.m, P_rows, P_cols, P_vals, q, r, C_rows, C_cols, C_vals, c0,
            self.sense, self.lb, self.ub,
        )
