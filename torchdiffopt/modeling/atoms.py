"""Convex norm atoms: ``norm2``, ``norm1``, ``norm_inf`` of an affine expression.

An atom is a scalar expression node. Its value is the norm (torch, so :meth:`Model.value`
and the nonlinear backend evaluate it); of data alone (constants, parameters) it is data. In
an optimization model it has no coefficient form of its own: the conic compiler
(:mod:`torchdiffopt.compile.conic`) replaces it by an epigraph variable ``t`` with cone rows

    norm2(e)    → t,        (t, e) ∈ SOC
    norm_inf(e) → t,        t·1 - e ≥ 0,  t·1 + e ≥ 0
    norm1(e)    → Σᵢ uᵢ,    u - e ≥ 0,    u + e ≥ 0

which is exact where the atom may only be pushed down: with a nonnegative weight in a
minimized objective (nonpositive in a maximized one), on the smaller side of a ``<=``
constraint or the larger side of a ``>=``. Elsewhere (``norm2(x) >= t``, ``==``) the problem
is not convex, and compiling it raises :class:`~torchdiffopt.errors.NonconvexError`.
The atom's degree is 1 (it is affine in its epigraph variable) when its argument is affine.
"""

from __future__ import annotations

import torch

from .canonical import Canon
from .expressions import NONLINEAR, Expression, as_expression

#: torch's ``ord`` of each atom
_ORD = {"norm2": 2, "norm1": 1, "norm_inf": float("inf")}


class NormAtom(Expression):
    """``name(inner)``, the norm of all entries of ``inner``, a scalar."""

    shape = ()

    def __init__(self, name: str, inner: Expression):
        self.name, self.inner = name, inner
        self.degree = 0 if inner.degree == 0 else (1 if inner.degree == 1 else NONLINEAR)

    def _canon(self, ev):
        if self.degree == 0:
            const = ev.canon(self.inner).const
            return Canon.constant(torch.linalg.vector_norm(const, _ORD[self.name], dim=-1,
                                                           keepdim=True))
        return ev.atom(self)

    def _value(self, ev):
        return torch.linalg.vector_norm(ev.value(self.inner).reshape(-1), _ORD[self.name])

    def __repr__(self):
        return f"{self.name}(<expression of shape {self.inner.shape}>)"


def _atom(name: str, description: str):
    def apply(a) -> NormAtom:
        return NormAtom(name, as_expression(a))

    apply.__name__ = apply.__qualname__ = name
    apply.__doc__ = (f"``{description}`` over all entries of ``a``: a convex atom (the conic "
                     "backend reformulates it with cones, see :mod:`torchdiffopt.modeling.atoms`).")
    return apply


norm2 = _atom("norm2", "‖a‖₂ = √(Σ aᵢ²)")
norm1 = _atom("norm1", "‖a‖₁ = Σ |aᵢ|")
norm_inf = _atom("norm_inf", "‖a‖∞ = maxᵢ |aᵢ|")


def atoms_in(expressions) -> list[NormAtom]:
    """The distinct atoms of the variables (by identity; an atom of data alone is data) inside
    the given expressions, in order of first appearance (depth first)."""
    found, seen = [], set()
    stack = list(reversed([e for e in expressions if e is not None]))
    while stack:
        expr = stack.pop()
        if id(expr) in seen:
            continue
        seen.add(id(expr))
        if isinstance(expr, NormAtom) and expr.degree > 0:
            found.append(expr)
        stack.extend(reversed(expr.children))
    return found
