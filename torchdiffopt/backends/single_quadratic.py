"""Quadratic backend for one small, strictly convex dense QP on the CPU, built in numpy.

The batched backend (:mod:`.batched_quadratic`) builds a batch's KKT systems in about a
hundred torch operations: masks for failed members, active rows gathered into slots, a way
of factoring chosen per member, a polish accepted per member. For a single small problem
(benchmark W1 at batch 1, n = 10 to 100) each of those operations costs more than its
arithmetic (5–10 µs of dispatch against a numpy call's 1–2 µs), and that dispatch was most
of a call's forward time. :func:`single_kkt` builds the same system for one problem with
numpy and LAPACK (scipy), in the same steps and with the same tolerances as
:class:`~.batched_quadratic.BatchedQuadraticKKT`:

* the active rows ``𝒜``: equality rows, the solver's active rows, and rows binding to
  :data:`~.quadratic.ACTIVE_RTOL` of their scale;
* the inverse of ``K = [[P, Gᵀ], [G, 0]]`` (``G = C_𝒜``, ``k`` rows) by the Schur
  complement of ``P``: with ``P = L Lᵀ``, ``W = L⁻¹ Gᵀ``, ``N = WᵀW = G P⁻¹ Gᵀ = L_N L_Nᵀ``,
  ``Z = L⁻ᵀ W = P⁻¹ Gᵀ`` and ``Y = Z L_N⁻ᵀ``::

      K⁻¹ = [[P⁻¹ − Y Yᵀ,   Z N⁻¹],
             [N⁻¹ Zᵀ,       −N⁻¹ ]]

  held explicitly, so that each derivative is a product with it (plus one step of
  iterative refinement against ``K``) — plain torch on a ``(1, n + k, n + k)`` tensor,
  under every ``torch.func`` transform;
* one Newton polish of the solver's point, kept where it stays feasible, sign-correct and
  close; the relative KKT residual.

It takes only the regular case: ``P`` and ``N`` with Cholesky factors that pass the pivot
test of :data:`~.batched_quadratic.SCHUR_PIVOT_RTOL` (``P ≻ 0``, independent active rows), no
weakly active row (:data:`~.quadratic.WEAK_RTOL`) and a residual within the caller's
tolerance. Anything else returns None, and the caller takes the batched path, which has the
pseudo-inverses, the warnings and the retries for it.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from scipy.linalg import lapack

from ..folding import is_transformed
from ..linalg.threads import serial_numpy_blas
from .batched_quadratic import (ALL_COTANGENTS, SCHUR_PIVOT_RTOL, ActiveSetDerivatives,
                                data_cotangents)
from .quadratic import ACTIVE_RTOL, WEAK_RTOL, largest_residual

#: the pivot test on Cholesky diagonals: ``min L_ii ≥ √SCHUR_PIVOT_RTOL · max L_ii``
_PIVOT_RATIO = SCHUR_PIVOT_RTOL ** 0.5


def well_pivoted_cholesky(A: np.ndarray) -> np.ndarray | None:
    """The lower Cholesky factor of the symmetric ``A``, or None where ``A`` is not
    positive definite or its factor fails the pivot test (a condition number above about
    1e10; an empty ``A`` passes). (LAPACK's ``potrf`` itself: numpy's and scipy's wrappers
    cost 10–20 µs a call in checks, more than a factorization of order 10.)"""
    if not len(A):
        return A
    L, info = lapack.dpotrf(A, lower=1, clean=1)
    if info != 0:
        return None
    d = np.diagonal(L)
    if not (d.min() >= _PIVOT_RATIO * d.max() and np.isfinite(d.max())):
        return None
    return L


def _triangular_inverse(L: np.ndarray) -> np.ndarray:
    """``L⁻¹`` of a nonsingular lower triangular ``L`` (LAPACK's ``trtri``)."""
    if not len(L):
        return L
    return lapack.dtrtri(L, lower=1)[0]


class _InverseSolve:
    """``solve(rhs) = K⁻¹ rhs`` with the explicit inverse and one refinement step against
    ``K`` (both ``(1, N, N)`` tensors): the inverse's rounding grows with the condition of
    ``P``, one step brings the solution back to a factorization's accuracy."""

    def __init__(self, K: torch.Tensor, K_inv: torch.Tensor):
        self._K, self._K_inv = K, K_inv

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        z = self._K_inv @ rhs
        return z + self._K_inv @ (rhs - self._K @ z)


class SingleQuadraticKKT(ActiveSetDerivatives):
    """The factorized KKT system of one QP at its (polished) solution, built by
    :func:`single_kkt`: the derivatives of :class:`~.batched_quadratic.ActiveSetDerivatives`
    for a batch of one, ``x (1, n)``, ``mu (1, m)``, and the objective value ``f``. A
    reverse-mode call with plain seeds (no ``torch.func`` transform) runs in numpy, about a
    quarter of the torch operations' time at these sizes."""

    def __init__(self, x, mu_all, m, rows, K, K_inv, f):
        self.n, self.m, self.M = len(x), m, len(mu_all)
        self.x = torch.from_numpy(x[None])
        self.mu = torch.from_numpy(mu_all[None, :m])
        self.valid = torch.ones(1, dtype=torch.bool)
        self._all_used = True
        self.f = f
        self._arrays = x[None], mu_all[None, :m], rows, K, K_inv

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x (1, n), μ (1, m), f (1,))`` as new tensors: an in-place change of an output
        must not reach the arrays the derivatives use."""
        x, mu = self._arrays[:2]
        return (torch.from_numpy(x.copy()), torch.from_numpy(mu.copy()),
                torch.from_numpy(np.array([self.f])))

    # the torch derivatives' state, made on their first use: a call whose backward runs
    # in numpy (plain seeds) never needs it
    @functools.cached_property
    def _slot_rows(self) -> torch.Tensor:
        return torch.from_numpy(self._arrays[2][None])

    @functools.cached_property
    def _used(self) -> torch.Tensor:
        return torch.ones(1, len(self._arrays[2]), dtype=torch.float64)

    @functools.cached_property
    def _factor(self) -> _InverseSolve:
        K, K_inv = self._arrays[3:]
        return _InverseSolve(torch.from_numpy(K[None]), torch.from_numpy(K_inv[None]))

    def vjp(self, x_bar, mu_bar=None, f_bar=None, wanted=ALL_COTANGENTS):
        """:meth:`ActiveSetDerivatives.vjp`; in numpy for plain seeds, unless a graph of
        the backward is being recorded (``create_graph=True``: grad mode is on inside the
        backward), which needs the torch operations."""
        if torch.is_grad_enabled() or is_transformed(x_bar, mu_bar, f_bar):
            return super().vjp(x_bar, mu_bar, f_bar, wanted)
        with serial_numpy_blas():
            cotangents = self._numpy_vjp(x_bar, mu_bar, f_bar, wanted)
        # r̄ = f̄ is the seed itself (a tensor made from its numpy view would share its
        # memory with a fresh tensor, into which autograd may accumulate)
        return tuple(f_bar if i == 2 else None if c is None else torch.from_numpy(c)
                     for i, c in enumerate(cotangents))

    def _numpy_vjp(self, x_bar, mu_bar, f_bar, wanted):
        x, mu, rows, K, K_inv = self._arrays
        n, m = self.n, self.m
        rhs = np.zeros(len(K))
        rhs[:n] = x_bar.detach().numpy()[0]
        constraint_slots = rows < m
        if mu_bar is not None:
            rhs[n:][constraint_slots] = mu_bar.detach().numpy()[0, rows[constraint_slots]]
        z = K_inv @ rhs
        z += K_inv @ (rhs - K @ z)
        v = np.zeros((1, m))
        v[0, rows[constraint_slots]] = -z[n:][constraint_slots]
        f_bar = None if f_bar is None else f_bar.detach().numpy()
        return data_cotangents(x, mu, -z[None, :n], v, f_bar, wanted)


def single_kkt(P, L, q, r, C_all, c0_all, sense_all, m, x, mu_all, hint,
               residual_tol: float) -> SingleQuadraticKKT | None:
    """The KKT system of ``min ½ xᵀPx + qᵀx + r  s.t.  C_all x + c0_all ∈ S`` (numpy float64:
    ``P (n, n)`` symmetric with lower Cholesky factor ``L``, ``C_all (M, n)``, ``c0_all``,
    ``sense_all (M,)``: the constraint rows, ``m`` of them, then the bound rows) at the
    solver's point ``x``, ``mu_all`` with its active rows ``hint (M,)``; None unless the
    case is regular (module docstring) with a relative KKT residual ≤ ``residual_tol``."""
    n = len(q)
    residual = C_all @ x + c0_all
    x_size = 1.0 + np.abs(x).max(initial=0.0)
    C_abs = np.abs(C_all)
    row_scale = 1.0 + np.abs(c0_all) + C_abs.max(1, initial=0.0) * x_size
    equality = sense_all == 0
    active = equality | hint | (np.abs(residual) <= ACTIVE_RTOL * row_scale)
    rows = np.flatnonzero(active)
    k = len(rows)
    if k > n:  # dependent rows: K is singular
        return None
    mu_all = mu_all * active
    G = C_all[rows]
    L_inv = _triangular_inverse(L)
    W = L_inv @ G.T
    L_N = well_pivoted_cholesky(W.T @ W)
    if L_N is None:
        return None
    L_N_inv = _triangular_inverse(L_N)
    Z = L_inv.T @ W
    Y = Z @ L_N_inv.T
    K_inv = np.empty((n + k, n + k))
    K_inv[:n, :n] = L_inv.T @ L_inv - Y @ Y.T
    K_inv[:n, n:] = Y @ L_N_inv
    K_inv[n:, :n] = K_inv[:n, n:].T
    K_inv[n:, n:] = -(L_N_inv.T @ L_N_inv)
    K = np.zeros((n + k, n + k))
    K[:n, :n], K[:n, n:], K[n:, :n] = P, G.T, G

    # Newton polish from the solver's point, kept where it is acceptable
    rhs = np.concatenate((-q, -c0_all[rows]))
    z = K_inv @ rhs
    z += K_inv @ (rhs - K @ z)
    x_new, mu_new = z[:n], np.zeros_like(mu_all)
    mu_new[rows] = z[n:]
    res_new = C_all @ x_new + c0_all
    mu_tol = 1e-7 * (1.0 + np.abs(mu_new).max(initial=0.0))
    if (np.all(sense_all * res_new >= -ACTIVE_RTOL * row_scale)
            and np.all(sense_all * mu_new <= mu_tol) and np.isfinite(mu_new).all()
            and np.abs(x_new - x).max(initial=0.0) <= 1e-4 * x_size):
        x, mu_all, residual = x_new, mu_new, res_new

    mu_abs = np.abs(mu_all)
    if np.any(active & ~equality & (mu_abs <= WEAK_RTOL * (1.0 + mu_abs.max(initial=0.0)))):
        return None
    Px = P @ x
    stationarity = Px + q + C_all.T @ mu_all
    scale = 1.0 + max(np.abs(q).max(initial=0.0), np.abs(Px).max(initial=0.0),
                      (C_abs.T @ mu_abs).max(initial=0.0))
    violation = np.where(equality, np.abs(residual), np.maximum(-sense_all * residual, 0.0))
    kkt_residual = largest_residual(
        np.abs(stationarity).max(initial=0.0) / scale,
        np.maximum(sense_all * mu_all, 0.0).max(initial=0.0) / scale,
        (violation / row_scale).max(initial=0.0))
    if kkt_residual > residual_tol:
        return None
    f = float((0.5 * Px + q) @ x + r)
    return SingleQuadraticKKT(x, mu_all, m, rows, K, K_inv, f)
