"""Clarabel adapter for cone programs in SCS's form (optional: ``pip install clarabel``).

Solves ``min ½ xᵀPx + cᵀx  s.t.  A x + s = b,  s ∈ K`` (``K`` in SCS's cone dictionary,
:mod:`torchdiffopt.backends.cones`) with Clarabel, an interior-point method, and returns the
answer in SCS's conventions (:class:`~.cone_program.ConicSolution`), so that the conic
backend takes it unchanged.

Clarabel states the same problem (``A x + s = b``, ``s ∈ K``; its dual ``z ∈ K*`` with
``P x + Aᵀz + q = 0``, so ``z`` is SCS's ``y``), and its zero, nonnegative, second-order,
exponential (``cl{(x, y, z): y > 0, y·exp(x/y) ≤ z}``) and power cones
(``{(x, y, z): x, y ≥ 0, x^α y^(1-α) ≥ |z|}``, ``0 < α < 1``) are SCS's. Three kinds of
rows differ and are mapped by an invertible block-diagonal ``W``, one block per cone:
Clarabel solves ``W A x + s' = W b``, ``s' = W s ∈ K'`` and its dual ``z' ∈ K'*`` gives
``y = Wᵀz'`` and ``s = W⁻¹s'`` (``Aᵀy = (WA)ᵀz'``, ``yᵀs = z'ᵀs'``):

* PSD cones: Clarabel's ``PSDTriangleConeT`` is the √2-scaled **upper** triangle column by
  column, SCS's the lower triangle column by column; the entry ``(r, c)``, ``r ≥ c``, of
  SCS's ``svec`` is Clarabel's ``(c, r)`` at position ``r(r+1)/2 + c``: ``W`` permutes.
* dual exponential cones (SCS's ``ed``, ``cl{(u, v, w): u < 0, -u·exp(v/u) ≤ e·w}``):
  ``(u, v, w) ∈ K_exp*`` iff ``(u - v, -u, w) ∈ K_exp``, so ``W = [[1, -1, 0], [-1, 0, 0],
  [0, 0, 1]]`` maps them onto Clarabel's exponential cone.
* dual power cones (SCS's negative ``α``, ``{(u, v, w): (u/α)^α (v/(1-α))^(1-α) ≥ |w|}``
  for ``|α|``): ``W = diag(1/α, 1/(1-α), 1)`` maps them onto Clarabel's power cone of ``α``.

Clarabel runs to tolerances of 1e-10 by default (:data:`DEFAULTS`); as for SCS, the point is
checked (:func:`~.cone_program.certify`) and the conic backend refines it by Newton steps.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.sparse as sp

from ..backends.cones import ConeDims, svec_entries
from ..errors import InfeasibleError, SolverError, UnboundedError
from .cone_program import ACCEPT_RESIDUAL, ConicSolution, certify, cone_program

#: Clarabel settings used unless overridden (Clarabel's own defaults are 1e-8)
DEFAULTS = {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10, "max_iter": 200,
            "verbose": False}

_INFEASIBLE = ("PrimalInfeasible", "AlmostPrimalInfeasible")
_UNBOUNDED = ("DualInfeasible", "AlmostDualInfeasible")
_SOLVED = ("Solved", "AlmostSolved")

_ED = np.array([[1.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
_ED_INV = np.array([[0.0, -1.0, 0.0], [-1.0, -1.0, 0.0], [0.0, 0.0, 1.0]])


def require_clarabel():
    """The ``clarabel`` module, or an ImportError that says how to install it."""
    try:
        import clarabel
    except ImportError as err:
        raise ImportError("solver='clarabel' needs the Clarabel package: pip install clarabel "
                          "(or pip install 'torchdiffopt[clarabel]')") from err
    return clarabel


def clarabel_cones(cones) -> tuple[list, sp.csr_matrix | None, sp.csr_matrix | None]:
    """Clarabel's cones for SCS's ``cones`` (same row order), with the row map ``W`` and
    ``W⁻¹`` of the module docstring (``s' = W s``); both None where ``W`` is the identity
    (no PSD, dual exponential or dual power cone). The list is the caller's own (the
    cached one stays untouched)."""
    out, W, W_inv = _clarabel_cones(ConeDims.from_dict(cones))
    return list(out), W, W_inv


@lru_cache(maxsize=64)
def _clarabel_cones(dims: ConeDims):
    """:func:`clarabel_cones`, cached: a batch asks again for the same cones per member."""
    clarabel = require_clarabel()
    out = []
    if dims.z:
        out.append(clarabel.ZeroConeT(dims.z))
    if dims.l:
        out.append(clarabel.NonnegativeConeT(dims.l))
    out += [clarabel.SecondOrderConeT(d) for d in dims.q]
    out += [clarabel.PSDTriangleConeT(d) for d in dims.s]
    out += [clarabel.ExponentialConeT() for _ in range(dims.ep + dims.ed)]
    out += [clarabel.PowerConeT(abs(a)) for a in dims.p]

    # W and W⁻¹ from (row, column, value) triples: identity on the zero, nonnegative and
    # second-order rows, permutations on the PSD rows, 3 × 3 blocks on the ep, ed, p rows
    m, start = dims.size, dims.z + dims.l + sum(dims.q)
    rows, cols = [np.arange(start)], [np.arange(start)]
    for d in dims.s:
        r, c, _ = svec_entries(d)
        rows.append(start + r * (r + 1) // 2 + c)
        cols.append(start + np.arange(len(r)))
        start += len(r)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    scale = np.array([[-1 / a, 1 / (1 + a), 1.0] if a < 0 else [1.0, 1.0, 1.0]
                      for a in dims.p]).reshape(-1, 3)
    blocks = np.concatenate((np.broadcast_to(np.eye(3), (dims.ep, 3, 3)),
                             np.broadcast_to(_ED, (dims.ed, 3, 3)),
                             scale[:, :, None] * np.eye(3)))
    inverses = np.concatenate((np.broadcast_to(np.eye(3), (dims.ep, 3, 3)),
                               np.broadcast_to(_ED_INV, (dims.ed, 3, 3)),
                               np.eye(3) / scale[:, :, None]))
    first = start + 3 * np.arange(len(blocks))[:, None, None]
    b_rows = np.broadcast_to(first + np.arange(3)[:, None], blocks.shape).ravel()
    b_cols = np.broadcast_to(first + np.arange(3), blocks.shape).ravel()
    ones = np.ones(len(rows))

    if not (dims.s or dims.ed or any(a < 0 for a in dims.p)):
        return tuple(out), None, None

    def matrix(values, r, c):
        return sp.csr_matrix((values, (r, c)), shape=(m, m))

    W = matrix(np.r_[ones, blocks.ravel()], np.r_[rows, b_rows], np.r_[cols, b_cols])
    W_inv = matrix(np.r_[ones, inverses.ravel()], np.r_[cols, b_rows], np.r_[rows, b_cols])
    return tuple(out), W, W_inv


def solve_clarabel_conic(A, b, c, cones, P=None, *, accept: float = ACCEPT_RESIDUAL,
                         **options) -> ConicSolution:
    """Solve the cone program with Clarabel (``options`` are Clarabel settings overriding
    :data:`DEFAULTS`, e.g. ``tol_gap_abs``, ``max_iter``, ``verbose``). The answer is in
    SCS's conventions (module docstring).

    Raises :class:`~torchdiffopt.errors.InfeasibleError` or
    :class:`~torchdiffopt.errors.UnboundedError` when Clarabel returns a certificate (also an
    "almost" one), :class:`~torchdiffopt.errors.NonconvexError` for an indefinite ``P``,
    ``ValueError`` for inconsistent sizes, non-finite data or an unknown setting,
    :class:`~torchdiffopt.errors.SolverError` when Clarabel stops without a solution or its
    point has a relative residual above ``accept``, and ImportError without Clarabel."""
    return ClarabelSequence(cones, **options).solve(A, b, c, P, accept=accept)


class ClarabelSequence:
    """Cone programs with the same cones and the same sparsity patterns of ``A`` and ``P``,
    solved one after another on one Clarabel solver: the first call builds it, each later
    one replaces its data (Clarabel's ``update``, which keeps the equilibration's scaling,
    the KKT matrix's pattern and its symbolic factorization; Clarabel allows it with its
    presolve off, and the presolve only drops rows with infinite bounds, which cone
    programs here do not have), and only with the arrays that differ from the last
    program's. W4's 64 members, one after another: 36 → 27 ms in Clarabel.
    A solve that ends without a solution discards the solver; the next call builds a new
    one. Not thread-safe: one sequence per thread."""

    def __init__(self, cones, **options):
        self._clarabel = require_clarabel()
        self.dims = ConeDims.from_dict(cones)
        self._settings = self._clarabel.DefaultSettings()
        for key, value in {**DEFAULTS, **options, "presolve_enable": False}.items():
            if not hasattr(self._settings, key):
                raise ValueError(f"unknown Clarabel setting {key!r}")
            setattr(self._settings, key, value)
        self._solver = None
        self._pattern = None  # (A's indptr, indices, P's indptr, indices) of the solver's data
        self._data: dict = {}  # the solver's q, A's and P's entries, and b (copies)
        self._zero_P = sp.csc_matrix((0, 0))

    def _no_P(self, n: int) -> sp.csc_matrix:
        """The empty ``(n, n)`` objective matrix, made once."""
        if self._zero_P.shape != (n, n):
            self._zero_P = sp.csc_matrix((n, n))
        return self._zero_P

    @staticmethod
    def takes_entries(cones) -> bool:
        """Whether :meth:`solve_entries` takes programs over ``cones``: those that Clarabel
        states on SCS's rows (no PSD, dual exponential or dual power cone, whose map ``W``
        of the module docstring changes ``A``'s pattern)."""
        return clarabel_cones(cones)[1] is None

    def solve(self, A, b, c, P=None, *, accept: float = ACCEPT_RESIDUAL) -> ConicSolution:
        """:func:`solve_clarabel_conic` of one program of the sequence."""
        pr = cone_program(A, b, c, self.dims, P)
        _, W, W_inv = clarabel_cones(pr.dims)
        P_upper = self._no_P(pr.shape[1]) if pr.P is None else sp.triu(pr.P, format="csc")
        A, b = (pr.A, pr.b) if W is None else (sp.csc_matrix(W @ pr.A), W @ pr.b)
        result = self._run(P_upper, pr.c, A, b)
        y, s = (np.asarray(v, dtype=np.float64) for v in (result.z, result.s))
        if W is not None:
            y, s = W.T @ y, W_inv @ s
        return certify(pr, result.x, y, s, "Clarabel", str(result.status),
                       int(result.iterations), accept)

    def solve_entries(self, A: sp.csc_matrix, A_data, b, c, P_upper: sp.csc_matrix | None = None,
                      P_data=None) -> list:
        """Programs ``k = 0 … K-1`` on the patterns of ``A`` and ``P_upper`` (CSC; the upper
        triangle of the symmetric ``P``) with the entries ``A_data[k]``, ``P_data[k]`` (in
        the matrices' ``data`` order) and ``b[k]``, ``c[k]``: each one's
        :class:`ConicSolution` (unchecked: no ``residuals``) or the exception that names its
        failure, which stays with its member.

        For a batch whose data the caller has checked at once (finite, ``P ⪰ 0``): this
        path builds no matrix per member (the entries are swapped into one) and checks
        nothing per member, which halves the Python time around each of Clarabel's solves
        (W4: the 64 members' solves in 2 threads, 26 → 19 ms). Not for cones that
        Clarabel states on other rows (:meth:`takes_entries`)."""
        if not self.takes_entries(self.dims):
            raise ValueError("solve_entries takes zero, nonnegative, second-order, "
                             "exponential and power cones (α > 0) only")
        # matrices of the patterns whose entries are swapped (the caller's stay untouched)
        A = sp.csc_matrix((A.data, A.indices, A.indptr), shape=A.shape)
        P_upper = self._no_P(A.shape[1]) if P_upper is None else \
            sp.csc_matrix((P_upper.data, P_upper.indices, P_upper.indptr), shape=P_upper.shape)
        if P_data is None:
            P_data = np.broadcast_to(P_upper.data, (len(c), P_upper.nnz))
        # the arrays that differ within the run, found once (W4: only q), and the pattern
        # known to be the solver's after the first member: nothing compared per member
        varies = {key: bool(len(arr) and (arr != arr[:1]).any())
                  for key, arr in (("q", c), ("A", A_data), ("b", b), ("P", P_data))}
        out = []
        for k in range(len(c)):
            A.data, P_upper.data = A_data[k], P_data[k]
            try:
                r = self._run(P_upper, c[k], A, b[k], varies if k else None)
            except Exception as err:  # noqa: BLE001 - a member's failure is its outcome
                out.append(err)
                continue
            out.append(ConicSolution(*(np.asarray(v, dtype=np.float64) for v in (r.x, r.z, r.s)),
                                     str(r.status), int(r.iterations), solver="Clarabel"))
        return out

    def _run(self, P_upper: sp.csc_matrix, q, A: sp.csc_matrix, b, varies: dict | None = None):
        """Clarabel's result for one program (``A`` in Clarabel's rows, ``P_upper`` the
        upper triangle): the solver updated where the patterns are its own, else built;
        raises the error that a status without a solution names. ``varies`` (the caller's
        knowledge, for a program of the same patterns as the last one: which of ``q``,
        ``A``, ``b``, ``P`` may differ from it) replaces the comparisons."""
        data = {"q": q, "A": A.data, "b": b, "P": P_upper.data}
        if self._solver is not None and varies is not None:
            changed = {key: data[key] for key, v in varies.items() if v}
            if changed:
                self._solver.update(**changed)
            self._data.update({key: np.array(value) for key, value in changed.items()})
        else:
            pattern = (A.indptr, A.indices, P_upper.indptr, P_upper.indices)
            if self._solver is not None and self._solver.is_data_update_allowed() and all(
                    np.array_equal(new, old) for new, old in zip(pattern, self._pattern)):
                # only what differs from the last program: an update of A or P makes
                # Clarabel scale and load the KKT matrix's entries again (W4's 64
                # members, where only q changes: 28 → 25.5 ms in Clarabel)
                changed = {key: value for key, value in data.items()
                           if not np.array_equal(value, self._data[key])}
                if changed:
                    self._solver.update(**changed)
            else:
                K = clarabel_cones(self.dims)[0]
                self._solver = self._clarabel.DefaultSolver(P_upper, q, A, b, K,
                                                            self._settings)
                self._pattern = tuple(np.array(a) for a in pattern)
            self._data = {key: np.array(value) for key, value in data.items()}
        result = self._solver.solve()
        status, iters = str(result.status), int(result.iterations)
        if status not in _SOLVED:
            self._solver = None
        if status in _INFEASIBLE:
            raise InfeasibleError(f"infeasible: Clarabel found a certificate that no x gives "
                                  f"A x + s = b with s in the cone (status {status!r})")
        if status in _UNBOUNDED:
            raise UnboundedError(f"unbounded: Clarabel found a direction improving the "
                                 f"objective without limit (status {status!r})")
        if status not in _SOLVED:
            raise SolverError(f"Clarabel stopped without a solution (status {status!r} after "
                              f"{iters} iterations)")
        return result
