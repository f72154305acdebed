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
broadcast every slice against all of them). The solution maps recognise such seeds by
their batch, smaller than the factorization's, and route the derivative through
:func:`derivative_under_transforms`: an autograd function of its own whose ``vmap`` rule, at
each level the forward folded (recorded on the call object by :func:`vmap_by_folding`),
folds the seeds the same way, so slice ``v`` meets members ``v·B … v·B + B − 1``. At a level
the forward did not fold (the vmap of ``jacrev`` in ``vmap(jacrev(f))``) the slices are taken
one at a time, so that the folded level below meets each. Seeds with the factorization's
batch (``jacrev(f)``, ``jacfwd(f)``, ``jacrev(vmap(f))``: many seeds against one solve, or a
vmap over ``autograd.grad`` after the forward's vmap has ended) are handled by the
derivative's own torch operations, vmapped as they are; their solves with a factorization
go through :func:`solve_columns`, which folds each vmap into the columns.
"""

from __future__ import annotations

import functools

import torch
from torch._functorch.utils import unwrap_dead_wrappers


class PositionalFunction(torch.autograd.Function):
    """A ``torch.autograd.Function`` whose ``forward`` takes positional arguments without
    defaults. Outside ``torch.func`` transforms its ``apply`` skips what
    ``torch.autograd.Function.apply`` does first on every call of a function with a
    ``setup_context``: binding the arguments to ``forward``'s signature through
    ``inspect.signature`` to fill in defaults, which ``forward`` has none of (42 µs of the
    52 µs an ``apply`` of six arguments takes; a 10-variable QP's forward and backward take
    1.2 ms). Under the transforms, which need the bound arguments, it is torch's own."""

    @classmethod
    def apply(cls, *args):
        if torch._C._are_functorch_transforms_active():
            return super().apply(*args)
        # torch.autograd.Function.apply's own path without transforms, less the binding
        return super(torch.autograd.Function, cls).apply(*unwrap_dead_wrappers(args))


def reject_nested_derivatives() -> None:
    """Raise NotImplementedError under two or more nested differentiating ``torch.func``
    transforms (``hessian``, ``jacfwd(jacrev(…))``, ``grad(grad(…))``). The solution maps'
    ``backward`` and ``jvp`` use the factorization of the optimality conditions as a constant,
    which is exact to first order only: a second derivative through them would silently
    miss the terms where that factorization moves. ``vmap`` over one derivative is fine."""
    if torch._C._functorch.peek_interpreter_stack() is None:  # no transform: 0.1 against 3 µs
        return
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


def derivative_under_transforms(fn, folded_levels, members: int, inputs, *seeds):
    """``fn(*seeds)`` (a tuple of tensors, each leading with the batch dimension, as do the
    ``seeds``) for a derivative of a solution map under ``torch.func`` transforms, where the
    seeds' batch is not the ``members`` its factorizations hold: the seeds of one slice of
    vmaps the forward folded (at the levels ``folded_levels``, its call's
    ``folded_levels``); see the module docstring. ``inputs`` are the forward's tensor inputs
    as its autograd function saw them: one entry of each travels along as an anchor, so
    that every folded level's rule runs, also for seeds it does not batch (a fixed
    cotangent inside the vmap)."""
    anchors = [t.reshape(t.shape[0], -1)[:, :1] for t in inputs]
    derivative = _Derivative(fn, frozenset(folded_levels), members, len(anchors))
    return _MemberDerivative.apply(derivative, *anchors, *seeds)


def seed_batch(*seeds) -> int | None:
    """The (logical) batch of the first seed that is not None."""
    return next((t.shape[0] for t in seeds if t is not None), None)


def needs_plain_seeds(members: int, seeds, numpy_solves: bool = False) -> bool:
    """Whether a derivative must go through :func:`derivative_under_transforms`: its
    seeds' batch is not its ``members`` (one slice of a folded vmap), or its solves run in
    numpy (``numpy_solves``) and the seeds are under a ``torch.func`` transform."""
    return seed_batch(*seeds) != members or (numpy_solves and is_transformed(*seeds))


class _Derivative:
    """The derivative ``fn``, the vmap levels its solution map's forward folded and the
    number of members its factorizations hold."""

    def __init__(self, fn, folded: frozenset, members: int, n_anchors: int):
        self.fn, self.folded, self.members, self.n_anchors = fn, folded, members, n_anchors


class _MemberDerivative(PositionalFunction):
    """``apply(derivative, *anchors, *seeds) = derivative.fn(*seeds)``, with the ``vmap``
    rule of :func:`derivative_under_transforms`. Not differentiable itself: a derivative of
    it is a second derivative of the solution map."""

    @staticmethod
    def forward(derivative, *tensors):
        return tuple(derivative.fn(*tensors[derivative.n_anchors:]))

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
    def vmap(info, in_dims, derivative, *tensors):
        dims = in_dims[1:]
        seed, dim = tensors[derivative.n_anchors], dims[derivative.n_anchors]
        batch = seed.shape[1 if dim == 0 else 0]  # the seeds' logical batch
        # a level the forward folded, whose V slices of `batch` seeds make up (a fold of
        # a level above makes up) the members: fold alike. (Levels are stack depths: the
        # size test rejects an unrelated vmap at a folded level's depth, whose seeds span
        # every member.)
        if _level() in derivative.folded and \
                derivative.members % (info.batch_size * batch) == 0:
            return vmap_by_folding(_MemberDerivative, info, in_dims, derivative, tensors)
        # any other level: each slice on its own, through the levels below
        slices = [_MemberDerivative.apply(derivative, *(
            t if d is None else t.select(d, v) for t, d in zip(tensors, dims)))
            for v in range(info.batch_size)]
        return tuple(torch.stack(outs) for outs in zip(*slices)), (0,) * len(slices[0])


def accepts_batched_grads(backward):
    """``backward(ctx, *seeds)`` of a solution map, made to take the seeds of
    ``torch.autograd.grad(…, is_grads_batched=True)`` (and so of
    ``torch.autograd.functional.jacobian(…, vectorize=True)``).

    Those run the backward pass under torch's legacy vmap, whose batched tensors have no
    batching rule for views (``detach``, ``alias``) or numpy, which the derivatives use. The
    seeds batched there are unwrapped to their physical tensors (the grads' batch dimension
    first), the backward runs under ``torch.vmap`` over that dimension (the transform the
    derivatives support: the module docstring; the dense torch solves take the grads as
    columns of one solve, the numpy ones a slice at a time), and the cotangents are
    wrapped back at the legacy level. Under
    ``create_graph=True`` the backward runs a slice of the seeds at a time instead, so that
    the cotangents can be differentiated in the seeds. Other seeds pass straight through."""

    @functools.wraps(backward)
    def wrapped(ctx, *seeds):
        legacy = [s is not None and torch._C._functorch.is_legacy_batchedtensor(s)
                  for s in seeds]
        if not any(legacy):
            return backward(ctx, *seeds)
        level = _legacy_vmap_level()
        physical = [torch._remove_batch_dim(s, level, 1, 0) if batched else s
                    for s, batched in zip(seeds, legacy)]
        count = max(p.shape[0] for p, batched in zip(physical, legacy) if batched)
        # a seed the legacy vmap does not batch comes back with a dimension of one
        physical = [p.expand(count, *p.shape[1:]) if batched else p
                    for p, batched in zip(physical, legacy)]
        present = []

        def tensors_only(*s):
            outs = backward(ctx, *s)
            present[:] = [o is not None for o in outs]
            return tuple(o for o in outs if o is not None)
        if torch.is_grad_enabled():
            # create_graph: the cotangents get a graph of their own (to differentiate them
            # in the seeds), which the solves folded under torch.vmap do not record; a slice
            # of the seeds at a time
            slices = [tensors_only(*(p[v] if batched else p for p, batched in
                                     zip(physical, legacy))) for v in range(count)]
            cotangents = iter([torch.stack(c) for c in zip(*slices)])
        else:
            dims = tuple(0 if batched else None for batched in legacy)
            cotangents = iter(torch.vmap(tensors_only, in_dims=dims)(*physical))
        return tuple(torch._add_batch_dim(next(cotangents), 0, level) if here else None
                     for here in present)

    return wrapped


def guards_second_derivatives(moving_inputs):
    """A decorator of the ``backward(ctx, *seeds)`` of a solution map that refuses second
    derivatives under ``create_graph=True``; ``moving_inputs(ctx, seeds)`` names the inputs
    through which the map's Jacobian moves.

    The backward takes the solution and the factorization of the optimality conditions as
    constants, so its cotangents ``Jᵀw`` are exact functions of the seeds ``w`` (linear:
    their derivative in ``w`` is ``J``, the double-backward way to ``J u``) and of inputs
    the Jacobian does not depend on (``q`` and ``h`` of a QP: the solution is affine in them
    on an active set, and the Hessian-vector products of a loss of ``x*(q)`` are exact), but
    not of the moving ones. With grad mode on (``create_graph=True``) each cotangent gets
    zeros added that depend on the moving inputs and whose backward raises
    NotImplementedError, so ``torch.autograd.functional.hessian`` or a gradient penalty says
    so instead of returning a second derivative without its curvature term. A pass that asks
    for no derivative in those inputs never runs them. (Under ``torch.func`` transforms,
    nested derivatives are refused when the map is called: :func:`reject_nested_derivatives`.)
    """

    def decorate(backward):
        @functools.wraps(backward)
        def wrapped(ctx, *seeds):
            grads = backward(ctx, *seeds)
            if not torch.is_grad_enabled() or _under_transforms():
                return grads
            anchors = [t for t in moving_inputs(ctx, seeds) if t.requires_grad and t.numel()]
            if not anchors:
                return grads
            return tuple(g if g is None else
                         g + _SecondDerivativeGuard.apply(g.detach(), *anchors) for g in grads)

        return wrapped

    return decorate


def _under_transforms() -> bool:
    """Whether a ``torch.func`` transform is running."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def envelope_point(*solution: torch.Tensor) -> tuple:
    """The solution, as the point at which the Lagrangian gives the optimal value: a
    constant to first order (the Lagrangian is stationary in the point there: the envelope
    theorem), so the values come detached. Where a graph is being recorded they come
    through :class:`_EnvelopePoint` instead, whose derivative is zero to first order and,
    under ``create_graph=True``, raises when taken further: the optimal value's second
    derivative needs how the point moves, which the layers do not compute."""
    if (not torch.is_grad_enabled() or _under_transforms()
            or not any(t.requires_grad for t in solution)):
        return tuple(t.detach() for t in solution)
    return _EnvelopePoint.apply(*solution)


class _EnvelopePoint(PositionalFunction):
    """:func:`envelope_point` where a graph is recorded."""

    @staticmethod
    def forward(*solution):
        return tuple(t.detach().clone() for t in solution)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.anchors = [t for t in inputs if t.requires_grad]

    @staticmethod
    def backward(ctx, *grads):
        if not torch.is_grad_enabled():
            return (None,) * len(grads)
        return tuple(_SecondDerivativeGuard.apply(g.detach(), *ctx.anchors) for g in grads)

    @staticmethod
    def jvp(ctx, *tangents):
        return tuple(torch.zeros_like(t) for t in tangents)


class _SecondDerivativeGuard(PositionalFunction):
    """``zeros_like(like)``, as a function of ``anchors`` whose backward raises
    (:func:`guards_second_derivatives`)."""

    @staticmethod
    def forward(like, *anchors):
        return torch.zeros_like(like)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError(
            "second derivatives of an optimization layer (create_graph=True, then a "
            "derivative of its gradient in the layer's inputs, as in "
            "torch.autograd.functional.hessian) are not supported: its derivatives are "
            "exact to first order only; derivatives of the gradient in the seeds (grad_outputs) "
            "are supported")


def _legacy_vmap_level() -> int:
    """The level of the innermost legacy vmap (``torch._vmap_internals``) running now:
    its nesting counter, read by a step up and back."""
    level = torch._C._vmapmode_increment_nesting()
    torch._C._vmapmode_decrement_nesting()
    return level - 1


def solve_columns(solve, rhs: torch.Tensor) -> torch.Tensor:
    """``solve(rhs)`` for a ``solve`` that acts on each column of ``rhs (*batch, N, k)``
    alone (``K⁻¹ rhs`` by a factorization), with each ``vmap`` around it folded into the
    columns: ``(V, *batch, N, k) → (*batch, N, k·V)``, one solve, unfolded. The batching rules
    of the factorizations' solves (``lu_solve``, ``solve_triangular``, ``cholesky_solve``)
    would instead expand the factors, which are not vmapped, over the vmapped dimension:
    W6's 50 directions on 32 systems of order 80 took 5.6 ms in ``lu_solve`` that way, and
    an expanded inverse 30 ms in the copy alone. Outside ``vmap`` it is ``solve(rhs)``."""
    if not torch._C._functorch.is_functorch_wrapped_tensor(rhs):
        return solve(rhs)
    return _ColumnSolve.apply(solve, rhs)


class _ColumnSolve(PositionalFunction):
    """``apply(solve, rhs) = solve(rhs)`` with the ``vmap`` rule of :func:`solve_columns`.
    Not differentiable itself: a derivative of it is a second derivative of a solution
    map."""

    @staticmethod
    def forward(solve, rhs):
        return solve(rhs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError(_SECOND_DERIVATIVES)

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(_SECOND_DERIVATIVES)

    @staticmethod
    def vmap(info, in_dims, solve, rhs):
        dim = in_dims[1]
        if dim is None:
            return _ColumnSolve.apply(solve, rhs), None
        folded = rhs.movedim(dim, -1)  # (*batch, N, k, V)
        z = _ColumnSolve.apply(solve, folded.reshape(*folded.shape[:-2], -1))
        return z.reshape(folded.shape), folded.dim() - 1
