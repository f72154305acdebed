"""The differentiable map from QP data to its solution, for a batch: ``QPSolve``.

``QPSolve.apply(call, P_vals, q, r, C_vals, c0) → (x*, μ*, f*)`` takes the internal QP data
of :mod:`torchdiffopt.compile.quadratic` (the stored entries of ``P`` and ``C`` as value
tensors with a leading batch dimension ``B``), solves every member, factorizes the KKT systems
once, and differentiates the solution with respect to the data only: ``backward`` is the
vector-Jacobian product, ``jvp`` the Jacobian-vector product, ``vmap`` folds a vmapped
dimension into the batch. The :class:`~torchdiffopt.Layer` and
:func:`torchdiffopt.functional.qp` are thin clients.

Two KKT representations share one interface (``jvp`` / ``vjp`` on the stored entries):

* :class:`DenseBatchKKT` — batched dense torch (CPU or CUDA), for systems of order up to
  :data:`~torchdiffopt.linalg.factorization.DENSE_MAX_ORDER`; all ``torch.func`` transforms.
* :class:`MemberwiseKKT` — one sparse scipy factorization per member (CPU), for larger
  systems; its solves run in numpy, so under ``torch.func`` transforms its seeds arrive
  plain, a slice at a time (:mod:`torchdiffopt.folding`).
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.sparse as sp
import torch

from .backends.batched_quadratic import ALL_COTANGENTS, BatchedQuadraticKKT, with_bound_rows
from .backends.quadratic import DataTangent, QuadraticKKT, bound_rows, check_convex
from .backends.single_quadratic import single_kkt, well_pivoted_cholesky
from .errors import NonconvexError, SolverError, warn_degenerate
from .folding import (PositionalFunction, accepts_batched_grads, derivative_under_transforms,
                      guards_second_derivatives, needs_plain_seeds, seed_batch, vmap_by_folding)
from .linalg.factorization import DENSE_MAX_ORDER
from .linalg.threads import serial_if_small, serial_numpy_blas
from .solvers import NumericQP, qp_solver, solve_highs, solve_scs
from .solvers.batch import record_outcomes, solve_each, solve_qpth
from .solvers.box_qp import solve_box_qp
from .solvers.daqp import DAQPForm, solve_daqp
from .solvers.ipm import OPTIMAL, solve_ipm, status_error

#: largest relative KKT residual accepted from a solver
KKT_TOLERANCE = 1e-6
_F64 = torch.float64


class QPStructure:
    """The fixed structure of a batch of internal QPs (see
    :mod:`torchdiffopt.compile.quadratic`): sizes, sparsity patterns, row senses, bounds,
    and how to solve them (``solver``, ``n_jobs``)."""

    def __init__(self, n, m, P_rows, P_cols, C_rows, C_cols, sense, lb, ub,
                 solver=None, n_jobs=None):
        self.n, self.m = n, m
        self.P_rows, self.P_cols = np.asarray(P_rows), np.asarray(P_cols)
        self.C_rows, self.C_cols = np.asarray(C_rows), np.asarray(C_cols)
        self.sense, self.lb, self.ub = sense, lb, ub
        self.solver, self.n_jobs = solver, n_jobs
        #: order of the full KKT system: variables, rows and finite bounds
        self.order = n + m + len(bound_rows(lb, ub)[0])
        self._P_flat = torch.as_tensor(self.P_rows * n + self.P_cols, dtype=torch.long)
        self._C_flat = torch.as_tensor(self.C_rows * n + self.C_cols, dtype=torch.long)
        # patterns that list every entry in row-major order (tdo.functional.qp's dense
        # matrices): the stored entries are the matrix, no scatter or gather needed
        self._P_full = np.array_equal(self.P_rows * n + self.P_cols, np.arange(n * n))
        self._C_full = np.array_equal(self.C_rows * n + self.C_cols, np.arange(m * n))

    def dense_P(self, vals: torch.Tensor, symmetric: bool = True) -> torch.Tensor:
        """``(..., nnz) → (..., n, n)``, adding repeated entries and taking the symmetric
        part (only ``½(P + Pᵀ)`` enters ``½ xᵀPx``); with ``symmetric=False`` the matrix as
        stored, for a consumer that takes the symmetric part itself."""
        if not self._P_full:
            vals = vals.new_zeros(*vals.shape[:-1], self.n * self.n).index_add(
                -1, self._P_flat.to(vals.device), vals)
        P = vals.unflatten(-1, (self.n, self.n))
        return 0.5 * (P + P.transpose(-1, -2)) if symmetric else P

    def dense_C(self, vals: torch.Tensor) -> torch.Tensor:
        if not self._C_full:
            vals = vals.new_zeros(*vals.shape[:-1], self.m * self.n).index_add(
                -1, self._C_flat.to(vals.device), vals)
        return vals.unflatten(-1, (self.m, self.n))

    def dense_arrays(self, P_vals: np.ndarray, C_vals: np.ndarray):
        """One member's ``(½(P + Pᵀ), C)`` as numpy arrays from its stored entries (the
        numpy counterpart of :meth:`dense_P` and :meth:`dense_C`)."""
        n, m = self.n, self.m
        P = P_vals if self._P_full else np.bincount(
            self._P_flat.numpy(), weights=P_vals, minlength=n * n)
        C = C_vals if self._C_full else np.bincount(
            self._C_flat.numpy(), weights=C_vals, minlength=m * n)
        P = P.reshape(n, n)
        return 0.5 * (P + P.T), np.ascontiguousarray(C.reshape(m, n))

    @functools.cached_property
    def daqp_form(self) -> DAQPForm:
        """The :class:`~torchdiffopt.solvers.daqp.DAQPForm` of the senses and bounds."""
        return DAQPForm(self.sense, self.lb, self.ub, self.n)

    @functools.cached_property
    def bound_rows(self):
        """``(E, c0, sense)``: the bound rows ``x_j + c0 ∈ S`` as unit rows ``E (n_b, n)``
        (:func:`~torchdiffopt.backends.quadratic.bound_rows`)."""
        cols, c0, sense = bound_rows(self.lb, self.ub)
        E = np.zeros((len(cols), self.n))
        E[np.arange(len(cols)), cols] = 1.0
        return E, c0, sense

    @functools.cached_property
    def all_row_senses(self) -> np.ndarray:
        """The senses (float) of the constraint rows followed by the bound rows (read-only:
        the structure is shared by every call of its shape)."""
        senses = np.concatenate((self.sense, self.bound_rows[2])).astype(np.float64)
        senses.flags.writeable = False
        return senses

    def P_entries(self, dense: torch.Tensor) -> torch.Tensor:
        """Cotangent of the stored entries from a symmetric dense ``(..., n, n)`` cotangent
        (the adjoint of :meth:`dense_P`)."""
        flat = dense.flatten(-2)
        return flat if self._P_full else flat[..., self._P_flat.to(dense.device)]

    def C_entries(self, dense: torch.Tensor) -> torch.Tensor:
        flat = dense.flatten(-2)
        return flat if self._C_full else flat[..., self._C_flat.to(dense.device)]

    def numeric(self, P_vals, q, r, C_vals, c0) -> NumericQP:
        """One member's data for a CPU solver."""
        n, m = self.n, self.m
        return NumericQP(
            P=sp.csr_matrix((P_vals, (self.P_rows, self.P_cols)), shape=(n, n)), q=q,
            r=float(r), C=sp.csr_matrix((C_vals, (self.C_rows, self.C_cols)), shape=(m, n)),
            c0=c0, sense=self.sense, lb=self.lb, ub=self.ub)


class SolveCall:
    """One call of :class:`QPSolve`: its structure, and the side channel through which
    ``forward`` hands the factorized KKT system and per-member statuses on."""

    def __init__(self, structure: QPStructure):
        self.structure = structure
        self.kkt: BatchedQuadraticKKT | None = None
        self.status: list[str] = []
        self.errors: dict[int, Exception] = {}


def solve_and_certify(problem: NumericQP, solver, maximize: bool = False) -> QuadraticKKT:
    """Solve one QP, polish and certify its point by the KKT residual. HiGHS's QP solver can
    call a QP that is unbounded along a direction of zero curvature "optimal" (its
    regularization bounds it); when its answer fails the check, SCS, which detects
    unboundedness, decides. Raises a named error for a nonconvex or unsolved problem."""
    check_convex(problem.P, maximize)
    solve = qp_solver(solver, problem)
    kkt = QuadraticKKT(problem, solve(problem))
    if kkt.kkt_residual > KKT_TOLERANCE and solve is solve_highs:
        kkt = QuadraticKKT(problem, solve_scs(problem))
    if kkt.kkt_residual > KKT_TOLERANCE:
        raise SolverError(
            f"the solver's point is not optimal (relative KKT residual {kkt.kkt_residual:.1e});"
            " the problem may be unbounded or badly scaled")
    return kkt


class DenseBatchKKT:
    """The batched dense backend seen through the stored entries of ``P`` and ``C``:
    tangents and cotangents are value arrays of the structure's sparsity patterns."""

    def __init__(self, structure: QPStructure, kkt: BatchedQuadraticKKT):
        self.structure, self.kkt = structure, kkt

    @property
    def valid(self) -> torch.Tensor:
        return self.kkt.valid

    def jvp(self, dP_vals, dq, dr, dC_vals, dc0):
        """Tangents with a direction dimension ``D`` after the batch: ``(B, D, ...)``."""
        st = self.structure
        return self.kkt.jvp(st.dense_P(dP_vals, symmetric=False), dq, dr,
                            st.dense_C(dC_vals), dc0)

    def vjp(self, x_bar, mu_bar=None, f_bar=None, wanted=ALL_COTANGENTS):
        """Cotangents of the stored entries; ``mu_bar``, ``f_bar`` None for zero seeds; None
        for those that ``wanted`` does not ask for."""
        st = self.structure
        P_bar, q_bar, r_bar, C_bar, c0_bar = self.kkt.vjp(x_bar, mu_bar, f_bar, wanted)
        return (None if P_bar is None else st.P_entries(P_bar), q_bar, r_bar,
                None if C_bar is None else st.C_entries(C_bar), c0_bar)


class MemberwiseKKT:
    """One sparse factorized KKT system (:class:`QuadraticKKT`) per member, for systems too
    large to hold densely; the same interface as :class:`DenseBatchKKT`."""

    def __init__(self, structure: QPStructure, members: list, device):
        self.structure, self.members = structure, members
        self.valid = torch.tensor([k is not None for k in members], device=device)

    def jvp(self, dP_vals, dq, dr, dC_vals, dc0):
        st = self.structure
        B, D = dq.shape[:2]
        P, q, r, C, c0 = (t.detach().cpu().numpy() for t in (dP_vals, dq, dr, dC_vals, dc0))
        dx, dmu, df = np.zeros((B, D, st.n)), np.zeros((B, D, st.m)), np.zeros((B, D))
        for b, kkt in enumerate(self.members):
            for d in range(D if kkt is not None else 0):
                dP = sp.csr_matrix((P[b, d], (st.P_rows, st.P_cols)), shape=(st.n, st.n))
                dC = sp.csr_matrix((C[b, d], (st.C_rows, st.C_cols)), shape=(st.m, st.n))
                tangent = DataTangent(0.5 * (dP + dP.T), q[b, d], float(r[b, d]), dC, c0[b, d])
                dx[b, d], dmu[b, d], df[b, d] = kkt.jvp(tangent)
        return tuple(torch.as_tensor(a, dtype=_F64, device=dq.device) for a in (dx, dmu, df))

    def vjp(self, x_bar, mu_bar=None, f_bar=None, wanted=ALL_COTANGENTS):
        st = self.structure
        B = x_bar.shape[0]
        mu_bar = x_bar.new_zeros(B, st.m) if mu_bar is None else mu_bar
        f_bar = x_bar.new_zeros(B) if f_bar is None else f_bar
        xb, mb, fb = (t.detach().cpu().numpy() for t in (x_bar, mu_bar, f_bar))
        out = [np.zeros((B, len(st.P_rows))), np.zeros((B, st.n)), np.zeros(B),
               np.zeros((B, len(st.C_rows))), np.zeros((B, st.m))]
        for b, kkt in enumerate(self.members):
            if kkt is None:
                continue
            cot = kkt.vjp(xb[b], mb[b], float(fb[b]))
            values = (cot.P_at(st.P_rows, st.P_cols), cot.q, cot.r,
                      cot.C_at(st.C_rows, st.C_cols), cot.c0)
            for slot, value in zip(out, values):
                slot[b] = value
        return tuple(torch.as_tensor(a, dtype=_F64, device=x_bar.device) if want else None
                     for a, want in zip(out, wanted))


def _warn_degenerate(members: list) -> None:
    if members:
        warn_degenerate(
            f"batch members {members}: singular KKT system or weakly active constraints; "
            "their derivatives are minimum-norm least-squares or one-sided derivatives")


def _solve_batch(call: SolveCall, P_vals, q, r, C_vals, c0):
    """Solve every member, factorize and certify; returns ``(x, μ, f)`` with NaN rows for
    failed members and leaves the KKT representation and statuses on ``call``."""
    st = call.structure
    if len(q) == 1 and q.device.type == "cpu" and st.order <= SINGLE_MAX_ORDER \
            and _batch_solver(st.solver, q.device, st) == "daqp":
        solved = _solve_single(call, P_vals, q, r, C_vals, c0)
        if solved is not None:
            return solved
    if st.order > DENSE_MAX_ORDER and q.device.type == "cpu" and st.solver != "qpth":
        return _solve_memberwise(call, P_vals, q, r, C_vals, c0)
    return _solve_dense(call, P_vals, q, r, C_vals, c0)


#: largest KKT order (variables, rows and finite bounds) of a single problem built in numpy by
#: :func:`_solve_single`: its explicit inverse costs more arithmetic than the batched path's
#: factorization, which makes up for the fixed cost up to about this order (measured on W1's
#: QPs at batch 1, forward and backward, 2 cores: order 200, 4.5 against 5.7 ms; 300, 7.3
#: against 8.8 ms; 400, level at 12.9 ms)
SINGLE_MAX_ORDER = 300


def _solve_single(call: SolveCall, P_vals, q, r, C_vals, c0):
    """The fast path for a batch of one on the CPU, solved by DAQP and factorized in numpy
    (:mod:`~torchdiffopt.backends.single_quadratic`): ``(x, μ, f)`` with the KKT system on
    ``call``, or None (nothing left on ``call``) where the problem is not the regular,
    strictly convex, finite case, which the batched path then decides with its statuses,
    warnings and retries."""
    with serial_numpy_blas():
        return _solve_single_serially(call, P_vals, q, r, C_vals, c0)


def _solve_single_serially(call: SolveCall, P_vals, q, r, C_vals, c0):
    st = call.structure
    P_vals, q, r, C_vals, c0 = (t.detach().numpy()[0] for t in (P_vals, q, r, C_vals, c0))
    # (a sum is finite where every entry is: NaN and inf propagate, overflow goes the
    # batched way too)
    with np.errstate(over="ignore", invalid="ignore"):
        if not np.isfinite(P_vals.sum() + q.sum() + r + C_vals.sum() + c0.sum()):
            return None
    P, C = st.dense_arrays(P_vals, C_vals)
    L = well_pivoted_cholesky(P)
    if L is None:
        return None
    form = st.daqp_form
    upper, lower = form.bounds(c0[None])
    status, x, lam, _ = form.solve(P, np.ascontiguousarray(q), C, upper[0], lower[0])
    if status != OPTIMAL:
        return None
    mu_all = form.multipliers(lam[None])[0]
    E, b_c0, _ = st.bound_rows
    C_all = np.concatenate((C, E)) if len(E) else C
    c0_all = np.concatenate((c0, b_c0)) if len(E) else c0
    kkt = single_kkt(P, L, q, r, C_all, c0_all, st.all_row_senses, st.m, x, mu_all,
                     form.equality | (mu_all != 0), KKT_TOLERANCE)
    if kkt is None:
        return None
    call.kkt, call.status, call.errors = DenseBatchKKT(st, kkt), ["optimal"], {}
    return kkt.outputs()


def _solve_memberwise(call: SolveCall, P_vals, q, r, C_vals, c0):
    st = call.structure
    B = q.shape[0]
    arrays = [t.detach().cpu().numpy() for t in (P_vals, q, r, C_vals, c0)]
    status, errors = ["optimal"] * B, {}
    finite = [all(np.isfinite(a[b]).all() for a in arrays) for b in range(B)]
    for b in (b for b in range(B) if not finite[b]):
        status[b], errors[b] = "invalid_data", ValueError("the problem data contain NaN or inf")
    members = [b for b in range(B) if finite[b]]
    problems = [st.numeric(*(a[b] for a in arrays)) for b in members]
    outcomes = solve_each(problems, lambda p: solve_and_certify(p, st.solver), st.n_jobs)
    kkts = record_outcomes(members, outcomes, B, status, errors)
    call.kkt = MemberwiseKKT(st, kkts, q.device)
    call.status, call.errors = status, errors
    _warn_degenerate([b for b, k in enumerate(kkts)
                      if k is not None and (k.singular or len(k.weakly_active))])
    x = np.full((B, st.n), np.nan)
    mu = np.full((B, st.m), np.nan)
    f = np.full(B, np.nan)
    for b, p in zip(members, problems):
        kkt = kkts[b]
        if kkt is not None:
            x[b], mu[b] = kkt.x, kkt.mu
            f[b] = 0.5 * kkt.x @ (p.P @ kkt.x) + p.q @ kkt.x + p.r
    return tuple(torch.as_tensor(a, dtype=_F64, device=q.device) for a in (x, mu, f))


def _solve_dense(call: SolveCall, P_vals, q, r, C_vals, c0):
    st = call.structure
    B, n = q.shape
    P, C = st.dense_P(P_vals), st.dense_C(C_vals)
    status = ["optimal"] * B
    errors: dict[int, Exception] = {}

    # a sum of the data is finite where every entry is (NaN and inf propagate); only
    # where a sum is not (or overflows) are the entries themselves tested
    data = (P_vals, q, r.reshape(B, 1), C_vals, c0)
    finite = sum(t.sum(-1) for t in data if t.shape[-1]).isfinite()
    if not bool(finite.all()):
        finite = torch.stack([t.isfinite().all(-1) for t in data]).all(0)
    # (the masks and per-member loops run only where some member needs them: at small
    # sizes each torch operation costs more than its arithmetic)
    all_finite = bool(finite.all())
    P_finite = P if all_finite else torch.where(finite.reshape(B, 1, 1), P, 0.0)
    convex, P_cholesky = _convexity(P_finite)
    valid = finite & convex
    all_valid = bool(valid.all())
    if not all_valid:
        for b in torch.nonzero(~finite).flatten().tolist():
            status[b] = "invalid_data"
            errors[b] = ValueError("the problem data contain NaN or inf")
        for b in torch.nonzero(finite & ~convex).flatten().tolist():
            status[b] = "nonconvex"
            errors[b] = NonconvexError("nonconvex objective: the quadratic form is indefinite")

    b_cols, _, _ = bound_rows(st.lb, st.ub)
    solver = st.solver
    hint = None
    if solver == "qpth":
        strict = _positive_definite(P_finite, shift=-1e-10)
        for b in torch.nonzero(valid & ~strict).flatten().tolist():
            status[b] = "nonconvex"
            errors[b] = NonconvexError("qpth needs a strictly convex objective (P ≻ 0)")
        valid = valid & strict
        eye = torch.eye(n, dtype=q.dtype, device=q.device)
        x, mu_all, hint = _qpth(st, torch.where(valid.reshape(B, 1, 1), P, eye),
                                torch.where(valid.reshape(B, 1), q, 0.0), C, c0)
    elif (name := _batch_solver(solver, q.device, st)) is not None:
        x, mu_all, hint, codes = _solve_batched(
            name, st, *((P, q) if all_valid else (torch.where(valid.reshape(B, 1, 1), P, 0.0),
                                                  torch.where(valid.reshape(B, 1), q, 0.0))),
            C, c0)
        solved = valid & (codes == OPTIMAL)
        if not bool(solved.all()):
            for b in torch.nonzero(valid & ~solved).flatten().tolist():
                solver_name = _BATCH_SOLVER_NAMES[_device_default(q.device) if name == "box"
                                                  else name]
                status[b], errors[b] = status_error(int(codes[b]), solver_name)
            valid = solved
            x = torch.where(valid.reshape(B, 1), x, 0.0)
            mu_all = torch.where(valid.reshape(B, 1), mu_all, 0.0)
    else:
        x, mu_all, valid = _cpu_solve(st, solver, P_vals, q, r, C_vals, c0, valid, b_cols,
                                      status, errors, range(B))
    kkt = BatchedQuadraticKKT(P, q, C, c0, st.sense, st.lb, st.ub, x, mu_all, valid, hint,
                              P_cholesky)

    bad = valid & (kkt.kkt_residual > KKT_TOLERANCE)
    if solver in _RETRIED_WITH_SCS and "solver_error" in status:
        # members the solver gave up on (not proved infeasible or unbounded) get SCS too
        gave_up = torch.tensor([s == "solver_error" for s in status], device=q.device)
        bad = bad | (finite & convex & gave_up)
    if solver in _RETRIED_WITH_SCS and bool(bad.any()):
        # HiGHS's QP solver can call a QP unbounded along a flat direction "optimal", and an
        # interior point's active set can be misread at a nearly degenerate point; SCS,
        # which detects unboundedness, decides those members
        retry = torch.nonzero(bad).flatten().tolist()
        x2, mu2, valid2 = _cpu_solve(st, "scs", P_vals, q, r, C_vals, c0, valid | bad,
                                     b_cols, status, errors, retry)
        x = torch.where(bad.reshape(B, 1), x2, x)
        mu_all = torch.where(bad.reshape(B, 1), mu2, mu_all)
        valid = torch.where(bad, valid2, valid)
        # the retried members' active rows are SCS's, not the first solver's
        hint = None if hint is None else hint & ~bad.reshape(B, 1)
        kkt = BatchedQuadraticKKT(P, q, C, c0, st.sense, st.lb, st.ub, x, mu_all, valid, hint,
                              P_cholesky)
        bad = valid & (kkt.kkt_residual > KKT_TOLERANCE)
    if bool(bad.any()):
        for b in torch.nonzero(bad).flatten().tolist():
            status[b] = "not_optimal"
            errors[b] = SolverError(
                f"the solver's point is not optimal (relative KKT residual "
                f"{float(kkt.kkt_residual[b]):.1e}): infeasible, unbounded or badly scaled")
        valid = valid & ~bad
    kkt.valid = valid

    degenerate = valid & (kkt.singular | kkt.weak)
    if bool(degenerate.any()):
        _warn_degenerate(torch.nonzero(degenerate).flatten().tolist())
    call.kkt, call.status, call.errors = DenseBatchKKT(st, kkt), status, errors
    # f = ½ xᵀPx + qᵀx + r, as (½ Px + q)·x
    f = torch.baddbmm(q.unsqueeze(-1), P, kkt.x.unsqueeze(-1), alpha=0.5).squeeze(-1)
    f = (f * kkt.x).sum(-1) + r
    if bool(valid.all()):  # copies: an in-place change of an output must not reach kkt
        return kkt.x.clone(), kkt.mu.clone(), f
    keep = valid.reshape(B, 1)
    return (torch.where(keep, kkt.x, torch.nan), torch.where(keep, kkt.mu, torch.nan),
            torch.where(valid, f, torch.nan))


def _convexity(P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(convex, L)``: the members with ``P ⪰ 0`` to rounding, and ``P``'s Cholesky factor
    where every member has one (else None), for the KKT factorization to reuse. Members
    whose ``P`` itself factors pass without :func:`_positive_definite`'s shifted test (the
    common case, at a third of the operations)."""
    L, info = torch.linalg.cholesky_ex(P)
    if bool((info == 0).all()):
        return info == 0, L
    return _positive_definite(P, shift=1e-9), None


def _positive_definite(P: torch.Tensor, shift: float) -> torch.Tensor:
    """Members whose symmetric ``P`` has every eigenvalue above ``-shift · ‖P‖∞`` (with
    ``‖P‖∞ ≥ 1`` at least; ``‖P‖∞`` bounds the spectral radius): those for which
    ``P + shift · ‖P‖∞ · I`` has a Cholesky factor. A ``shift`` of 1e-9 tests convexity up to
    rounding, a negative one strict convexity; a batched Cholesky costs a fraction of the
    eigenvalues."""
    scale = P.abs().sum(-1).amax(-1).clamp_min(1.0)
    eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
    return torch.linalg.cholesky_ex(P + (shift * scale).reshape(-1, 1, 1) * eye).info == 0


def _cpu_solve(st, solver, P_vals, q, r, C_vals, c0, valid, b_cols, status, errors, members):
    """Solve ``members`` with a per-instance CPU solver, in a thread pool."""
    B, n = q.shape
    dev = q.device
    arrays = [t.detach().cpu().numpy() for t in (P_vals, q, r, C_vals, c0)]
    members = [b for b in members if bool(valid[b])]
    problems = [st.numeric(*(a[b] for a in arrays)) for b in members]
    outcomes = solve_each(problems, lambda p: qp_solver(solver, p)(p), st.n_jobs)
    x = np.zeros((B, n))
    mu = np.zeros((B, st.m + len(b_cols)))
    ok = np.zeros(B, dtype=bool)
    for b, out in enumerate(record_outcomes(members, outcomes, B, status, errors)):
        if out is not None:
            x[b] = out.x
            mu[b] = np.concatenate((-out.row_shadow, -out.bound_shadow[b_cols]))
            ok[b] = True
            errors.pop(b, None)  # a retried member that succeeded
    as_t = lambda a: torch.as_tensor(a, dtype=_F64, device=dev)  # noqa: E731
    return as_t(x), as_t(mu), torch.as_tensor(ok, device=dev)


def _qpth(st, P, q, C, c0):
    return solve_qpth(P, q, *with_bound_rows(C, c0, st.sense, st.lb, st.ub))


#: solvers whose unsolved members (not proved infeasible or unbounded), and members whose
#: point fails the KKT check, are solved once more with SCS
_RETRIED_WITH_SCS = (None, "auto", "highs", "ipm", "daqp")

#: the batched dense solvers, by the name their error messages give them
_BATCH_SOLVER_NAMES = {"ipm": "the interior-point method", "daqp": "DAQP"}

#: fewest variables at which ``"auto"`` on the CPU solves a QP with bounds only by the
#: active-set method of :mod:`.solvers.box_qp` rather than by DAQP (measured, 2 cores,
#: NNLS with half the bounds active: DAQP is 4-5x faster at n <= 100, level at n = 200,
#: 2.2x slower at n = 300 and 6x at n = 500)
BOX_QP_MIN_VARIABLES = 256


def _batch_solver(solver, device, st) -> str | None:
    """The batched dense solver for ``solver`` on ``device``: ``"ipm"`` (this package's
    torch interior point) or ``"daqp"`` (DAQP member by member, in C), or None for a
    per-instance CPU solver (HiGHS, SCS). ``"auto"`` takes DAQP on the CPU and the interior
    point on an accelerator, where DAQP would need a copy to the host and back; a QP whose
    only constraints are variable bounds (``st.m == 0``) goes first to the bound-constrained
    active-set method ``"box"`` on an accelerator, and on the CPU from
    :data:`BOX_QP_MIN_VARIABLES` variables."""
    if solver in (None, "auto"):
        box_sized = device.type != "cpu" or st.n >= BOX_QP_MIN_VARIABLES
        return "box" if st.m == 0 and box_sized else _device_default(device)
    return solver if solver in _BATCH_SOLVER_NAMES else None


def _solve_batched(name, st, P, q, C, c0):
    """A batched dense solver (``"ipm"`` on the device, ``"daqp"`` on the CPU, which takes
    the variable bounds as simple bounds, ``"box"`` for bounds only, whose unsettled members
    go on to the device's default); returns ``(x, μ, active, status codes)`` over the
    constraint rows and then the bound rows."""
    if name == "box":
        result = solve_box_qp(P, q, st.lb, st.ub)
        retry = (result.status != OPTIMAL).nonzero().squeeze(-1)
        if not len(retry):
            return result.x, result.mu, result.active, result.status
        fallback = _solve_batched(_device_default(q.device), st, P[retry], q[retry],
                                  C[retry], c0[retry])
        merged = [t.index_copy(0, retry, u) for t, u in zip(
            (result.x, result.mu, result.active, result.status), fallback)]
        return tuple(merged)
    if name == "daqp":
        result = solve_daqp(P, q, C, c0, st.sense, st.lb, st.ub, n_jobs=st.n_jobs,
                            form=st.daqp_form)
    else:
        result = solve_ipm(P, q, *with_bound_rows(C, c0, st.sense, st.lb, st.ub))
    return result.x, result.mu, result.active, result.status


def _device_default(device) -> str:
    """The batched solver ``"auto"`` takes on ``device`` for QPs with rows, and the one that
    takes the members the box method gives up on (and names their failures): DAQP on the
    CPU, the interior point elsewhere."""
    return "daqp" if device.type == "cpu" else "ipm"


def _valid_seeds(valid, x_bar, mu_bar, f_bar):
    """The seeds with failed members' rows zeroed (their outputs are NaN; None stays None)."""
    keep = valid.reshape(-1, 1)
    return (torch.where(keep, x_bar, 0.0),
            None if mu_bar is None else torch.where(keep, mu_bar, 0.0),
            None if f_bar is None else torch.where(valid, f_bar, 0.0))


def _moving_inputs(inputs, seeds):
    """The inputs ``(P_vals, q, r, C_vals, c0)`` the QP's Jacobian moves with: ``P`` and
    ``C`` (the KKT matrix), and all of them where the optimal value is seeded (its
    cotangents hold the solution itself); see :func:`~.folding.guards_second_derivatives`."""
    return inputs if seeds[2] is not None else (inputs[0], inputs[3])


class QPSolve(PositionalFunction):
    """``(P_vals, q, r, C_vals, c0) ↦ (x*, μ*, f*)`` for a batch (leading dimension ``B``)
    of internal QPs, in float64. ``backward`` is the vector-Jacobian product, ``jvp`` the
    Jacobian-vector product, ``vmap`` folds a vmapped dimension into the batch."""

    @staticmethod
    def forward(call, P_vals, q, r, C_vals, c0):
        with torch.no_grad(), serial_if_small(len(q), call.structure.order, q.device):
            return _solve_batch(call, P_vals, q, r, C_vals, c0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        call = inputs[0]
        ctx.kkt, ctx.structure = call.kkt, call.structure
        # seeds of unused outputs stay None: most callers use x* alone, and the backward
        # skips the terms of the others instead of multiplying zeros
        ctx.set_materialize_grads(False)
        ctx.all_valid = bool(call.kkt.valid.all())
        ctx.folded = getattr(call, "folded_levels", frozenset())
        ctx.inputs = inputs[1:]

    @staticmethod
    @accepts_batched_grads
    @guards_second_derivatives(lambda ctx, seeds: _moving_inputs(ctx.inputs, seeds))
    def backward(ctx, x_bar, mu_bar, f_bar):
        kkt, st = ctx.kkt, ctx.structure
        B, members = seed_batch(x_bar, mu_bar, f_bar), len(kkt.valid)
        if B is None:
            return (None,) * 6
        q = ctx.inputs[1]
        if needs_plain_seeds(members, (x_bar, mu_bar, f_bar), isinstance(kkt, MemberwiseKKT)):
            # every seed a tensor (folding.py)
            zeros = lambda *shape: q.new_zeros(B, *shape)  # noqa: E731
            seeds = (zeros(st.n) if x_bar is None else x_bar,
                     zeros(st.m) if mu_bar is None else mu_bar,
                     zeros() if f_bar is None else f_bar)
            return (None, *derivative_under_transforms(
                lambda *s: kkt.vjp(*_valid_seeds(kkt.valid, *s)), ctx.folded, members,
                ctx.inputs, *seeds))
        if x_bar is None:
            x_bar = q.new_zeros(B, st.n)
        if not ctx.all_valid:
            x_bar, mu_bar, f_bar = _valid_seeds(kkt.valid, x_bar, mu_bar, f_bar)
        with serial_if_small(members, st.order, x_bar.device):
            return (None, *kkt.vjp(x_bar, mu_bar, f_bar, tuple(ctx.needs_input_grad[1:])))

    @staticmethod
    def jvp(ctx, _call_tangent, *tangents):
        st, kkt = ctx.structure, ctx.kkt
        members, q = len(kkt.valid), ctx.inputs[1]
        B = seed_batch(*tangents) or members
        sizes = (len(st.P_rows), st.n, None, len(st.C_rows), st.m)
        tangents = tuple(q.new_zeros(B, *(() if size is None else (size,)))
                         if t is None else t for t, size in zip(tangents, sizes))

        def jvp(*tangents):
            return tuple(o.squeeze(1) for o in kkt.jvp(*(t.unsqueeze(1) for t in tangents)))
        if needs_plain_seeds(members, tangents, isinstance(kkt, MemberwiseKKT)):
            return derivative_under_transforms(jvp, ctx.folded, members, ctx.inputs, *tangents)
        with serial_if_small(members, st.order, kkt.valid.device):
            return jvp(*tangents)

    @staticmethod
    def vmap(info, in_dims, call, *tensors):
        return vmap_by_folding(QPSolve, info, in_dims, call, tensors)


def failure_error(status: list, errors: dict) -> Exception:
    failed = sorted(errors)
    causes = "; ".join(f"[{b}] {status[b]}: {errors[b]}" for b in failed[:5])
    more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
    kinds = {type(errors[b]) for b in failed}
    cls = kinds.pop() if len(kinds) == 1 else SolverError
    if not issubclass(cls, (SolverError, ValueError)):
        cls = SolverError
    return cls(f"optimization failed for batch members {failed}: {causes}{more}")
