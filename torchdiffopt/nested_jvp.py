"""Jacobian-vector products that run inside an active forward-mode level.

``torch.autograd.forward_ad`` cannot nest: a layer's own ``jvp`` rule may already run inside
a dual level, where it cannot open another to differentiate the model's data map. The
double-backward trick needs reverse mode only: for ``y = f(θ)`` and a dummy cotangent
``u``, ``g(u) = (∂f/∂θ)ᵀ u`` is linear in ``u``, so ``∂⟨g(u), dθ⟩/∂u = (∂f/∂θ) dθ``. It costs
about two reverse passes.
"""

from __future__ import annotations

import torch


def double_backward_jvp(fn, primals: tuple, directions: tuple) -> tuple:
    """``(values, tangents)`` of ``values = fn(*primals)`` (a tuple of tensors) along
    ``directions`` (one per primal): ``tangents[i] = Σ_j (∂values[i]/∂primals[j])
    directions[j]``, zeros for values that do not depend on the primals. Values and tangents
    are detached."""
    primals = tuple(t.detach().requires_grad_(True) for t in primals)
    with torch.enable_grad():
        values = fn(*primals)
        live = [v for v in values if v.requires_grad]
        dummies = [torch.zeros_like(v, requires_grad=True) for v in live]
        vjps = torch.autograd.grad(live, primals, dummies, create_graph=True,
                                   allow_unused=True) if live else ()
        inner = sum(((g * d).sum() for g, d in zip(vjps, directions) if g is not None),
                    torch.zeros((), dtype=values[0].dtype))
        jvps = iter(torch.autograd.grad(inner, dummies, allow_unused=True)
                    if inner.requires_grad else [None] * len(live))
    tangents = [next(jvps) if v.requires_grad else None for v in values]
    return (tuple(v.detach() for v in values),
            tuple((torch.zeros_like(v) if t is None else t).detach()
                  for v, t in zip(values, tangents)))
