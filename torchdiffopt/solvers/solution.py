"""What solver adapters take and return."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass
class NumericQP:
    """The internal QP of :mod:`torchdiffopt.compile.quadratic` as numpy / scipy data::

        min ½ xᵀPx + qᵀx + r   s.t.  C x + c0 ∈ S (per-row ``sense``: 0 ==, +1 ≥ 0, -1 ≤ 0),
                                     lb ≤ x ≤ ub
    """

    P: sp.csr_matrix
    q: np.ndarray
    r: float
    C: sp.csr_matrix
    c0: np.ndarray
    sense: np.ndarray
    lb: np.ndarray
    ub: np.ndarray

    @property
    def n(self) -> int:
        return len(self.q)

    @property
    def m(self) -> int:
        return len(self.c0)


@dataclass
class Solution:
    """An optimal primal point with shadow prices of the internal (minimization) problem.

    ``row_shadow[i] = ∂ f*/∂ rhs_i`` with ``rhs_i = -c0_i``; ``bound_shadow[j] = ∂ f*/∂ b_j``
    for the active bound ``b_j`` of ``x_j`` (zero when no bound is active).
    """

    x: np.ndarray
    row_shadow: np.ndarray
    bound_shadow: np.ndarray
