"""Cone constraints: ``m.constraint(tdo.SOC(t, x))`` and the other cones.

A cone constraint is a :class:`~.expressions.Relation` ``function ∈ K`` whose function
stacks the cone's arguments (affine expressions, parameters or constants) into the shape
below; the constraint's rows, its dual and the functional API's tangents and cotangents all
have that shape.

==============================  =========================  ====================================
set                             shape of the function      meaning
==============================  =========================  ====================================
``SOC(t, x)``                   ``(1 + x.size,)``: (t, x)  ``‖x‖₂ ≤ t``
``RotatedSOC(u, v, x)``         ``(2 + x.size,)``          ``2uv ≥ ‖x‖₂²``, ``u, v ≥ 0``
``PSD(X)``                      ``(d, d)``: X              ``½(X + Xᵀ) ⪰ 0``
``ExpCone(x, y, z)``            ``S + (3,)``               ``y·exp(x/y) ≤ z``, ``y > 0`` (closure)
``PowerCone(x, y, z, alpha)``   ``S + (3,)``               ``x^α y^(1-α) ≥ |z|``, ``x, y ≥ 0``
==============================  =========================  ====================================

``ExpCone`` and ``PowerCone`` broadcast their arguments to a common shape ``S`` (one cone per
entry; entry ``[..., k]`` of the function is the k-th argument). ``PSD`` takes a square
matrix expression meant to be symmetric; the cone constrains its symmetric part (the
``√2``-scaled lower triangle is what the solver sees, :func:`~torchdiffopt.backends.cones.svec`).

Duals follow the shadow-price convention of every constraint: the dual is ``∂f*/∂r`` for the
shifted constraint ``function - r ∈ K``, so for a minimization it lies in the dual cone
``K*`` (for these self-dual cones: in ``K``; a PSD dual is a symmetric PSD matrix), as the
dual of a ``>=`` row is ``≥ 0``.
"""

from __future__ import annotations

import numbers

import numpy as np

from .atoms import atoms_in
from .expressions import Concat, Expression, Gather, Relation, _broadcast_source, as_expression


class ConeConstraint(Relation):
    """``expression ∈ K`` for the cone named ``sense`` (``"soc"``, ``"rotated_soc"``,
    ``"psd"``, ``"exp"``, ``"power"``); ``alpha`` is the power cone's exponent."""

    def __init__(self, expression: Expression, sense: str, alpha: float | None = None):
        super().__init__(expression, sense)
        self.alpha = alpha
        if expression.degree > 1:
            raise ValueError(f"the arguments of a {sense} cone must be affine expressions, "
                             "parameters or constants")
        if atoms_in([expression]):
            raise ValueError(f"norm atoms cannot be arguments of a {sense} cone: bound them by "
                             "a variable first (m.constraint(tdo.norm2(x) <= t))")


def _vector(x) -> Expression:
    x = as_expression(x)
    return x if x.shape == (x.size,) else x.reshape(x.size)


def _scalar(value, what: str) -> Expression:
    value = as_expression(value)
    if value.size != 1:
        raise ValueError(f"{what} must be a scalar, got shape {value.shape}")
    return _vector(value)


def SOC(t, x) -> ConeConstraint:  # noqa: N802 - the cone's name
    """``‖x‖₂ ≤ t``: the second-order cone; ``t`` scalar, ``x`` of any shape (flattened)."""
    return ConeConstraint(Concat([_scalar(t, "SOC's t"), _vector(x)]), "soc")


def RotatedSOC(u, v, x) -> ConeConstraint:  # noqa: N802
    """``2uv ≥ ‖x‖₂²`` with ``u, v ≥ 0``: the rotated second-order cone."""
    return ConeConstraint(Concat([_scalar(u, "RotatedSOC's u"), _scalar(v, "RotatedSOC's v"),
                                  _vector(x)]), "rotated_soc")


def PSD(X) -> ConeConstraint:  # noqa: N802
    """``X ⪰ 0`` for a square, symmetric matrix expression (its symmetric part is used)."""
    X = as_expression(X)
    if X.ndim != 2 or X.shape[0] != X.shape[1]:
        raise ValueError(f"PSD takes a square matrix expression, got shape {X.shape}")
    return ConeConstraint(X, "psd")


def _triples(x, y, z) -> Expression:
    """``(x, y, z)`` broadcast to a common shape ``S``, as an expression of shape ``S + (3,)``."""
    parts = [as_expression(a) for a in (x, y, z)]
    shape = np.broadcast_shapes(*(p.shape for p in parts))
    size = int(np.prod(shape, dtype=np.int64))
    flat = Concat([p if p.shape == shape else Gather(p, _broadcast_source(p.shape, shape)
                                                      .reshape(shape)) for p in parts])
    return Gather(flat, np.arange(3 * size).reshape(3, size).T.reshape(shape + (3,)))


def ExpCone(x, y, z) -> ConeConstraint:  # noqa: N802
    """``y·exp(x/y) ≤ z`` (``y > 0``, and its closure): the exponential cone; arguments
    broadcast (one cone per entry)."""
    return ConeConstraint(_triples(x, y, z), "exp")


def PowerCone(x, y, z, alpha) -> ConeConstraint:  # noqa: N802
    """``x^α y^(1-α) ≥ |z|`` with ``x, y ≥ 0``, ``0 < α < 1``: the power cone; arguments
    broadcast (one cone per entry)."""
    if not isinstance(alpha, numbers.Real) or not 0.0 < alpha < 1.0:
        raise ValueError(f"the power cone's alpha must be a number in (0, 1), got {alpha!r}")
    return ConeConstraint(_triples(x, y, z), "power", float(alpha))


__all__ = ["ConeConstraint", "ExpCone", "PSD", "PowerCone", "RotatedSOC", "SOC"]
