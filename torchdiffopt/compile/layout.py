"""What every compiled form shares: the model's sizes, parameters, objective sense, and the
layout of its constraint rows (each constraint's rows, in order, with their senses); and, for
the forms whose data ``D(θ)`` is a tuple of tensors, the data map's forward-mode tangents."""

from __future__ import annotations

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD

from ..nested_jvp import double_backward_jvp

#: row sense codes: ``lhs - rhs`` in {0}, [0, ∞) or (-∞, 0]
SENSE_CODES = {"==": 0, ">=": 1, "<=": -1}
#: sense code of the rows of a cone constraint (:mod:`torchdiffopt.modeling.sets`)
CONE = 2


class ModelLayout:
    """Sizes and row layout of a model, snapshot at compile time."""

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
            senses.append(np.full(size, SENSE_CODES.get(con.relation.sense, CONE),
                                  dtype=np.int8))
            offset += size
        self.m = offset
        self.sense = np.concatenate(senses) if senses else np.zeros(0, dtype=np.int8)
        self.lb, self.ub = model.bounds()

    def rows_of(self, constraint) -> np.ndarray:
        """Row indices belonging to a constraint reference (or a view of one)."""
        return self.row_offsets[constraint.root] + constraint.local_rows

    def reject_cones(self, backend: str) -> None:
        """Raise for cone constraints, which only the conic backend takes."""
        for con in self.constraints:
            if con.relation.sense not in SENSE_CODES:
                raise ValueError(
                    f"constraint {con.name!r} is a {con.relation.sense} cone: the {backend} "
                    "backend takes no cones; use backend='conic' or 'auto' "
                    "(tdo.conic_diff_model, tdo.diff_model)")


class DataForm(ModelLayout):
    """A compiled form whose data ``D(θ) = data(θ).values()`` is a tuple of tensors."""

    def data(self, parameter_values: dict):  # pragma: no cover - abstract
        raise NotImplementedError

    def data_values(self, *parameter_tensors: torch.Tensor) -> tuple:
        """``data(θ).values()`` as a pure function of the parameter tensors (for torch.func)."""
        return self.data(dict(zip(self.parameters, parameter_tensors))).values()

    def data_jvp(self, theta: tuple, directions: tuple, nestable: bool = False) -> tuple:
        """Tangents ``(∂D/∂θ) dθ`` of :meth:`data_values`; zeros for values that do not depend
        on θ. By forward-mode AD (dual numbers), or with ``nestable=True`` by the
        double-backward trick (reverse mode twice, about twice the cost), which also runs
        inside an active forward-mode level (a layer's ``jvp``), where forward AD cannot nest."""
        if nestable:
            return double_backward_jvp(self.data_values, theta, directions)[1]
        with fwAD.dual_level():
            duals = tuple(fwAD.make_dual(t, d) for t, d in zip(theta, directions))
            values = self.data_values(*duals)
            tangents = [fwAD.unpack_dual(v).tangent for v in values]
        return tuple((torch.zeros_like(v) if t is None else t).detach()
                     for v, t in zip(values, tangents))
