"""How the batched solution maps meet ``torch.func``: vmap by folding, and their derivatives
under it.

The solution maps (:class:`~torchdiffopt.qp_function.QPSolve`,
:class:`~torchdiffopt.conic_function.ConicSolve`, :class:`~torchdiffopt.nlp_function.NLPSolve`)
are autograd functions over a batch whose members are solved by external solvers, which no
per-operation batching rule can see into. Their ``vmap`` rule therefore folds a vmapped
dimension into the batch (:func:`vmap_by_folding`): ``(V, B, …) → (V·B, …)``, one solve of
``V·B`` members, unfolded after. The factorizations their derivatives reuse then hold
``V·B`` members.

A derivative transform inside the vmap (``vmap(grad(f))``: per-sample gradients,
``vmap(jacrev(f))``, ``vmap(jvp(f))``) calls ``backward`` / ``jvp`` with seeds batched at
that vmap's level, whose logical batch is ``B``: each vmapped slice must meet its own ``B``
members of the ``V·B``, which a per-operation batching rule cannot select (it would
broadcast every slice against all of them). :func:`derivative_under_transforms` routes such
a derivative through an autograd function of its own whose ``vmap`` rule, at each level the
forward folded (recorded on the call object by :func:`vmap_by_folding`), folds the seeds the
same way, so slice ``v`` meets members ``v·B … v·B + B − 1``; at a level the forward did not
fold (the vmap of ``jacrev`` in ``vmap(jacrev(f))``), the slices are taken one at a time, so
that the folded level below meets each. Without a folded level (``jacrev(f)``,
``jacfwd(f)``: many seeds against one solve) the solution maps run their derivative's
operations on the transformed seeds directly.
"""

from __future__ import annotations

import torch


def reject_nested_derivatives() -> None:
    """Raise NotImplementedError under two or more nested differentiating ``torch.func``
    transforms (``hessian``, ``jacfwd(jacrev(…))``, ``grad(grad(…))``). The solution maps'
    ``backward`` and ``jvp`` use the factorization of the optimality conditions as a constant,
    which is exact to first order only: a second derivative through them would silently
    miss the terms where that factorization moves. ``vmap`` over one derivative is fine."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    levels = [i.key() for i in retrieve_all_functorch_interpreters()]
    if sum(k in (TransformType.Grad, TransformType.Jvp) for k in levels) > 1:
        raise NotImplementedError(_SECOND_DERIVATIVES)


_SECOND_DERIVATIVES = (
    "second derivatives of an optimization layer (nested grad/jvp transforms such as "
    "torch.func.hessian) are not supported: its derivatives are exact to first order only")


def vmap_by_folding(function, info, in_dims, call, tensors):
    """The ``vmap`` rule of a batched autograd function ``function.apply(call, *tensors)``
    whose tensors all lead with the batch dimension: the vmapped dimension is folded into
    the batch (``(V, B, …) → (V·B, …)``), solved once, and unfolded. Inputs without the
    vmapped dimension are expanded; if none has it, the call is passed through. The level
    folded is added to ``call.folded_levels`` (for :func:`derivative_under_transforms`)."""
    dims = in_dims[1:]
    if all(d is None for d in dims):
        outs = function.apply(call, *tensors)
        return outs, (None,) * len(outs)
    call.folded_levels = getattr(call, "folded_levels", frozenset()) | {_level()}
    V = info.batch_size
    merged = []
    for t, d in zip(tensors, dims):
        t = t.unsqueeze(0).expand(V, *t.shape) if d is None else t.movedim(d, 0)
        merged.append(t.reshape(V * t.shape[1], *t.shape[2:]))
    outs = function.apply(call, *merged)
    return tuple(o.reshape(V, o.shape[0] // V, *o.shape[1:]) for o in outs), (0,) * len(outs)


def _level() -> int:
    """The functorch level a ``vmap`` rule runs at (0 outside every transform): each rule
    runs one level below its own vmap's, the same in the forward and the derivative."""
    level = torch._C._functorch.maybe_current_level()
    return 0 if level is None else level


def is_transformed(*tensors) -> bool:
    """Whether any of ``tensors`` (None skipped) is wrapped by a ``torch.func`` transform."""
    return any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t)
               for t in tensors)


def derivative_under_transforms(fn, folded_levels, *seeds: torch.Tensor):
    """``fn(*seeds)`` (a tuple of tensors, each leading with the batch dimension, as do the
    ``seeds``) for a derivative of a solution map whose forward folded the vmap levels
    ``folded_levels`` (its call's ``folded_levels``), called under ``torch.func``
    transforms; see the module docstring."""
    return _MemberDerivative.apply(_Derivative(fn, frozenset(folded_levels)), *seeds)


class _Derivative:
    """The derivative ``fn`` and the vmap levels its solution map's forward folded."""

    def __init__(self, fn, folded: frozenset):
        self.fn, self.folded = fn, folded


class _MemberDerivative(torch.autograd.Function):
    """``apply(derivative, *seeds) = derivative.fn(*seeds)``, with the ``vmap`` rule of
    :func:`derivative_under_transforms`. Not differentiable itself: a derivative of it is a
    second derivative of the solution map."""

    @staticmethod
    def forward(derivative, *seeds):
        return tuple(derivative.fn(*seeds))

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(_SECOND_DERIVATIVES)

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(_SECOND_DERIVATIVES)

    @staticmethod
    def vmap(info, in_dims, derivative, *seeds):
        dims = in_dims[1:]
        if all(d is None for d in dims):
            outs = _MemberDerivative.apply(derivative, *seeds)
            return outs, (None,) * len(outs)
        if _level() in derivative.folded:  # the forward folded this level: fold alike
            return vmap_by_folding(_MemberDerivative, info, in_dims, derivative, seeds)
        # a level the forward did not fold: each slice on its own, through the levels below
        slices = [_MemberDerivative.apply(derivative, *(
            t if d is None else t.select(d, v) for t, d in zip(seeds, dims)))
            for v in range(info.batch_size)]
        return tuple(torch.stack(outs) for outs in zip(*slices)), (0,) * len(slices[0])
