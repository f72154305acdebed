"""``conic(A, b, c, cones)``: a cone program's solution as a differentiable torch function.

Solves ``min ½ xᵀPx + cᵀx  s.t.  A x + s = b,  s ∈ K`` with SCS
(:func:`~torchdiffopt.solvers.scs_conic.solve_scs_conic`) or Clarabel
(:func:`~torchdiffopt.solvers.clarabel_conic.solve_clarabel_conic`, same conventions) and
differentiates the solution through the conic backend (:class:`~torchdiffopt.backends.conic.ConicDerivative`): backward
is its vector-Jacobian product (the exact adjoint), ``jvp`` its Jacobian-vector product, so
``torch.autograd.gradcheck(..., check_forward_ad=True)`` and ``torch.func.jvp`` work. A drop-in
for diffcp's ``solve_and_derivative`` / cvxpylayers on raw data, in SCS's conventions:
``y`` is SCS's dual (the shadow price of row ``i`` is ``∂f*/∂b_i = -y_i``), and PSD cones
are in :func:`~torchdiffopt.backends.cones.svec` form (build ``b`` or ``A`` from symmetric
matrices with :func:`~torchdiffopt.backends.cones.svec`, which is differentiable).
"""

from __future__ import annotations

import numpy as np
import torch

from .backends.conic import ConicDerivative
from .backends.cones import ConeDims
from .solvers import conic_solver

_F64 = torch.float64
_NAMES = ("A", "b", "c", "P")
_NDIM = {"A": 2, "b": 1, "c": 1, "P": 2}  # unbatched number of dimensions


class _Call:
    """One call of :class:`ConicSolve`: fixed settings in, the factorized derivatives out."""

    def __init__(self, dims: ConeDims, batched: dict, refine: bool, solve, solver_options: dict):
        self.dims, self.batched = dims, batched
        self.refine, self.solve, self.solver_options = refine, solve, solver_options
        self.members: list[ConicDerivative] = []


def _member(t, b: int, batched: bool):
    return None if t is None else (t[b] if batched else t)


def _numpy(t):
    if t is None:
        return None
    if torch._C._functorch.is_functorch_wrapped_tensor(t):
        raise NotImplementedError(
            "conic() does not support torch.func transforms yet (its solves run in numpy): "
            "use backward() and forward-mode AD (torch.autograd.forward_ad, gradcheck)")
    return t.detach().to("cpu", _F64).numpy()


class ConicSolve(torch.autograd.Function):
    """``(A, b, c, P) ↦ (x, y, s)`` for a batch ``B`` (leading dimension of the outputs);
    inputs flagged unbatched in the call broadcast over it. ``P`` may be None."""

    @staticmethod
    def forward(call: _Call, A, b, c, P):
        B = next((t.shape[0] for name, t in zip(_NAMES, (A, b, c, P))
                  if t is not None and call.batched[name]), 1)
        like = c
        outs = ([], [], [])
        for j in range(B):
            Aj, bj, cj, Pj = (_numpy(_member(t, j, call.batched[name]))
                              for name, t in zip(_NAMES, (A, b, c, P)))
            try:
                sol = call.solve(Aj, bj, cj, call.dims, Pj, **call.solver_options)
            except Exception as err:
                raise type(err)(f"batch member {j}: {err}" if B > 1 else str(err)) from err
            deriv = ConicDerivative(Aj, bj, cj, call.dims, sol.x, sol.y, sol.s, Pj,
                                    refine=call.refine)
            call.members.append(deriv)
            for out, value in zip(outs, (deriv.x, deriv.y, deriv.s)):
                out.append(torch.as_tensor(value, dtype=like.dtype, device=like.device))
        return tuple(torch.stack(o) for o in outs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        call, *tensors = inputs
        ctx.call = call
        ctx.meta = [None if t is None else (t.shape, t.dtype, t.device) for t in tensors]
        ctx.set_materialize_grads(True)

    @staticmethod
    def backward(ctx, x_bar, y_bar, s_bar):
        call = ctx.call
        xb, yb, sb = (_numpy(t) for t in (x_bar, y_bar, s_bar))
        grads = {name: [] for name in _NAMES}
        for j, deriv in enumerate(call.members):
            cot = deriv.vjp(xb[j], yb[j], sb[j])
            for name, g in zip(_NAMES, cot):
                grads[name].append(g)
        out = [None]
        for name, meta, needs in zip(_NAMES, ctx.meta, ctx.needs_input_grad[1:]):
            if meta is None or not needs:
                out.append(None)
                continue
            g = np.stack(grads[name])
            g = g if call.batched[name] else g.sum(axis=0)  # broadcast input: sum
            shape, dtype, device = meta
            out.append(torch.as_tensor(g, dtype=dtype, device=device).reshape(shape))
        return tuple(out)

    @staticmethod
    def jvp(ctx, _call_tangent, dA, db, dc, dP):
        call = ctx.call
        tangents = dict(zip(_NAMES, (dA, db, dc, dP)))
        like = next(t for t in (dA, db, dc, dP) if t is not None)
        outs = ([], [], [])
        for j, deriv in enumerate(call.members):
            args = {name: _numpy(_member(t, j, call.batched[name]))
                    for name, t in tangents.items()}
            for out, value in zip(outs, deriv.jvp(args["A"], args["b"], args["c"],
                                                   args["P"] if deriv.has_P else None)):
                out.append(torch.as_tensor(value, dtype=like.dtype, device=like.device))
        return tuple(torch.stack(o) for o in outs)


def conic(A, b, c, cones, *, P=None, return_duals: bool = False, refine: bool = True,
          solver: str = "scs", solver_options: dict | None = None):
    """Solve and differentiate ``min ½ xᵀPx + cᵀx  s.t.  A x + s = b,  s ∈ K``.

    ``A (m, n)``, ``b (m,)``, ``c (n,)`` and optionally ``P (n, n)`` (symmetric positive
    semidefinite; LPs and QPs are cone programs too) are torch tensors, each with or without
    one leading batch dimension; unbatched ones broadcast over the batch and their gradient
    is the sum over it. ``cones`` is SCS's dictionary, rows in this order:
    ``{"z": int, "l": int, "q": [sizes], "s": [orders], "ep": int, "ed": int, "p": [α]}``
    (see :mod:`torchdiffopt.backends.cones`; PSD rows in ``svec`` form).

    Returns ``x (B, n)`` (``(n,)`` if no input is batched) and, with ``return_duals=True``,
    ``(x, y, s)``: SCS's dual ``y ∈ K*`` (``P x + Aᵀy + c = 0``, shadow prices
    ``∂f*/∂b = -y``) and slack ``s = b - A x ∈ K``. Outputs follow the dtype and device of
    ``c``; solving and differentiating run in float64 on the CPU, member by member.

    ``solver`` is ``"scs"`` (or ``"auto"``) or ``"clarabel"`` (an optional dependency; its
    answer is translated to SCS's conventions). ``refine`` polishes the solver's point by
    Newton steps on the optimality conditions before differentiating (the returned solution
    is the refined one; Clarabel's interior point needs it as much as SCS's point).
    ``solver_options`` go to the solver (e.g. ``{"max_iters": …}`` for SCS,
    ``{"max_iter": …}`` for Clarabel). Raises the solver's named errors (InfeasibleError,
    UnboundedError, SolverError, NonconvexError), prefixed with the failing batch member;
    warns with DegenerateSolutionWarning at degenerate solutions (see
    :mod:`torchdiffopt.backends.conic`).
    """
    dims = ConeDims.from_dict(cones)
    tensors = dict(zip(_NAMES, (A, b, c, P)))
    for name, t in tensors.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch tensor, got {type(t).__name__}")
    batched = {name: t is not None and t.dim() == _NDIM[name] + 1
               for name, t in tensors.items()}
    sizes = {name: t.shape[0] for name, t in tensors.items() if batched[name]}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"batch size mismatch among the inputs: {sizes}")
    m, n = A.shape[-2:]
    expected = {"A": (m, n), "b": (m,), "c": (n,), "P": (n, n)}
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dim() not in (_NDIM[name], _NDIM[name] + 1) or tuple(t.shape[-_NDIM[name]:]) \
                != expected[name]:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {expected[name]} "
                             "with an optional leading batch dimension")
        if not torch.isfinite(t.detach()).all():
            raise ValueError(f"input {name!r} contains NaN or inf")
    if dims.size != m:
        raise ValueError(f"the cones have {dims.size} rows but A has {m}")
    call = _Call(dims, batched, refine, conic_solver(solver), dict(solver_options or {}))
    x, y, s = ConicSolve.apply(call, A, b, c, P)
    if not sizes:
        x, y, s = x[0], y[0], s[0]
    return (x, y, s) if return_duals else x
