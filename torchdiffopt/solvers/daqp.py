"""DAQP adapter: a batch of small dense QPs and LPs, member by member, in C.

DAQP (Arnström, Bemporad and Axehill, 2022) is a dual active-set method for dense QPs:
each iteration adds or drops one constraint and updates an LDLᵀ factorization of the
working set, so a QP of tens to a few hundred variables is solved in microseconds to a
millisecond, and the answer is exact for the active set it ends on (no interior-point
tolerance). Singular ``P`` (LPs, ridge-free directions) are handled by DAQP's proximal-point
outer iterations. That is the regime of optimization layers (OptNet's QPs, decision-focused
LPs and QPs): on benchmark W1, in one thread, it solves a batch of 32 QPs with 10
variables in 0.3 ms and 128 with 100 variables in 74 ms, where this package's batched
interior point (:mod:`~torchdiffopt.solvers.ipm`) needs 16 ms and about 500 ms on two cores.

Problem, as for :func:`~torchdiffopt.solvers.ipm.solve_ipm`: for B members sharing their
sizes and ``sense``::

    minimize    ½ xᵀ P_b x + q_bᵀ x
    subject to  C_b x + c0_b ∈ S_1 × … × S_M,   S_i = {0}, [0, ∞) or (-∞, 0]
                                                 for sense[i] = 0, +1 or -1

DAQP's form is ``blower ≤ A x ≤ bupper`` with stationarity ``P x + q + Aᵀλ = 0``, λ ≥ 0 on
rows at their upper bound and λ ≤ 0 at their lower bound. With ``A = C`` and bounds
``−c0`` this is the Lagrangian ``½xᵀPx + qᵀx + μᵀ(C x + c0)`` of the IPM with ``μ = λ``:
μ ≥ 0 on ``≤`` rows, μ ≤ 0 on ``≥`` rows, free on equality rows.

The C solver releases the GIL, so members run in ``n_jobs`` threads, each over one
contiguous chunk of the batch (one task per thread: a task per member would cost more in
pool overhead than a 20-variable QP takes to solve).
"""

from __future__ import annotations

from ctypes import c_int

import daqp
import numpy as np
import torch

from .batch import CPU_COUNT, map_in_threads
from .ipm import (DUAL_INFEASIBLE, NOT_CONVERGED, OPTIMAL, PRIMAL_INFEASIBLE, IPMResult,
                  status_error)
from .solution import NumericQP, Solution

#: DAQP's value for an absent bound
DAQP_INF = 1e30
#: DAQP's constraint-type flag of an equality row
DAQP_EQUALITY = 5
#: DAQP exit flags (``exitflag`` of ``daqp.solve``) and this package's statuses
_STATUS_OF_EXITFLAG = {1: OPTIMAL, 2: OPTIMAL, -1: PRIMAL_INFEASIBLE, -3: DUAL_INFEASIBLE}
#: primal feasibility tolerance handed to DAQP (its default is 1e-6): the point is then
#: polished on its active set by the KKT factorization, which needs the right active set
PRIMAL_TOL = 1e-9
#: batches up to this many entries of ``P`` and ``C`` (B n (n + M)) are solved in one thread:
#: a thread pool's start costs more than it saves (measured, 2 cores: B = 1024, n = 20,
#: M = 40 took 13 ms in one thread and 29 ms with a task per member in two)
MIN_THREADED_ENTRIES = 1 << 17


class DAQPForm:
    """The part of DAQP's form ``blower ≤ A x ≤ bupper`` that a QP structure fixes: the
    simple bounds (every variable's, where any is finite), the constraint kinds, which rows
    get ``−c0`` as an upper or a lower bound, and how DAQP's multipliers map back to the rows
    of ``C`` and the bound rows of :func:`~torchdiffopt.backends.quadratic.bound_rows`.
    Built once per structure; each solve only fills in ``−c0``."""

    def __init__(self, sense, lb, ub, n: int):
        from ..backends.quadratic import bound_rows  # the backends import the solvers

        self.sense = np.asarray(sense).astype(int)
        lb = np.full(n, -np.inf) if lb is None else np.asarray(lb, dtype=np.float64)
        ub = np.full(n, np.inf) if ub is None else np.asarray(ub, dtype=np.float64)
        self.b_cols, _, self.b_sense = bound_rows(lb, ub)
        #: DAQP's simple bounds cover ``x[:simple]``
        self.simple = n if len(self.b_cols) else 0
        self.upper_simple = np.minimum(ub, DAQP_INF)[:self.simple]
        self.lower_simple = np.maximum(lb, -DAQP_INF)[:self.simple]
        self.kinds = np.where(np.concatenate(((lb == ub)[:self.simple], self.sense == 0)),
                              DAQP_EQUALITY, 0).astype(c_int)
        #: equality rows among the rows of ``C`` and the bound rows
        self.equality = np.concatenate((self.sense, self.b_sense)) == 0

    def bounds(self, c0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(bupper, blower)`` for ``c0 (B, m)``, each ``(B, simple + m)``, C-contiguous:
        DAQP's wrapper reads each array from its first element and ignores strides (a
        concatenation with a broadcast block can come out column-major)."""
        B, rhs = len(c0), -c0
        upper = np.where(self.sense <= 0, rhs, DAQP_INF)
        lower = np.where(self.sense >= 0, rhs, -DAQP_INF)
        if self.simple:  # (without simple bounds the rows' bounds are all: W1 at batch 1,
            # 42 -> 12 µs)
            upper = np.concatenate((np.broadcast_to(self.upper_simple, (B, self.simple)),
                                    upper), 1)
            lower = np.concatenate((np.broadcast_to(self.lower_simple, (B, self.simple)),
                                    lower), 1)
        return np.ascontiguousarray(upper), np.ascontiguousarray(lower)

    def multipliers(self, lam: np.ndarray) -> np.ndarray:
        """The IPM's ``μ (B, m + n_bound_rows)`` from DAQP's ``λ (B, simple + m)``: a
        variable's one multiplier ``λ_j`` belongs to its upper bound row where positive, to
        its lower bound row where negative (the sign convention of the module docstring)."""
        if not len(self.b_cols):
            return lam[:, self.simple:]
        lam_bound = lam[:, self.b_cols]
        b_sense = self.b_sense
        mu_bound = np.where(b_sense > 0, np.minimum(lam_bound, 0.0),
                            np.where(b_sense < 0, np.maximum(lam_bound, 0.0), lam_bound))
        return np.concatenate((lam[:, self.simple:], mu_bound), 1)

    def solve(self, P, q, C, upper, lower):
        """One member (C-contiguous float64 arrays, ``upper``, ``lower`` from
        :meth:`bounds`): ``(status, x, λ, iterations)``, ``x`` and ``λ`` None where DAQP
        found no solution (``x`` kept where it stopped unconverged)."""
        x, _, flag, info = daqp.solve(P, q, C, upper, lower, self.kinds, primal_tol=PRIMAL_TOL)
        status = _STATUS_OF_EXITFLAG.get(int(flag), NOT_CONVERGED)
        optimal = status == OPTIMAL
        return (status, x if optimal or status == NOT_CONVERGED else None,
                info["lam"] if optimal else None, info["iterations"])


def solve_daqp(P, q, C, c0, sense, lb=None, ub=None, *,
               n_jobs: int | None = None, form: DAQPForm | None = None) -> IPMResult:
    """Solve a batch of convex QPs (LPs when P = 0) with DAQP, member by member.

    ``P (B, n, n)`` symmetric positive semidefinite, ``q (B, n)``, ``C (B, m, n)``,
    ``c0 (B, m)`` and ``sense (m,)`` (0, +1, -1, shared by the batch), on any device and in
    any float dtype (solved in float64 on the CPU). ``lb, ub (n,)`` (numpy, ±inf where
    absent; None for none) are variable bounds shared by the batch: DAQP takes them as
    simple bounds (one multiplier per variable, no row of ``C``), which on benchmark W5 (500
    bounded variables) halves its time against unit rows. ``form``, if given, is the
    :class:`DAQPForm` of ``sense, lb, ub`` (a caller that solves one structure many times
    keeps it).

    Returns an :class:`~torchdiffopt.solvers.ipm.IPMResult` in the IPM's conventions over the
    rows of ``C`` followed by the bound rows of
    :func:`~torchdiffopt.backends.quadratic.bound_rows` (fixed, lower, upper; the rows
    ``x_j − b_j ∈ S``): ``x`` and the multipliers ``mu`` (NaN where no solution exists),
    ``active`` (equality rows and rows with a nonzero multiplier, at optimal members),
    ``status`` (0 optimal, 1 infeasible, 2 unbounded, 3 any other DAQP exit: cycling,
    iteration limit, numerical failure; and non-finite data, which is not solved) and DAQP's
    ``iterations``.
    """
    dtype, device = q.dtype, q.device
    B, n = q.shape
    P_np, q_np, C_np, c0_np = (_host_array(t) for t in (P, q, C, c0))
    if form is None:
        form = DAQPForm(torch.as_tensor(sense).cpu().numpy(), lb, ub, n)
    upper, lower = form.bounds(c0_np)
    # DAQP reports non-finite data as solved: such members are not handed to it
    finite = np.isfinite(P_np).all((1, 2)) & np.isfinite(q_np).all(1) & \
        np.isfinite(C_np).all((1, 2)) & np.isfinite(c0_np).all(1)

    x = np.full((B, n), np.nan)
    lam = np.full((B, form.simple + len(form.sense)), np.nan)
    status = np.full(B, NOT_CONVERGED, dtype=np.int64)
    iterations = np.zeros(B, dtype=np.int64)

    def solve_chunk(members: range) -> None:
        for b in (b for b in members if finite[b]):
            status[b], xb, lam_b, iterations[b] = form.solve(P_np[b], q_np[b], C_np[b],
                                                             upper[b], lower[b])
            if xb is not None:
                x[b] = xb
            if lam_b is not None:
                lam[b] = lam_b

    workers = min(B, n_jobs or CPU_COUNT)
    if workers <= 1 or B * n * (n + len(form.sense)) < MIN_THREADED_ENTRIES:
        solve_chunk(range(B))
    else:
        cuts = np.linspace(0, B, workers + 1).astype(int)
        map_in_threads(solve_chunk, [range(lo, hi) for lo, hi in zip(cuts, cuts[1:])],
                       n_jobs or CPU_COUNT)

    mu = form.multipliers(lam)
    optimal = status == OPTIMAL
    active = (form.equality | (mu != 0)) & optimal[:, None]
    back = lambda a, dt=dtype: torch.as_tensor(a, dtype=dt, device=device)  # noqa: E731
    return IPMResult(x=back(x), mu=back(mu), active=back(active, torch.bool),
                     status=back(status, torch.int64), iterations=back(iterations, torch.int64))


def _host_array(t: torch.Tensor) -> np.ndarray:
    """``t`` as a C-contiguous float64 numpy array on the host (no copy where it is one)."""
    t = t.detach()
    if t.dtype != torch.float64 or t.device.type != "cpu":
        t = t.to("cpu", torch.float64)
    return np.ascontiguousarray(t.numpy())


def solve_daqp_qp(problem: NumericQP) -> Solution:
    """Solve one internal QP (:class:`~torchdiffopt.solvers.solution.NumericQP`, the
    sensitivity API's form) with :func:`solve_daqp` on dense copies of its matrices; raise a
    named error unless it is optimal. Shadow prices: ``row_shadow = −μ`` on the rows
    (``∂f*/∂rhs``), ``bound_shadow_j = −μ`` of the active bound row of ``x_j``."""
    from ..backends.quadratic import bound_rows

    dense = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64))[None]  # noqa: E731
    result = solve_daqp(dense(problem.P.toarray()), dense(problem.q), dense(problem.C.toarray()),
                        dense(problem.c0), torch.as_tensor(problem.sense.astype(np.int64)),
                        problem.lb, problem.ub, n_jobs=1)
    status = int(result.status[0])
    if status != OPTIMAL:
        raise status_error(status, "DAQP")[1]
    mu = result.mu[0].numpy()
    b_cols, _, _ = bound_rows(problem.lb, problem.ub)
    bound_shadow = np.zeros(problem.n)
    np.add.at(bound_shadow, b_cols, -mu[problem.m:])
    return Solution(x=result.x[0].numpy(), row_shadow=-mu[: problem.m],
                    bound_shadow=bound_shadow)


__all__ = ["DAQPForm", "solve_daqp", "solve_daqp_qp"]
