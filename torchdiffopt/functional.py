"""Functions of raw (batched) problem data: no model, the same solvers and backends.

``qp(P, q, A, b, G, h)`` is a drop-in for qpth's ``QPFunction()(Q, p, G, h, A, b)`` — note
the argument order, which follows the problem's statement below — that also accepts LPs
(``P`` zero or positive semidefinite), returns multipliers on request, and sums (not
averages) the gradients of inputs broadcast over the batch.

``conic(A, b, c, cones)`` (:mod:`torchdiffopt.conic_function`) solves and differentiates a
cone program in SCS's form, a drop-in for diffcp / cvxpylayers on raw data.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .conic_function import conic
from .errors import InfeasibleError
from .folding import reject_nested_derivatives
from .qp_function import QPSolve, QPStructure, SolveCall, failure_error

_F64 = torch.float64


def qp(P, q, A=None, b=None, G=None, h=None, *, lb=None, ub=None, solver=None,
       n_jobs=None, on_failure="raise", return_duals=False):
    """Solve and differentiate ``min ½ xᵀPx + qᵀx  s.t.  A x = b,  G x ≤ h  (, lb ≤ x ≤ ub)``.

    Each tensor may carry one leading batch dimension (``P (B, n, n)`` or ``(n, n)``, …);
    unbatched ones broadcast. ``A, b`` or ``G, h`` may be None. ``lb``, ``ub`` are constant
    arrays (not differentiated), ``-inf`` / ``+inf`` where a variable has no bound; one that
    no ``x`` meets (a lower bound of ``+inf``, an upper bound of ``-inf``) raises
    InfeasibleError whatever ``on_failure``, since every member shares it. Returns
    ``x (B, n)`` and, with ``return_duals=True``, ``(x, ν, λ)``: the Lagrange multipliers of
    ``A x = b`` and of ``G x ≤ h`` with the KKT stationarity ``P x + q + Aᵀν + Gᵀλ = 0`` and
    ``λ ≥ 0`` (OptNet's convention; the shadow prices are ``∂f*/∂b = -ν`` and
    ``∂f*/∂h = -λ``).
    """
    n = q.shape[-1]
    dtype, device = q.dtype, q.device
    empty = torch.zeros(0, n, dtype=dtype, device=device)
    A = empty if A is None else A
    b = torch.zeros(0, dtype=dtype, device=device) if b is None else b
    G = empty if G is None else G
    h = torch.zeros(0, dtype=dtype, device=device) if h is None else h
    batched = {"P": P.dim() == 3, "q": q.dim() == 2, "A": A.dim() == 3, "b": b.dim() == 2,
               "G": G.dim() == 3, "h": h.dim() == 2}
    sizes = {name: t.shape[0] for name, t in zip("P q A b G h".split(), (P, q, A, b, G, h))
             if batched[name]}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"batch size mismatch among the inputs: {sizes}")
    B = next(iter(sizes.values()), 1)
    n_eq, n_in = A.shape[-2], G.shape[-2]
    if P.shape[-2:] != (n, n) or A.shape[-1] != n or G.shape[-1] != n \
            or b.shape[-1] != n_eq or h.shape[-1] != n_in:
        raise ValueError(f"inconsistent shapes: P {tuple(P.shape)}, q {tuple(q.shape)}, "
                         f"A {tuple(A.shape)}, b {tuple(b.shape)}, G {tuple(G.shape)}, "
                         f"h {tuple(h.shape)}")
    bounds = tuple(None if v is None else tuple(np.broadcast_to(np.asarray(v, float), n))
                   for v in (lb, ub))
    for name, bound, impossible in (("lb", bounds[0], np.inf), ("ub", bounds[1], -np.inf)):
        if bound is not None and np.isnan(bound).any():
            raise ValueError(f"{name} contains NaN")
        if bound is not None and impossible in bound:
            raise InfeasibleError(f"{name} contains {impossible:+}, which no x meets (-inf is "
                                  "no lower bound, +inf no upper bound): every member is "
                                  "infeasible")
    structure = _dense_structure(n, n_eq, n_in, *bounds, solver, n_jobs)

    def batch(t, k):
        t = t.to(_F64).flatten(-k) if k else t.to(_F64)
        return t.expand(B, *t.shape[-1:]) if t.dim() == 1 else t

    blocks = [M if M.shape == (B, k, n) and M.dtype == _F64 else M.to(_F64).expand(B, k, n)
              for M, k in ((A, n_eq), (G, n_in)) if k or M.requires_grad]
    # one block is taken as it is (no copy: its tangents are the largest arrays of a
    # forward-mode call)
    C = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1) if blocks else \
        q.new_zeros(B, 0, n, dtype=_F64)
    c0 = -(batch(h, 0) if not n_eq else batch(b, 0) if not n_in else
           torch.cat((batch(b, 0), batch(h, 0)), dim=1))
    call = SolveCall(structure)
    reject_nested_derivatives()
    x, mu, _ = QPSolve.apply(call, batch(P, 2), batch(q, 0), q.new_zeros(B, dtype=_F64),
                             C.flatten(-2), c0)
    if call.errors:
        if "invalid_data" in call.status:
            _name_non_finite_input(P=P, q=q, A=A, b=b, G=G, h=h)
        if on_failure == "raise":
            raise failure_error(call.status, call.errors)
    squeeze = not any(batched.values())
    out = [x, mu[:, :n_eq], mu[:, n_eq:]] if return_duals else [x]
    out = [(o.squeeze(0) if squeeze else o).to(dtype) for o in out]
    return tuple(out) if return_duals else out[0]


def _name_non_finite_input(**inputs) -> None:
    """Raise a ValueError naming the first input with a NaN or inf entry, if any. (Tested
    only where the solve found a member with non-finite data, not before it: on W1's
    10-variable QPs at batch 1 the test took a tenth of the forward pass.) Inputs wrapped by
    a ``torch.func`` transform are skipped (under ``vmap`` their values are not concrete):
    their members keep the per-member ``invalid_data`` failure, raised or NaN by
    ``on_failure``."""
    for name, t in inputs.items():
        if not torch._C._functorch.is_functorch_wrapped_tensor(t) \
                and not bool(torch.isfinite(t.detach()).all()):
            raise ValueError(f"input {name!r} contains NaN or inf")


@functools.lru_cache(maxsize=64)
def _dense_structure(n, n_eq, n_in, lb, ub, solver, n_jobs) -> QPStructure:
    """The :class:`QPStructure` of dense ``P``, ``[A; G]`` (every entry stored, row-major),
    equality rows first, bounds ``lb``, ``ub`` (tuples, None: none). Kept per shape, solver
    and bounds (the structure is read-only): building it takes ~0.2 ms, about 5% of a
    10-variable QP's forward pass."""
    m = n_eq + n_in
    rows, cols = np.divmod(np.arange(n * n), n)
    c_rows, c_cols = np.divmod(np.arange(m * n), n)
    return QPStructure(
        n, m, rows, cols, c_rows, c_cols,
        np.concatenate((np.zeros(n_eq, np.int8), np.full(n_in, -1, np.int8))),
        np.full(n, -np.inf) if lb is None else np.array(lb),
        np.full(n, np.inf) if ub is None else np.array(ub),
        solver, n_jobs)


__all__ = ["conic", "qp"]
