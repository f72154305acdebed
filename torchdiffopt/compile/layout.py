"""What every compiled form shares: the model's sizes, parameters, objective sense, and the
layout of its constraint rows (each constraint's rows, in order, with their senses)."""

from __future__ import annotations

import numpy as np

#: row sense codes: ``lhs - rhs`` in {0}, [0, ∞) or (-∞, 0]
SENSE_CODES = {"==": 0, ">=": 1, "<=": -1}


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
            senses.append(np.full(size, SENSE_CODES[con.relation.sense], dtype=np.int8))
            offset += size
        self.m = offset
        self.sense = np.concatenate(senses) if senses else np.zeros(0, dtype=np.int8)
        self.lb, self.ub = model.bounds()

    def rows_of(self, constraint) -> np.ndarray:
        """Row indices belonging to a constraint reference (or a view of one)."""
        return self.row_offsets[constraint.root] + constraint.local_rows
