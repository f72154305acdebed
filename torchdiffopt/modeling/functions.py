"""Numeric functions of the variables returned by the reverse-mode getters.

A :class:`CoefficientFunction` of shape ``S`` stands for

    g(x) = constant + Σ_j coefficient_j x_j (+ Σ_ij quadratic_ij x_i x_j)

entry by entry. Its coefficients are computed on demand per variable block, so a function
of a large model is never expanded into a dense ``(rows × variables)`` array unless asked.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def _format(value: float) -> str:
    return f"{value:.6g}"


class CoefficientFunction:
    """Coefficients of a function of the variables; read with :meth:`coefficient`,
    :attr:`constant` and :meth:`quadratic_coefficient`."""

    def __init__(self, model, shape: tuple, constant: np.ndarray,
                 linear: Callable, quadratic: Callable | None = None):
        self.model = model
        self.shape = shape
        self._constant = np.asarray(constant, dtype=np.float64).reshape(shape)
        self._linear = linear
        self._quadratic = quadratic

    @property
    def constant(self):
        """The constant term (a float, or an array of the function's shape)."""
        return float(self._constant) if self.shape == () else self._constant.copy()

    def coefficient(self, variable):
        """Coefficients on ``variable``: an array of shape ``self.shape + variable.shape``
        (a float when both are scalars)."""
        if variable.model is not self.model:
            raise ValueError(f"{variable!r} belongs to another model")
        out = np.asarray(self._linear(variable), dtype=np.float64).reshape(
            self.shape + variable.shape)
        return float(out) if out.shape == () else out

    def quadratic_coefficient(self, a, b):
        """Coefficients of the monomials ``a_i b_j`` (objective functions only), as an array
        of shape ``a.shape + b.shape``."""
        if self._quadratic is None:
            raise TypeError("this function has no quadratic part")
        out = np.asarray(self._quadratic(a, b), dtype=np.float64).reshape(a.shape + b.shape)
        return float(out) if out.shape == () else out

    def __getitem__(self, key):
        if self.shape == ():
            raise TypeError("a scalar function cannot be indexed")
        rows = np.arange(int(np.prod(self.shape))).reshape(self.shape)[key]

        def linear(var, rows=rows):
            full = np.asarray(self._linear(var)).reshape(int(np.prod(self.shape)), -1)
            return full[np.asarray(rows).ravel()]

        return CoefficientFunction(self.model, np.asarray(rows).shape,
                                   self._constant.ravel()[np.asarray(rows).ravel()], linear)

    def _terms(self, flat_row: int) -> str:
        parts = []
        size = int(np.prod(self.shape))
        for var in self.model.variables:
            coef = np.asarray(self._linear(var)).reshape(size, var.size)[flat_row]
            for j in np.flatnonzero(coef):
                parts.append((coef[j], var.element_name(j)))
        const = self._constant.ravel()[flat_row]
        text = ""
        for value, name in parts:
            sign = "-" if value < 0 else "+"
            body = name if abs(value) == 1 else f"{_format(abs(value))} {name}"
            text += (f"-{body}" if sign == "-" else body) if not text else f" {sign} {body}"
        if const != 0 or not text:
            if not text:
                text = _format(const)
            else:
                text += f" {'-' if const < 0 else '+'} {_format(abs(const))}"
        return text

    def __repr__(self):
        if self.shape == ():
            return self._terms(0)
        return "[" + ", ".join(self._terms(i) for i in range(int(np.prod(self.shape)))) + "]"
