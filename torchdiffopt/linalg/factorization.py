"""Factor once, solve many times: symmetric (indefinite) systems ``K z = b``.

The optimality systems differentiated in this package are symmetric, so a single
factorization serves forward mode (``K dz = -r``), reverse mode (``Kᵀ w = -g``, and
``Kᵀ = K``) and any number of right-hand sides.

Two variants sit behind :func:`factorize_symmetric`:

* :class:`DenseFactorization` — torch ``lu_factor_ex`` on (optionally batched) dense matrices;
  the singularity check reads the pivots of ``U``. A singular matrix falls back to the
  Moore–Penrose pseudo-inverse from ``eigh``: ``z = K⁺ b`` is the minimum-norm least-squares
  solution, and ``K⁺`` is symmetric, so the adjoint identity still holds exactly. It also
  takes nonsymmetric matrices (``symmetric=False``: the pseudo-inverse from the SVD, and
  solves with ``Kᵀ`` by ``transpose=True``, with ``(K⁺)ᵀ = (Kᵀ)⁺`` where singular), as the
  conic backend's residual-map Jacobian needs.
* :class:`SparseFactorization` — scipy's SuperLU on CSC matrices, for systems too large to
  hold densely. A singular matrix falls back to LSMR, whose iterates started at zero converge
  to the minimum-norm least-squares solution.

Neither torch nor scipy exposes a symmetric-indefinite (LDLᵀ) factorization with a solve for
batched or sparse matrices, so LU is used on the symmetric matrix; the cost is at most twice
that of LDLᵀ.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

#: Pivot ratio below which a matrix is treated as singular.
SINGULAR_RTOL = 1e-11
#: Dense systems up to this order are factorized densely.
DENSE_MAX_ORDER = 1500
#: On CPU, batches of matrices of at least this order are LU-factored one matrix at a time
#: (see :func:`_lu_factor`).
LOOPED_LU_MIN_ORDER = 128


class DenseFactorization:
    """LU of a dense (batched) matrix ``K`` of shape ``(*batch, N, N)``, symmetric unless
    ``symmetric=False``. ``pseudo_inverse(Ks, rtol)``, if given, computes the pseudo-inverse
    of the singular symmetric members ``Ks (S, N, N)`` in place of
    :func:`symmetric_pseudo_inverse` (for a structure it can exploit)."""

    def __init__(self, K: torch.Tensor, rtol: float = SINGULAR_RTOL, symmetric: bool = True,
                 pseudo_inverse=None):
        self.order = K.shape[-1]
        self._pinv = None
        if self.order == 0:
            self.singular = torch.zeros(K.shape[:-2], dtype=torch.bool)
            return
        lu, pivots, info = _lu_factor(K)
        diag = lu.diagonal(dim1=-2, dim2=-1).abs()
        scale = abs_max(K, (-2, -1)).clamp_min(torch.finfo(K.dtype).tiny)
        self.singular = (info != 0) | (diag.amin(dim=-1) <= rtol * self.order * scale)
        self._lu, self._pivots = lu, pivots
        if bool(self.singular.any()):
            # pseudo-inverse of the singular members of the batch only, singular values (or
            # eigenvalue magnitudes) below the cutoff dropped
            self._members = self.singular.reshape(-1).nonzero().squeeze(-1)
            Ks = K.reshape(-1, self.order, self.order)[self._members]
            rel = pseudo_inverse_rtol(K.dtype, self.order)
            if symmetric:
                self._pinv = (pseudo_inverse or symmetric_pseudo_inverse)(Ks, rel)
            else:
                self._pinv = torch.linalg.pinv(Ks, rtol=rel)

    def solve(self, rhs: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``K⁻¹ rhs`` (``K⁺ rhs`` where ``K`` is singular), or with ``transpose``
        ``K⁻ᵀ rhs`` (``(K⁺)ᵀ rhs``); ``rhs`` is ``(*batch, N, k)``."""
        if self.order == 0:
            return rhs
        z = torch.linalg.lu_solve(self._lu, self._pivots, rhs, adjoint=transpose)
        if self._pinv is not None:
            pinv = self._pinv.transpose(-1, -2) if transpose else self._pinv
            flat = z.reshape(-1, *z.shape[-2:])
            z = flat.index_copy(  # the singular members' rows replaced, out of place
                0, self._members, pinv @ rhs.expand_as(z).reshape(flat.shape)[self._members]
            ).reshape(z.shape)
        return z


def abs_max(t: torch.Tensor, dim) -> torch.Tensor:
    """``|t|.amax(dim)`` without the temporary ``|t|``: on a batch's matrices a fresh
    temporary of their size is what costs (W4's 64 matrices of order 157, 13 MB: 3.7 ms
    with the page faults of a new allocation, against 0.2 ms for the two reductions)."""
    return torch.maximum(t.amax(dim), -t.amin(dim))


def pseudo_inverse_rtol(dtype: torch.dtype, order: int) -> float:
    """The relative cutoff below which singular values (eigenvalue magnitudes) of singular
    matrices of order ``N`` are dropped from their pseudo-inverse: ``1e3 · ε · N``."""
    return 1e3 * torch.finfo(dtype).eps * order


def _lu_factor(K: torch.Tensor):
    """``torch.linalg.lu_factor_ex(K)``, working around a CPU bug of batched LU.

    After ``torch.set_num_threads(k)``, torch 2.13's MKL build factors batches of matrices
    of order ≥ about 150 wrongly: out-of-range pivots (MKL prints "Parameter 6 was incorrect
    on entry to DLASWP") or a hang. One matrix at a time is unaffected, and takes 0.8–1.7×
    the batched time at these orders (measured, 2 cores), so on CPU matrices of order
    ≥ ``LOOPED_LU_MIN_ORDER`` are factored one by one. Below it the batched pivots are
    checked (one O(batch · N) pass) and the batch is factored one by one if they are not a
    valid permutation record."""
    cpu_batch = K.device.type == "cpu" and K.dim() > 2 and K.numel() > 0
    if not cpu_batch or K.shape[-1] < LOOPED_LU_MIN_ORDER:
        lu, pivots, info = torch.linalg.lu_factor_ex(K)
        if not cpu_batch or not bool(((pivots < 1) | (pivots > K.shape[-1])).any()):
            return lu, pivots, info
    flat = K.reshape(-1, *K.shape[-2:])
    S, N = flat.shape[0], flat.shape[-1]
    # each factor written in place into one column-major batch (LAPACK's layout), not
    # concatenated afterwards: W4's 64 matrices of order 157, 48 -> 34 ms
    lu = flat.new_empty(S, N, N).mT
    pivots = torch.empty(S, N, dtype=torch.int32, device=K.device)
    info = torch.empty(S, dtype=torch.int32, device=K.device)
    for i in range(S):
        torch.linalg.lu_factor_ex(flat[i], out=(lu[i], pivots[i], info[i]))
    batch = K.shape[:-2]
    return lu.reshape(*batch, N, N), pivots.reshape(*batch, N), info.reshape(batch)


def slots(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each member's marked entries gathered first into ``k = max_b #mask_b`` slots:
    ``index (S, k)``, the first ``k`` entries of a permutation that puts ``mask[b]``'s
    marked positions first (in order, so the indices are distinct), and ``used (S, k)``,
    whether slot ``j`` holds a marked entry (a member with fewer fills its last slots with
    unmarked ones). The batched KKT systems, their pseudo-inverses and the box QP solver
    gather their active rows or free variables so."""
    k = int(mask.sum(-1).max()) if mask.numel() else 0
    index = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[:, :k]
    return index, mask.gather(1, index)


def symmetric_pseudo_inverse(K: torch.Tensor, rtol: float) -> torch.Tensor:
    """Moore–Penrose pseudo-inverse of symmetric matrices ``K (S, N, N)`` from ``eigh``,
    eigenvalues below ``rtol`` times the largest magnitude dropped.

    A row equal to the unit vector ``e_iᵀ`` (by symmetry, so is column ``i``) is a 1×1 block
    of ``K`` with ``K⁺ = 1`` there, and the batched KKT systems decouple their inactive rows
    exactly so. ``eigh`` (about 9 N³ operations) therefore runs on the other rows only: each
    member's coupled rows first, cut at the batch's largest count (a member with fewer keeps
    some unit rows in its block, which is exact too)."""
    S, N, _ = K.shape
    eye = torch.eye(N, dtype=K.dtype, device=K.device)
    unit = (K == eye).all(-1)
    rows, _ = slots(~unit)
    coupled = rows.shape[-1]
    entries = (rows.unsqueeze(-1) * N + rows.unsqueeze(-2)).reshape(S, -1)  # block's (i, j)
    block = K.reshape(S, N * N).gather(1, entries).reshape(S, coupled, coupled)
    w, V = torch.linalg.eigh(block)
    top = torch.maximum(w.abs().amax(-1), unit.any(-1).to(K.dtype))  # unit rows: eigenvalue 1
    inv_w = torch.where(w.abs() > rtol * top.unsqueeze(-1), 1.0 / w, torch.zeros_like(w))
    block_pinv = ((V * inv_w.unsqueeze(-2)) @ V.mT).reshape(S, -1)
    return eye.expand(S, N, N).reshape(S, N * N).scatter(1, entries, block_pinv).reshape(S, N, N)


class SparseFactorization:
    """SuperLU of a sparse matrix (symmetric for the KKT systems, any square matrix for the
    conic residual map), with an LSMR minimum-norm fallback. ``pivot_ratio`` is
    ``min |U_ii| / max |U_ii|`` (0 where the factorization failed), a cheap conditioning
    indicator."""

    def __init__(self, K: sp.spmatrix, rtol: float = SINGULAR_RTOL):
        self.order = K.shape[0]
        self._K = sp.csc_matrix(K)
        self._lu = None
        self.pivot_ratio = 0.0
        try:
            lu = spla.splu(self._K)
            diag = np.abs(lu.U.diagonal())
            scale = max(abs(self._K).max(), np.finfo(float).tiny)
            self.pivot_ratio = float(diag.min(initial=np.inf) / diag.max(initial=1.0))
            if diag.min(initial=np.inf) > rtol * self.order * scale:
                self._lu = lu
        except RuntimeError:  # "Factor is exactly singular"
            pass
        self.singular = self._lu is None

    def solve(self, rhs: np.ndarray, transpose: bool = False) -> np.ndarray:
        """``K⁻¹ rhs`` (``K⁻ᵀ rhs`` with ``transpose``) column by column; the minimum-norm
        least-squares solution where ``K`` is singular."""
        rhs = np.asarray(rhs, dtype=np.float64)
        if self.order == 0:
            return rhs
        if self._lu is not None:
            return self._lu.solve(rhs, trans="T" if transpose else "N")
        op = self._K.T if transpose else self._K
        cols = rhs.reshape(self.order, -1)
        out = np.column_stack([
            spla.lsmr(op, col, atol=1e-14, btol=1e-14, maxiter=20 * self.order)[0]
            for col in cols.T
        ])
        return out.reshape(rhs.shape)


class SymmetricSystem:
    """Uniform numpy front for either variant: ``solve(b)`` with ``b`` of shape (N,) or (N, k)."""

    def __init__(self, K):
        if sp.issparse(K) and K.shape[0] > DENSE_MAX_ORDER:
            self._impl = SparseFactorization(K)
            self.singular = self._impl.singular
            self._dense = False
        else:
            dense = K.toarray() if sp.issparse(K) else np.asarray(K)
            self._impl = DenseFactorization(torch.as_tensor(dense, dtype=torch.float64))
            self.singular = bool(self._impl.singular)
            self._dense = True
        self.order = K.shape[0]

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        rhs = np.asarray(rhs, dtype=np.float64)
        if not self._dense:
            return self._impl.solve(rhs)
        b = torch.as_tensor(rhs.reshape(self.order, -1))
        return self._impl.solve(b).numpy().reshape(rhs.shape)


def factorize_symmetric(K) -> SymmetricSystem:
    """Factorize a symmetric matrix (dense array or scipy.sparse) once for repeated solves."""
    return SymmetricSystem(K)
