"""Cone programs as differentiable torch functions, for a batch: ``ConicSolve`` and ``conic()``.

``ConicSolve.apply(call, P_vals, c, A_vals, b, margins) → (x, y, s)`` takes ``B`` cone programs
``min ½ xᵀPx + cᵀx  s.t.  A x + s = b,  s ∈ K`` that share their sizes, cones and the sparsity
patterns of ``A`` and ``P`` (:class:`~torchdiffopt.backends.batched_conic.ConicPattern`):
the stored entries are value tensors with a leading batch dimension. It solves every member
with SCS (:func:`~torchdiffopt.solvers.scs_conic.solve_scs_conic`) or Clarabel
(:func:`~torchdiffopt.solvers.clarabel_conic.solve_clarabel_conic`, same conventions) in a
thread pool (both release the GIL while they iterate), or the whole batch in one call of the
torch interior point (:func:`~torchdiffopt.solvers.conic_ipm.solve_conic_ipm`, for
``solver="ipm"``; members it gives up on go to SCS), refines the points by Newton steps on
the residual map of :mod:`~torchdiffopt.backends.conic` (batched,
:func:`~torchdiffopt.backends.batched_conic.refine_dense`), and differentiates the
batch with respect to the data through
:class:`~torchdiffopt.backends.batched_conic.BatchedConicDerivative`: one batched dense LU of
the residual-map Jacobians for ``n + m`` up to ``DENSE_MAX_ORDER`` (then ``backward``,
``jvp``, ``vmap``, ``jacrev``, ``jacfwd`` are torch operations), one sparse factorization per
member above. Conventions are SCS's: ``y ∈ K*`` is its dual (``P x + Aᵀy + c = 0``; the shadow
price of row ``i`` is ``∂f*/∂b_i = -y_i``), ``s = b - A x ∈ K``, PSD cones in
:func:`~torchdiffopt.backends.cones.svec` form.

Each member's outcome is recorded (``call.status``, ``call.errors``): failed members give NaN
rows and zero derivatives, the others are unaffected. ``margins`` (``(B, k)``, ``k`` may be
0) are quantities a member's data must keep nonnegative to be the program meant (the norm
atoms' epigraph of :mod:`torchdiffopt.compile.conic`); a member with a negative one is not
solved (status ``"nonconvex"``).

The :class:`~torchdiffopt.Layer` (conic backend) and :func:`conic` are thin clients.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from .backends.batched_conic import (BatchedConicDerivative, ConicPattern, SparseSystems,
                                     warn_singular,
                                     refine_dense)
from .backends.conic import ConicDerivative
from .backends.cones import ConeDims, kinks_rows, project_rows
from .errors import NonconvexError, warn_degenerate
from .linalg.factorization import DENSE_MAX_ORDER
from .linalg.threads import take_last
from .folding import (PositionalFunction, accepts_batched_grads, derivative_under_transforms,
                      guards_second_derivatives, needs_plain_seeds, reject_nested_derivatives,
                      seed_batch, vmap_by_folding)
from .qp_function import _positive_definite
from .solvers import (BATCHED_CONIC_SOLVERS, SEQUENCED_CONIC_SOLVERS, conic_solver,
                      solve_scs_conic)
from .solvers.batch import record_outcomes, solve_each, status_of
from .solvers.cone_program import ACCEPT_RESIDUAL, ConicSolution, inaccuracy, residual_rows
from .solvers.conic_ipm import solve_ipm_conic, supports
from .solvers.ipm import OPTIMAL, status_error

_F64 = torch.float64
_NDIM = {"A": 2, "b": 1, "c": 1, "P": 2}  # unbatched number of dimensions


class ConicStructure:
    """The fixed part of a batch of cone programs: the pattern, the cones, how to solve
    (``solve``, a conic adapter, with ``solver_options``; ``refine``; ``n_jobs`` threads) and
    ``nonconvex_error`` (one member's margins → the error to report, or None)."""

    def __init__(self, pattern: ConicPattern, cones, solve, solver_options=None,
                 refine: bool = True, n_jobs: int | None = None, nonconvex_error=None):
        self.pattern, self.dims = pattern, ConeDims.from_dict(cones)
        self.solve, self.solver_options = solve, dict(solver_options or {})
        self.refine, self.n_jobs, self.nonconvex_error = refine, n_jobs, nonconvex_error
        if solve is solve_ipm_conic:
            _check_ipm(self)


def _check_ipm(st: ConicStructure) -> None:
    """The conic interior point takes zero, nonnegative and second-order cones, programs
    held densely, and the options ``tol`` and ``max_iter``: anything else is refused when
    the layer is built, not member by member."""
    if not supports(st.dims):
        raise ValueError("solver='ipm' takes zero, nonnegative and second-order cones only; "
                         "use 'scs' or 'clarabel' for PSD, exponential and power cones")
    if not st.pattern.dense:
        raise ValueError(f"solver='ipm' holds the programs densely (n + m up to "
                         f"{DENSE_MAX_ORDER}, here {st.pattern.n + st.pattern.m}); use 'scs' "
                         "or 'clarabel'")
    unknown = set(st.solver_options) - {"tol", "max_iter"}
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for solver='ipm' (it takes "
                         "'tol' and 'max_iter')")


#: the batched interior point's stopping tolerance where Newton refinement follows (the
#: default): SCS's ``eps`` here. The refinement takes the point to ~1e-15 either way (W4:
#: solutions within 3e-15 of the reference at 1e-9 and at 1e-10), and the last decade costs
#: 7-9 % of the forward time.
IPM_TOL_BEFORE_REFINEMENT = 1e-9


class ConicCall:
    """One call of :class:`ConicSolve`: its structure, and the side channel through which
    ``forward`` hands the derivative and per-member statuses on."""

    def __init__(self, structure: ConicStructure):
        self.structure = structure
        self.derivative: BatchedConicDerivative | None = None
        self.status: list[str] = []
        self.errors: dict[int, Exception] = {}


@dataclass
class _Member:
    """One solved member: its point and kinks (once refined), on the sparse path its
    factorized :class:`ConicDerivative`, on the dense path the solver's answer."""

    x: np.ndarray
    y: np.ndarray
    s: np.ndarray
    kinks: list | None = None
    derivative: ConicDerivative | None = None
    solution: ConicSolution | None = None  # the solver's answer, on the dense path


def _solve_member(st: ConicStructure, P_vals, c, A_vals, b, solve) -> _Member:
    """One member with ``solve(A, b, c, P)`` (:func:`_member_solver`)."""
    pt = st.pattern
    A = pt.csc(A_vals, "A")
    P = pt.csc(P_vals, "P") if len(pt.P_rows) else None
    sol = solve(A, b, c, P)
    if pt.dense:
        return _Member(sol.x, sol.y, sol.s, solution=sol)
    d = ConicDerivative(A, b, c, st.dims, sol.x, sol.y, sol.s, P, refine=st.refine,
                        dense=False, warn=False)
    return _Member(d.x, d.y, d.s, d.kinks, derivative=d)


def _member_solver(st: ConicStructure, local: threading.local):
    """The structure's adapter with its options as ``solve(A, b, c, P)``, for the calling
    thread: where the adapter has a sequenced form (:data:`SEQUENCED_CONIC_SOLVERS`; the
    members share cones and patterns), one per thread, kept in ``local``. Points of programs
    held densely come unchecked (:func:`_check_together` checks them at once)."""
    options = dict(st.solver_options)
    accept = options.pop("accept", ACCEPT_RESIDUAL)
    if st.pattern.dense:
        accept = None
    sequenced = SEQUENCED_CONIC_SOLVERS.get(st.solve)
    if sequenced is None:
        return lambda A, b, c, P: st.solve(A, b, c, st.dims, P, accept=accept, **options)
    if not hasattr(local, "sequence"):
        local.sequence = sequenced(st.dims, **options)
    return lambda A, b, c, P: local.sequence.solve(A, b, c, P, accept=accept)


def _symmetric_P(pt: ConicPattern, P_vals: torch.Tensor):
    """The members' dense ``½(P + Pᵀ)`` from their entries ``(k, nnz_P)``, and which are
    convex (``P ⪰ 0`` to rounding, by one batched Cholesky: :func:`_positive_definite`)."""
    P = pt.dense_matrix(P_vals, "P_rows", "P_cols", (pt.n, pt.n))
    P = 0.5 * (P + P.mT)
    convex = _positive_definite(P, shift=1e-9) if len(pt.P_rows) else \
        torch.ones(len(P), dtype=torch.bool, device=P.device)
    return P, convex


def _indefinite() -> NonconvexError:
    """The error of a member whose ``P`` is indefinite."""
    return NonconvexError("nonconvex objective: the quadratic form is indefinite")


def _sequence_takes_entries(st: ConicStructure) -> bool:
    """Whether the structure's adapter has a sequenced form that takes the members' entries
    (:meth:`~torchdiffopt.solvers.clarabel_conic.ClarabelSequence.solve_entries`)."""
    sequenced = SEQUENCED_CONIC_SOLVERS.get(st.solve)
    return sequenced is not None and sequenced.takes_entries(st.dims)


#: members per run of :func:`_solve_in_sequences`: small runs let a thread slowed down take
#: fewer (W4, 64 members in two threads: runs of 4 against two runs of 32 saved 1–1.5 ms of
#: the 17–19 ms its solves took)
SEQUENCE_RUN = 4


def _solve_in_sequences(st: ConicStructure, todo: list, P_vals, c, A_vals, b) -> list:
    """The members ``todo`` (data: the batch's numpy arrays, finite) by the sequenced
    adapter, in runs of :data:`SEQUENCE_RUN` members that ``n_jobs`` threads take as they
    come free, one sequence per thread: a :class:`_Member` (unchecked:
    :func:`_check_together` follows) or the error naming its failure, per member. ``P``'s
    convexity is tested for the batch at once (a batched Cholesky, as the batched interior
    point's)."""
    pt, idx = st.pattern, np.asarray(todo)
    options = {k: v for k, v in st.solver_options.items() if k != "accept"}
    A, A_data = pt.csc_entries(A_vals[idx], "A")
    P = P_data = None
    convex = np.ones(len(idx), dtype=bool)
    if len(pt.P_rows):
        P, P_data = pt.csc_entries(P_vals[idx], "P_upper")
        convex = _symmetric_P(pt, torch.from_numpy(P_vals[idx]))[1].numpy()
    solvable = np.flatnonzero(convex)
    runs = [solvable[k:k + SEQUENCE_RUN] for k in range(0, len(solvable), SEQUENCE_RUN)]
    sequenced, local = SEQUENCED_CONIC_SOLVERS[st.solve], threading.local()

    def solve_run(run):
        if not hasattr(local, "sequence"):
            local.sequence = sequenced(st.dims, **options)
        return local.sequence.solve_entries(
            A, A_data[run], b[idx[run]], c[idx[run]], P, None if P_data is None else P_data[run])

    outcomes: list = [_indefinite() for _ in idx]
    for run, results in zip(runs, solve_each(runs, solve_run, st.n_jobs)):
        if isinstance(results, Exception):  # the run failed as a whole: each member with it
            results = [results] * len(run)
        for k, out in zip(run, results):
            outcomes[k] = out if isinstance(out, Exception) else \
                _Member(out.x, out.y, out.s, solution=out)
    return outcomes


def _check_together(st: ConicStructure, todo: list, outcomes: list, P_vals, c, A_vals, b):
    """The unchecked solver points among ``outcomes`` (of the members ``todo``; the data
    are the batch's numpy arrays) checked at once by their relative residuals
    (:func:`~torchdiffopt.solvers.cone_program.residual_rows`): a point above
    :data:`~torchdiffopt.solvers.cone_program.ACCEPT_RESIDUAL` becomes its SolverError."""
    solved = [k for k, out in enumerate(outcomes) if isinstance(out, _Member)]
    if not solved:
        return outcomes
    pt, idx = st.pattern, [todo[k] for k in solved]
    x, y, s = (np.stack([getattr(outcomes[k], name) for k in solved]) for name in "xys")
    # the products on the stored entries (O(nnz) per member, not O(m n))
    A = torch.from_numpy(A_vals[idx])
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    Ax = pt.matvec(A, "A_rows", "A_cols", xt, pt.m).numpy()
    Aty = pt.matvec(A, "A_cols", "A_rows", yt, pt.n).numpy()
    Px = np.zeros_like(x)
    if len(pt.P_rows):
        P = torch.from_numpy(P_vals[idx])
        Px = 0.5 * (pt.matvec(P, "P_rows", "P_cols", xt, pt.n)
                    + pt.matvec(P, "P_cols", "P_rows", xt, pt.n)).numpy()
    rows = residual_rows(Ax, Aty, Px, b[idx], c[idx], x, y, s, st.dims)
    out = list(outcomes)
    for i, k in enumerate(solved):
        sol = outcomes[k].solution
        sol.residuals = {name: float(v[i]) for name, v in rows.items()}
        error = inaccuracy(sol, st.solver_options.get("accept", ACCEPT_RESIDUAL))
        if error is not None:
            out[k] = error
    return out


def _solve_together(st: ConicStructure, solve_batch, todo: list, P_vals, c, A_vals, b):
    """The members ``todo`` solved by the batched solver in one call: a :class:`_Member` or
    the named error of its status, per member. An indefinite ``P`` is reported here (the
    batched solver assumes a convex objective)."""
    pt, idx = st.pattern, torch.as_tensor(todo, device=c.device)
    A = pt.dense_matrix(A_vals[idx].to(_F64), "A_rows", "A_cols", (pt.m, pt.n))
    P, convex = _symmetric_P(pt, P_vals[idx].to(_F64))
    options = dict(st.solver_options)
    if st.refine:
        options.setdefault("tol", IPM_TOL_BEFORE_REFINEMENT)
    res = solve_batch(P, c[idx].to(_F64), A, b[idx].to(_F64), st.dims, **options)
    x, y, s = (t.cpu().numpy() for t in (res.x, res.y, res.s))
    outcomes = []
    for k, code in enumerate(res.status.tolist()):
        if not bool(convex[k]):
            outcomes.append(_indefinite())
        elif code == OPTIMAL:
            outcomes.append(_Member(x[k], y[k], s[k]))
        else:
            outcomes.append(status_error(code, "the conic interior point")[1])
    return outcomes


def _solve_batch(call: ConicCall, P_vals, c, A_vals, b, margins):
    """Solve, refine and factorize every member; ``(x, y, s)`` with NaN rows for failed
    members; the derivative and statuses are left on ``call``."""
    st, pt = call.structure, call.structure.pattern
    B, device = c.shape[0], c.device
    arrays = [t.detach().cpu().to(_F64).numpy() for t in (P_vals, c, A_vals, b, margins)]
    status, errors, todo = ["optimal"] * B, {}, []
    finite = np.logical_and.reduce([np.isfinite(a.reshape(B, -1)).all(1) for a in arrays[:4]])
    # (an atom's sign is wrong only where a margin is negative: the rest are not asked)
    negative = (arrays[4].reshape(B, -1) < 0).any(1)
    for j in range(B):
        err = None if st.nonconvex_error is None or not negative[j] else \
            st.nonconvex_error(arrays[4][j])
        if not finite[j]:
            status[j], errors[j] = "invalid_data", ValueError("the problem data contain NaN or inf")
        elif err is not None:
            status[j], errors[j] = "nonconvex", err
        else:
            todo.append(j)
    solve_batch = BATCHED_CONIC_SOLVERS.get(st.solve)
    if solve_batch is not None and pt.dense and todo:
        outcomes = _solve_together(st, solve_batch, todo, P_vals, c, A_vals, b)
        # members the interior point gave up on (no certificate) get SCS
        retry = [k for k, out in enumerate(outcomes) if status_of(out) == "solver_error"]
        again = solve_each([todo[k] for k in retry], lambda j: _solve_member(
            st, *(a[j] for a in arrays[:4]),
            lambda A, b, c, P: solve_scs_conic(A, b, c, st.dims, P)), st.n_jobs)
        for k, out in zip(retry, again):
            outcomes[k] = out
    elif pt.dense and todo and _sequence_takes_entries(st):
        outcomes = _solve_in_sequences(st, todo, *arrays[:4])
        outcomes = _check_together(st, todo, outcomes, *arrays[:4])
    else:
        local = threading.local()
        outcomes = solve_each(todo, lambda j: _solve_member(
            st, *(a[j] for a in arrays[:4]), _member_solver(st, local)), st.n_jobs)
        if pt.dense:
            outcomes = _check_together(st, todo, outcomes, *arrays[:4])
    members: list[_Member | None] = record_outcomes(todo, outcomes, B, status, errors)
    valid = torch.tensor([mb is not None for mb in members], device=device)
    solved = [j for j, mb in enumerate(members) if mb is not None]
    if pt.dense:
        z = np.zeros((B, pt.n + pt.m))
        if solved:
            z[solved] = np.stack([np.concatenate((members[j].x, members[j].y - members[j].s))
                                  for j in solved])
        keep = valid.reshape(B, 1)
        data = (torch.where(keep, t.detach().to(_F64), 0.0) for t in (P_vals, c, A_vals, b))
        z, systems = refine_dense(pt, st.dims, z, *data, valid, st.refine)
        v = z[:, pt.n:]
        y = project_rows(v, st.dims, dual=True)
        x, s = z[:, :pt.n], y - v  # (failed members' rows become NaN below)
        kinked = kinks_rows(v, st.dims, dual=True)
        kinks = {j: kinked[j] for j in solved if kinked[j]}
    else:
        systems = SparseSystems([mb and mb.derivative for mb in members], device)
        x, y, s = (np.zeros((B, size)) for size in (pt.n, pt.m, pt.m))
        for j in solved:
            x[j], y[j], s[j] = members[j].x, members[j].y, members[j].s
        kinks = {j: members[j].kinks for j in solved if members[j].kinks}
    x, y, s = (torch.as_tensor(a, dtype=_F64, device=device) for a in (x, y, s))
    call.derivative = BatchedConicDerivative(pt, x, y, systems, valid)
    call.status, call.errors = status, errors
    _warn_degenerate(torch.nonzero(systems.singular).flatten().tolist(), kinks)
    nan = torch.tensor(torch.nan, dtype=_F64, device=device)
    keep = valid.reshape(B, 1)
    return tuple(torch.where(keep, t, nan) for t in (x, y, s))


def _warn_degenerate(singular: list, kinked: dict) -> None:
    if singular:
        warn_singular(singular)
    if kinked:
        shown = "; ".join(f"[{j}] {', '.join(k[:4])}" for j, k in list(kinked.items())[:5])
        warn_degenerate(
            f"strict complementarity fails at cones of batch members {shown} (slack and dual "
            "both on a nonsmooth part of the boundary): derivatives there are one-sided, "
            "taken on the side of the solver's point")


class ConicSolve(PositionalFunction):
    """``(P_vals, c, A_vals, b, margins) ↦ (x, y, s)`` for a batch (leading dimension ``B`` on
    every input and output), float64. ``backward`` is the vector-Jacobian product, ``jvp`` the
    Jacobian-vector product, ``vmap`` folds a vmapped dimension into the batch."""

    @staticmethod
    def forward(call, P_vals, c, A_vals, b, margins):
        with torch.no_grad():
            return _solve_batch(call, P_vals, c, A_vals, b, margins)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.derivative = inputs[0].derivative
        ctx.folded = getattr(inputs[0], "folded_levels", frozenset())
        ctx.inputs = inputs[1:]
        # the Jacobian moves with P and A, and with c and b through D = DΠ(v*) unless every
        # cone is polyhedral (D piecewise constant); margins enter no derivative
        P_vals, c, A_vals, b, _margins = inputs[1:]
        ctx.moving_inputs = ((P_vals, A_vals) if inputs[0].structure.dims.polyhedral
                             else (P_vals, c, A_vals, b))
        ctx.set_materialize_grads(True)

    @staticmethod
    @accepts_batched_grads
    @guards_second_derivatives(lambda ctx, seeds: ctx.moving_inputs)
    def backward(ctx, x_bar, y_bar, s_bar):
        d = ctx.derivative
        members = d.x.shape[0]
        if needs_plain_seeds(members, (x_bar, y_bar, s_bar), isinstance(d.systems, SparseSystems)):
            return (None, *derivative_under_transforms(d.vjp, ctx.folded, members, ctx.inputs,
                                                       x_bar, y_bar, s_bar), None)
        return (None, *d.vjp(x_bar, y_bar, s_bar), None)

    @staticmethod
    def jvp(ctx, _call_tangent, dP_vals, dc, dA_vals, db, _margins_tangent):
        d = ctx.derivative
        pt = d.pattern
        # the tangents' batch: under a folded vmap it is not the derivative's
        members = d.x.shape[0]
        B = seed_batch(dP_vals, dc, dA_vals, db) or members
        tangents = [d.x.new_zeros(B, size) if t is None else t for t, size in
                    ((dP_vals, len(pt.P_rows)), (dc, pt.n), (dA_vals, len(pt.A_rows)),
                     (db, pt.m))]

        def jvp(*tangents):
            return tuple(o.squeeze(1) for o in d.jvp(*(t.unsqueeze(1) for t in tangents)))
        if needs_plain_seeds(members, tangents, isinstance(d.systems, SparseSystems)):
            return derivative_under_transforms(jvp, ctx.folded, members, ctx.inputs, *tangents)
        return jvp(*tangents)

    @staticmethod
    def vmap(info, in_dims, call, *tensors):
        return vmap_by_folding(ConicSolve, info, in_dims, call, tensors)


def conic_lagrangian(pattern: ConicPattern, values, x, y) -> torch.Tensor:
    """``L = ½ xᵀPx + cᵀx + r + yᵀ(A x - b)`` for the data ``values = (P_vals, c, r, A_vals,
    b)`` (entries of ``pattern``; leading dimensions ``(B,)``, or ``(B, K)`` for ``K``
    tangents) at a point ``x``, ``y`` that broadcasts against them. At a solution
    (``A x + s = b``, ``yᵀs = 0``) ``L`` is the optimal value ``f*``; at the fixed (detached)
    solution its derivative in the data is the envelope theorem's ``∂f*/∂(P, c, r, A, b)``, and
    as ``L`` is linear in the data, ``L`` of a data tangent is ``df*``."""
    P_vals, c, r, A_vals, b = values
    dev = c.device
    Pi, Pj = pattern.idx("P_rows", dev), pattern.idx("P_cols", dev)
    Ai, Aj = pattern.idx("A_rows", dev), pattern.idx("A_cols", dev)
    return (r + (c * x).sum(-1) + 0.5 * (P_vals * take_last(x, Pi) * take_last(x, Pj)).sum(-1)
            + (A_vals * take_last(y, Ai) * take_last(x, Aj)).sum(-1) - (y * b).sum(-1))


def conic(A, b, c, cones, *, P=None, return_duals: bool = False, refine: bool = True,
          solver: str | None = None, solver_options: dict | None = None,
          n_jobs: int | None = None):
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
    ``c``; solving runs in float64 on the CPU, members in ``n_jobs`` threads (default: the
    CPU count), and the derivatives of the whole batch come from one batched factorization
    (:class:`ConicSolve`).

    ``solver`` is ``"clarabel"`` (also for None or ``"auto"``; its answer is translated to
    SCS's conventions; where Clarabel is not installed ``"auto"`` means SCS), ``"scs"`` or
    ``"ipm"`` (the batched torch interior
    point of :mod:`~torchdiffopt.solvers.conic_ipm`: zero, nonnegative and second-order
    cones; the batch in one call on the data's device). ``refine`` polishes the solver's point by
    Newton steps on the optimality conditions before differentiating (the returned solution
    is the refined one; Clarabel's interior point needs it as much as SCS's point).
    ``solver_options`` go to the solver (e.g. ``{"max_iters": …}`` for SCS,
    ``{"max_iter": …}`` for Clarabel, ``{"tol": …, "max_iter": …}`` for the interior point,
    whose ``tol`` is :data:`IPM_TOL_BEFORE_REFINEMENT` = 1e-9 when refining, 1e-10 without).
    Raises the solver's named errors (InfeasibleError,
    UnboundedError, SolverError, NonconvexError), prefixed with the first failing batch member;
    warns with DegenerateSolutionWarning at degenerate solutions (see
    :mod:`torchdiffopt.backends.conic`). ``backward``, forward-mode AD
    (``torch.autograd.forward_ad``, ``gradcheck``) and ``torch.func`` transforms (``jvp``,
    ``vmap``, ``jacrev``, ``jacfwd``) work while the system is held densely (order
    ``n + m`` up to :data:`~torchdiffopt.linalg.factorization.DENSE_MAX_ORDER`).
    """
    dims = ConeDims.from_dict(cones)
    tensors = {"A": A, "b": b, "c": c, "P": P}
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
        # under torch.func transforms the values are not concrete here; ConicSolve then
        # reports non-finite data per member
        wrapped = torch._C._functorch.is_functorch_wrapped_tensor(t)
        if not wrapped and not torch.isfinite(t.detach()).all():
            raise ValueError(f"input {name!r} contains NaN or inf")
    if dims.size != m:
        raise ValueError(f"the cones have {dims.size} rows but A has {m}")
    B = next(iter(sizes.values()), 1)
    A_rows, A_cols = np.divmod(np.arange(m * n), n)
    P_rows, P_cols = np.divmod(np.arange(n * n if P is not None else 0), n)
    pattern = ConicPattern(n, m, A_rows, A_cols, P_rows, P_cols)
    call = ConicCall(ConicStructure(pattern, dims, conic_solver(solver), solver_options, refine,
                                    n_jobs))
    flat = lambda t, shape: t.to(_F64).expand(B, *shape).reshape(B, -1)  # noqa: E731
    P_vals = flat(P, (n, n)) if P is not None else c.new_zeros(B, 0, dtype=_F64)
    reject_nested_derivatives()
    outs = ConicSolve.apply(call, P_vals, flat(c, (n,)), flat(A, (m, n)), flat(b, (m,)),
                            c.new_zeros(B, 0, dtype=_F64))
    if call.errors:
        j = min(call.errors)
        err = call.errors[j]
        raise type(err)(f"batch member {j}: {err}" if B > 1 else str(err)) from err
    outs = tuple(o.to(c.dtype) for o in outs)
    if not sizes:
        outs = tuple(o[0] for o in outs)
    return outs if return_duals else outs[0]
