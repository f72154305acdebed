"""Quadratic backend: implicit differentiation of the KKT conditions of a convex QP.

Internal problem (see :mod:`torchdiffopt.compile.quadratic`)::

    min ½ xᵀPx + qᵀx + r   s.t.   C x + c0 ∈ S   (rows: = 0, ≥ 0, ≤ 0),   lb ≤ x ≤ ub

Variable bounds are folded in as extra rows ``x_j - lb_j ≥ 0`` / ``x_j - ub_j ≤ 0`` (one
equality row for a fixed variable). With the Lagrangian

    L(x, μ) = ½ xᵀPx + qᵀx + r + μᵀ (C x + c0)

the multiplier ``μ_i`` equals ``-∂f*/∂rhs_i`` with ``rhs_i = -c0_i`` (so ``μ ≤ 0`` on ``≥``
rows and ``μ ≥ 0`` on ``≤`` rows). On the active set 𝒜 (equalities and binding inequalities)
the KKT conditions are ``F(x, μ_𝒜) = [P x + q + C_𝒜ᵀ μ_𝒜 ; C_𝒜 x + c0_𝒜] = 0`` with the
symmetric Jacobian

    K = [[P, C_𝒜ᵀ], [C_𝒜, 0]].

Forward mode (a tangent of the data)::

    K [dx; dμ_𝒜] = -[dP x + dq + dCᵀ μ ; dC_𝒜 x + dc0_𝒜]
    df* = ½ xᵀ dP x + dqᵀ x + dr + μᵀ (dC x + dc0)          (envelope theorem)

Reverse mode (seeds ``x̄, μ̄, f̄`` on the outputs): solve ``K [u; v] = -[x̄; μ̄_𝒜]`` (``Kᵀ = K``)
and read the data cotangents (``P̄`` symmetric: only the symmetric part of ``P`` matters)

    P̄ = ½(u xᵀ + x uᵀ) + ½ f̄ x xᵀ,   q̄ = u + f̄ x,   r̄ = f̄,
    C̄ = μ uᵀ + v xᵀ + f̄ μ xᵀ,   c̄0 = v + f̄ μ         (v = 0 off 𝒜).

Both modes use the one factorization of ``K`` made when the object is built; the same
factorization first *polishes* the solver's point by one Newton step on ``F`` (HiGHS's QP
solver regularizes and stops near 1e-7, too coarse for derivatives).

If ``K`` is singular (a degenerate vertex, redundant active constraints, a flat objective
direction) the derivative is the minimum-norm least-squares solution of the same systems
and a :class:`~torchdiffopt.errors.DegenerateSolutionWarning` says so. Weakly active
constraints (binding with zero multiplier) are kept binding: the derivative is then the
one-sided derivative in which they stay active, and a warning says so as well.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ..errors import warn_degenerate
from ..linalg.factorization import factorize_symmetric
from ..solvers.solution import NumericQP, Solution

#: relative tolerance on a row residual for the row to count as binding
ACTIVE_RTOL = 1e-6
#: relative size under which a binding row's multiplier counts as zero (weakly active)
WEAK_RTOL = 1e-9


@dataclass
class DataTangent:
    """A tangent of the internal QP data (any entry may be perturbed, not only stored ones)."""

    dP: sp.spmatrix
    dq: np.ndarray
    dr: float
    dC: sp.spmatrix
    dc0: np.ndarray


@dataclass
class DataCotangent:
    """Cotangents of the internal QP data, read off at any ``(row, col)`` positions."""

    x: np.ndarray
    mu: np.ndarray  # multipliers of the constraint rows
    u: np.ndarray
    v: np.ndarray  # zero on inactive rows
    f_bar: float

    def P_at(self, rows, cols) -> np.ndarray:
        u, x = self.u, self.x
        return 0.5 * (u[rows] * x[cols] + x[rows] * u[cols] + self.f_bar * x[rows] * x[cols])

    @property
    def q(self) -> np.ndarray:
        return self.u + self.f_bar * self.x

    @property
    def r(self) -> float:
        return self.f_bar

    def C_at(self, rows, cols) -> np.ndarray:
        return (self.mu[rows] * (self.u[cols] + self.f_bar * self.x[cols])
                + self.v[rows] * self.x[cols])

    @property
    def c0(self) -> np.ndarray:
        return self.v + self.f_bar * self.mu


def largest_residual(*parts: float) -> float:
    """The largest of a residual's ``parts``, and +inf where any is NaN: a point that
    overflowed is not certified by any tolerance (Python's ``max`` keeps or drops a NaN by
    its position, and ``NaN > tolerance`` is False)."""
    largest = float(np.max(parts))
    return np.inf if np.isnan(largest) else largest


def bound_rows(lb: np.ndarray, ub: np.ndarray):
    """Rows ``x_j + c0 ∈ S`` for the finite bounds: (variable index, c0, sense).

    Cached by the bounds' values up to :data:`BOUND_ROWS_CACHED_SIZE` variables (each caller
    gets copies): each layer call asks for the same rows in several places, and the dozen
    small numpy operations cost 0.1 ms each time; larger models, whose keys would hold
    megabytes, are computed each time."""
    lb, ub = np.asarray(lb, dtype=np.float64), np.asarray(ub, dtype=np.float64)
    if lb.size > BOUND_ROWS_CACHED_SIZE:
        return _bound_rows(lb, ub)
    return tuple(a.copy() for a in _cached_bound_rows(lb.tobytes(), ub.tobytes()))


#: most variables whose bound rows :func:`bound_rows` caches
BOUND_ROWS_CACHED_SIZE = 4096


@functools.lru_cache(maxsize=64)
def _cached_bound_rows(lb_bytes: bytes, ub_bytes: bytes):
    return _bound_rows(np.frombuffer(lb_bytes), np.frombuffer(ub_bytes))


def _bound_rows(lb: np.ndarray, ub: np.ndarray):
    fixed = np.isfinite(lb) & (lb == ub)
    lower = np.isfinite(lb) & ~fixed
    upper = np.isfinite(ub) & ~fixed
    cols = np.concatenate((np.flatnonzero(fixed), np.flatnonzero(lower), np.flatnonzero(upper)))
    c0 = np.concatenate((-lb[fixed], -lb[lower], -ub[upper]))
    sense = np.concatenate((np.zeros(fixed.sum()), np.ones(lower.sum()),
                            -np.ones(upper.sum()))).astype(np.int8)
    return cols, c0, sense


class QuadraticKKT:
    """The factorized KKT system of a QP at its solution; see the module docstring.

    Attributes ``x`` (polished primal), ``mu`` (multipliers of the constraint rows, zero on
    inactive rows), ``active`` (boolean mask of binding constraint rows), ``singular`` and
    ``weakly_active`` (indices of constraint rows binding with a zero multiplier).
    """

    def __init__(self, problem: NumericQP, solution: Solution):
        n, m = problem.n, problem.m
        self.n, self.m = n, m
        self.P = sp.csr_matrix(problem.P)
        x = solution.x.copy()

        # all rows: user constraints, then the finite variable bounds
        b_cols, b_c0, b_sense = bound_rows(problem.lb, problem.ub)
        nb = len(b_cols)
        E = sp.csr_matrix((np.ones(nb), (np.arange(nb), b_cols)), shape=(nb, n))
        C_all = sp.vstack([sp.csr_matrix(problem.C), E]).tocsr()
        c0_all = np.concatenate((problem.c0, b_c0))
        sense_all = np.concatenate((problem.sense, b_sense))
        mu_all = np.concatenate((-solution.row_shadow, -solution.bound_shadow[b_cols]))

        residual = C_all @ x + c0_all
        row_scale = 1.0 + np.abs(c0_all) + abs(C_all).max(axis=1).toarray().ravel() * (
            1.0 + np.abs(x).max(initial=0.0))
        binding = np.abs(residual) <= ACTIVE_RTOL * row_scale
        # a bound row is binding only if its own bound is (lb/ub share the reduced cost)
        mu_all[m:][~binding[m:]] = 0.0
        active = (sense_all == 0) | binding
        mu_all[~active] = 0.0
        self._active_all = np.flatnonzero(active)

        C_act = C_all[self._active_all]
        K = sp.bmat([[self.P, C_act.T], [C_act, None]], format="csc")
        self._system = factorize_symmetric(K)
        self.singular = self._system.singular

        if not self.singular:
            x, mu_all = self._polish(x, mu_all, C_all, c0_all, sense_all, problem.q, row_scale)

        self.x = x
        self._C_all = C_all
        self._mu_all = mu_all
        self.mu = mu_all[:m]
        self.active = active[:m]
        mu_scale = 1.0 + np.abs(mu_all).max(initial=0.0)
        self._weak = active & (sense_all != 0) & (np.abs(mu_all) <= WEAK_RTOL * mu_scale)
        self.weakly_active = np.flatnonzero(self._weak[:m])
        self.kkt_residual = self._residual(problem.q, C_all, c0_all, sense_all, row_scale)

    def _residual(self, q, C_all, c0_all, sense_all, row_scale) -> float:
        """Relative KKT residual of ``(x, μ)``: stationarity, primal and dual feasibility."""
        x, mu = self.x, self._mu_all
        Px, Cmu = self.P @ x, C_all.T @ mu
        scale = 1.0 + max(np.abs(q).max(initial=0), np.abs(Px).max(initial=0),
                          (abs(C_all).T @ np.abs(mu)).max(initial=0))
        stationarity = np.abs(Px + q + Cmu).max(initial=0.0) / scale
        violation = np.maximum(-sense_all * (C_all @ x + c0_all), 0.0)
        violation[sense_all == 0] = np.abs(C_all @ x + c0_all)[sense_all == 0]
        primal = (violation / row_scale).max(initial=0.0)
        dual = np.maximum(sense_all * mu, 0.0).max(initial=0.0) / scale
        return largest_residual(stationarity, primal, dual)

    def warn_if_degenerate(self) -> None:
        """Emit a :class:`DegenerateSolutionWarning` if ``K`` is singular or some
        constraints are weakly active."""
        self._warn(self._weak)

    def _polish(self, x, mu_all, C_all, c0_all, sense_all, q, row_scale):
        """One Newton step on F(x, μ_𝒜) = 0 from the solver's point; kept only if the new
        point is primal feasible, dual feasible and near the solver's."""
        z = self._system.solve(np.concatenate((-q, -c0_all[self._active_all])))
        x_new = z[: self.n]
        mu_new = np.zeros_like(mu_all)
        mu_new[self._active_all] = z[self.n:]
        residual = C_all @ x_new + c0_all
        feasible = np.all(sense_all * residual >= -ACTIVE_RTOL * row_scale)
        mu_tol = 1e-7 * (1.0 + np.abs(mu_new).max(initial=0.0))
        dual_ok = np.all(sense_all * mu_new <= mu_tol)
        close = np.abs(x_new - x).max(initial=0.0) <= 1e-4 * (1.0 + np.abs(x).max(initial=0.0))
        if feasible and dual_ok and close and np.all(np.isfinite(z)):
            return x_new, mu_new
        return x, mu_all

    def _warn(self, weak: np.ndarray):
        weak_rows = [int(i) for i in np.flatnonzero(weak[: self.m])]
        weak_bounds = int(weak[self.m:].sum())
        if self.singular:
            warn_degenerate(
                f"the KKT matrix is singular at this solution ({len(self._active_all)} "
                f"binding constraints/bounds for {self.n} variables: a degenerate vertex, "
                "redundant constraints or a flat objective direction); derivatives are "
                "minimum-norm least-squares derivatives")
        elif weak_rows or weak_bounds:
            where = [f"constraint rows {weak_rows}"] if weak_rows else []
            where += [f"{weak_bounds} variable bound(s)"] if weak_bounds else []
            warn_degenerate(
                f"weakly active constraints (binding with a zero dual) at "
                f"{' and '.join(where)}: the solution map has a kink here; derivatives "
                "are one-sided (these constraints kept binding)")

    # -- forward mode ---------------------------------------------------------------------
    def jvp(self, t: DataTangent):
        """Tangents ``(dx, dμ, df*)`` of the primal, the row multipliers and the optimal value
        (internal problem) for a tangent of the data."""
        x, mu = self.x, self.mu
        dC_x = t.dC @ x + t.dc0
        rhs_x = t.dP @ x + t.dq + t.dC.T @ mu
        rhs_rows = np.concatenate((dC_x, np.zeros(len(self._mu_all) - self.m)))
        z = self._system.solve(-np.concatenate((rhs_x, rhs_rows[self._active_all])))
        dmu_all = np.zeros_like(self._mu_all)
        dmu_all[self._active_all] = z[self.n:]
        df = 0.5 * x @ (t.dP @ x) + t.dq @ x + t.dr + mu @ dC_x
        return z[: self.n], dmu_all[: self.m], float(df)

    # -- reverse mode ---------------------------------------------------------------------
    def vjp(self, x_bar: np.ndarray, mu_bar: np.ndarray, f_bar: float) -> DataCotangent:
        """Data cotangents for seeds on the primal, the row multipliers and the optimal value."""
        mu_bar_all = np.concatenate((mu_bar, np.zeros(len(self._mu_all) - self.m)))
        w = self._system.solve(-np.concatenate((x_bar, mu_bar_all[self._active_all])))
        v_all = np.zeros_like(self._mu_all)
        v_all[self._active_all] = w[self.n:]
        return DataCotangent(self.x, self.mu, w[: self.n], v_all[: self.m], float(f_bar))


def check_convex(P: sp.spmatrix, maximize: bool = False) -> None:
    """Raise :class:`~torchdiffopt.errors.NonconvexError` unless ``P ⪰ 0`` (to round-off).

    Only the block of variables that appear in quadratic terms is examined: densely (an
    ``eigvalsh``) up to 2,000 of them, by a sparse ``eigsh`` for its smallest eigenvalue above.
    """
    from ..errors import NonconvexError

    P = sp.csr_matrix(P)
    touched = np.unique(P.nonzero()[0])
    if len(touched) == 0:
        return
    block = P[touched][:, touched]
    if len(touched) <= 2000:
        eig = np.linalg.eigvalsh(block.toarray())
        lowest, largest = eig[0], np.abs(eig).max()
    else:
        import scipy.sparse.linalg as spla

        lowest = spla.eigsh(block, k=1, which="SA", tol=1e-8, return_eigenvectors=False)[0]
        largest = abs(block).max()
    if lowest < -1e-9 * max(1.0, largest):
        what = "maximizing a non-concave" if maximize else "minimizing a non-convex"
        raise NonconvexError(
            f"nonconvex objective: {what} quadratic (its Hessian has eigenvalue "
            f"{(-lowest if maximize else lowest):.3g}); the quadratic backend needs a convex QP"
        )
