"""The differentiable map from parameters to a local NLP solution, for a batch: ``NLPSolve``.

``NLPSolve.apply(call, *theta) → (x*, μ*, f*)`` takes the model's parameter tensors (each
with a leading batch dimension ``B``), solves every member with the nonlinear pipeline
(:mod:`torchdiffopt.pipelines`) and differentiates through each member's factorized KKT
system (:mod:`torchdiffopt.backends.nonlinear`): ``backward`` is one adjoint solve and one
reverse pass per member, ``jvp`` one solve per member and direction. Members are solved one
after the other (a local NLP solve is inherently per instance); ``vmap`` folds a vmapped
dimension into the batch.

The conic backend's layer does not come here: its data are evaluated once for the batch
and differentiated by :class:`~torchdiffopt.conic_function.ConicSolve`.
"""

from __future__ import annotations

import numpy as np
import torch

from .pipelines import NonlinearPipeline
from .folding import (PositionalFunction, accepts_batched_grads, derivative_under_transforms,
                      guards_second_derivatives, needs_plain_seeds, seed_batch, vmap_by_folding)
from .solvers.batch import record_outcomes, solve_each

_F64 = torch.float64


class NLPCall:
    """One call: the nonlinear pipeline, and the side channel from ``forward`` to
    ``setup_context``."""

    def __init__(self, pipeline: NonlinearPipeline):
        self.pipeline = pipeline
        self.solved: list = []
        self.status: list[str] = []
        self.errors: dict[int, Exception] = {}


def _solve_members(call: NLPCall, theta: tuple):
    pipeline = call.pipeline
    B = theta[0].shape[0] if theta else 1
    n, m = pipeline.form.n, pipeline.form.m
    x, mu, f = (torch.full(shape, torch.nan, dtype=_F64) for shape in ((B, n), (B, m), (B,)))
    call.status, call.errors = ["optimal"] * B, {}
    members = [tuple(t[b].detach().cpu().to(_F64) for t in theta) for b in range(B)]
    todo = []
    for b, member in enumerate(members):
        if all(torch.isfinite(t).all() for t in member):
            todo.append(b)
        else:
            call.status[b] = "invalid_data"
            call.errors[b] = ValueError("the parameters contain NaN or inf")
    # one at a time: the pipeline warm-starts each solve from the previous solution
    outcomes = solve_each(todo, lambda b: pipeline.solve(members[b]), n_jobs=1)
    call.solved = record_outcomes(todo, outcomes, B, call.status, call.errors)
    for b, solved in enumerate(call.solved):
        if solved is not None:
            x[b], mu[b], f[b] = (torch.as_tensor(solved.x), torch.as_tensor(solved.mu),
                                 solved.objective)
    device = theta[0].device if theta else torch.device("cpu")
    return x.to(device), mu.to(device), f.to(device)


class NLPSolve(PositionalFunction):
    """``θ ↦ (x*, μ*, f*)`` for a batch of NLPs (internal minimization, float64)."""

    @staticmethod
    def forward(call, *theta):
        with torch.no_grad():
            return _solve_members(call, theta)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.call = inputs[0]
        ctx.like = [t.detach() for t in inputs[1:]]
        ctx.inputs = inputs[1:]
        ctx.folded = getattr(ctx.call, "folded_levels", frozenset())
        ctx.set_materialize_grads(True)

    # the members' derivatives run in numpy: under torch.func transforms they take plain
    # seeds, folded or one slice at a time (folding.derivative_under_transforms)
    @staticmethod
    @accepts_batched_grads
    @guards_second_derivatives(lambda ctx, seeds: ctx.inputs)
    def backward(ctx, x_bar, mu_bar, f_bar):
        seeds = (x_bar, mu_bar, f_bar)
        members = len(ctx.call.solved)
        if needs_plain_seeds(members, seeds, numpy_solves=True):
            return (None, *derivative_under_transforms(
                lambda *s: NLPSolve._vjp(ctx, *s), ctx.folded, members, ctx.like, *seeds))
        return (None, *NLPSolve._vjp(ctx, *seeds))

    @staticmethod
    def _vjp(ctx, x_bar, mu_bar, f_bar):
        call, like = ctx.call, ctx.like
        B = len(call.solved)
        assert x_bar.shape[0] == B, "seeds for every member"
        grads = [x_bar.new_zeros(B, *t.shape[1:], dtype=t.dtype) for t in like]
        xb, mb, fb = (t.detach().cpu().numpy() for t in (x_bar, mu_bar, f_bar))
        for b, solved in enumerate(call.solved):
            if solved is None:
                continue
            member_grads, _ = call.pipeline.reverse(solved, xb[b], mb[b], float(fb[b]))
            for g, mg in zip(grads, member_grads):
                g[b] = mg.to(g.device, g.dtype)
        return tuple(grads)

    @staticmethod
    def jvp(ctx, _call_tangent, *directions):
        members = len(ctx.call.solved)
        B = seed_batch(*directions) or members
        directions = [t.new_zeros(B, *t.shape[1:]) if d is None else d
                      for t, d in zip(ctx.like, directions)]
        if needs_plain_seeds(members, directions, numpy_solves=True):
            return derivative_under_transforms(
                lambda *d: NLPSolve._jvp(ctx, *d), ctx.folded, members, ctx.like,
                *directions)
        return NLPSolve._jvp(ctx, *directions)

    @staticmethod
    def _jvp(ctx, *directions):
        call, like = ctx.call, ctx.like
        B = len(call.solved)
        n, m = call.pipeline.form.n, call.pipeline.form.m
        dx, dmu, df = np.zeros((B, n)), np.zeros((B, m)), np.zeros(B)
        for b, solved in enumerate(call.solved):
            if solved is None:
                continue
            member = tuple(d[b].detach().cpu().to(_F64) for d in directions)
            dx[b], dmu[b], df[b] = call.pipeline.forward(solved, member, [], [])
        device = like[0].device if like else torch.device("cpu")
        return tuple(torch.as_tensor(a, dtype=_F64, device=device) for a in (dx, dmu, df))

    @staticmethod
    def vmap(info, in_dims, call, *theta):
        return vmap_by_folding(NLPSolve, info, in_dims, call, theta)
