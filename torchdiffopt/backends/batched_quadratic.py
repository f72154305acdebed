"""Quadratic backend, batched and dense, in torch (CPU or CUDA).

The same mathematics as :mod:`torchdiffopt.backends.quadratic` (read its docstring for the
internal problem, the sign conventions and the forward / reverse formulas), for a batch of
``B`` problems sharing their sizes but not their active sets. Each member's active rows
(constraints and finite variable bounds; inactive rows have ``dμ_i = 0``) are gathered by a
selection matrix ``S_b (k, M)``, one row ``e_iᵀ`` per active row ``i``, into
``k = max_b #active_b`` slots; a member with fewer active rows fills its last slots with
zero rows of ``S_b``, which ``K_b`` decouples with a 1 on the diagonal::

    K_b = [[P_b,        (S_b C_b)ᵀ],
           [S_b C_b,    diag(1 - s_b)]]         s_b ∈ {0, 1}ᵏ: the used slots

A multiplier tangent is ``dμ = S_bᵀ dμ_slots``. Gathering keeps ``K_b`` of order ``n + k``
rather than ``n + M``: on W3 (shortest path, M = 104 rows, n = 40) that is about 85 instead
of 144. ``K_b`` is symmetric, so one factorization per solve
(:class:`ActiveSetFactorization`: the Schur complement of ``P_b`` by two batched Cholesky
factorizations where ``P_b ≻ 0``, a batched LU otherwise) serves forward mode, reverse mode,
``layer.jacobian`` and every direction. All operations on tangents and cotangents are plain
torch ops, so ``torch.func`` transforms (vmap, jacfwd, jacrev) of them work.
"""

from __future__ import annotations

import numpy as np
import torch

from ..folding import is_transformed, solve_columns
from ..linalg.factorization import (DenseFactorization, pseudo_inverse_rtol, slots,
                                    symmetric_pseudo_inverse)
from .quadratic import ACTIVE_RTOL, WEAK_RTOL, bound_rows


def with_bound_rows(C, c0, sense, lb, ub):
    """``(C_all, c0_all, sense_all)``: the constraint rows ``(B, m, n)`` followed by one unit
    row per finite variable bound (:func:`~torchdiffopt.backends.quadratic.bound_rows`)."""
    B, _, n = C.shape
    b_cols, b_c0, b_sense = bound_rows(lb, ub)
    if not len(b_cols):  # no finite bound: the rows as they are, no copy
        return C, c0, torch.as_tensor(np.asarray(sense), device=C.device)
    E = torch.zeros(len(b_cols), n, dtype=C.dtype, device=C.device)
    E[torch.arange(len(b_cols)), torch.as_tensor(b_cols, dtype=torch.long)] = 1.0
    C_all = torch.cat((C, E.expand(B, -1, -1)), dim=1)
    c0_all = torch.cat((c0, torch.as_tensor(b_c0, dtype=c0.dtype, device=c0.device)
                        .expand(B, -1)), dim=1)
    sense_all = torch.as_tensor(np.concatenate((sense, b_sense)), device=C.device)
    return C_all, c0_all, sense_all


def _amax(t: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """``t.amax(-1)``, zero for an empty last dimension (a problem without rows)."""
    if t.shape[-1]:
        return t.amax(-1, keepdim=keepdim)
    return t.new_zeros(*t.shape[:-1], *((1,) if keepdim else ()))


class KKTBlocks:
    """The KKT matrices ``K = [[P, Gᵀ], [G, diag(1 − used)]]`` of :class:`BatchedQuadraticKKT`
    held as their blocks: ``P (S, n, n)``, the active rows in slots ``G (S, k, n)`` (zero on
    unused slots) and ``used (S, k)``. ``K`` itself (order ``n + k``) is assembled only for
    the members that need it whole (an LU, a general pseudo-inverse): allocating and
    filling it for every member cost W3 (256 members of order 104) 20 ms a call.

    ``full`` says that every slot is used (``D = 0``: always so for a single problem), where
    the products skip the ``D`` block: at small sizes each torch operation costs more than
    its arithmetic."""

    def __init__(self, P: torch.Tensor, G: torch.Tensor, used: torch.Tensor,
                 full: bool | None = None):
        self.P, self.G, self.used = P, G, used
        self.n, self.k = G.shape[-1], G.shape[-2]
        self.full = bool(used.all()) if full is None else full

    @classmethod
    def of_dense(cls, K: torch.Tensor, n: int) -> "KKTBlocks":
        """The blocks of assembled matrices ``K (S, n + k, n + k)``."""
        return cls(K[:, :n, :n], K[:, n:, :n], 1.0 - K[:, n:, n:].diagonal(dim1=-2, dim2=-1))

    def __len__(self) -> int:
        return len(self.P)

    def members(self, idx: torch.Tensor | None) -> "KKTBlocks":
        """The members ``idx`` (all for None or a full index, without a copy)."""
        if idx is None or len(idx) == len(self):
            return self
        return KKTBlocks(self.P[idx], self.G[idx], self.used[idx], True if self.full else None)

    @property
    def order(self) -> int:
        return self.n + self.k

    def dense(self) -> torch.Tensor:
        """``K (S, n + k, n + k)``."""
        top = torch.cat((self.P, self.G.mT), -1)
        return torch.cat((top, torch.cat((self.G, self.D), -1)), -2)

    @property
    def D(self) -> torch.Tensor:
        """``diag(1 − used) (S, k, k)``."""
        if self.full:
            return self.G.new_zeros(len(self), self.k, self.k)
        return torch.diag_embed(1.0 - self.used)

    def __matmul__(self, z: torch.Tensor) -> torch.Tensor:
        """``K z`` for ``z (S, n + k, c)``, block by block."""
        z_x, z_y = z[..., :self.n, :], z[..., self.n:, :]
        rows = self.G @ z_x
        if not self.full:
            rows = rows + (1.0 - self.used).unsqueeze(-1) * z_y
        return torch.cat((self.P @ z_x + self.G.mT @ z_y, rows), dim=-2)


def _scalar_objective(P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(γ, scalar)`` for ``P (S, n, n)``: ``scalar`` marks the members with ``P = γI``,
    ``γ = P₀₀ ≥ 0`` (LPs and their ridge smoothing), whose KKT matrices have the structure
    :func:`_kkt_pseudo_inverse` and :class:`ActiveSetFactorization` exploit."""
    S, n = P.shape[:2]
    gamma = P[:, 0, 0] if n else P.new_zeros(S)
    if n > 1 and not bool((P[:, 0, 1] == 0).any()):  # a dense P: no member has P = γI
        return gamma, torch.zeros(S, dtype=torch.bool, device=P.device)
    eye = torch.eye(n, dtype=P.dtype, device=P.device)
    return gamma, (P == gamma.reshape(S, 1, 1) * eye).flatten(1).all(-1) & (gamma >= 0)


def _kkt_pseudo_inverse(K: KKTBlocks, rtol: float):
    """Moore–Penrose pseudo-inverse of singular KKT matrices ``K`` (:class:`KKTBlocks`) as
    built by :class:`BatchedQuadraticKKT`: a matrix where no member has ``P = γI``, a
    :class:`ScalarKKTPseudoInverse` where every member has, a :class:`MixedKKTPseudoInverse`
    otherwise (the latter two applied with ``@`` like a matrix, with ``singular`` flags).

    Where ``P = γI`` with ``γ ≥ 0`` (an LP, or the ridge-smoothed LPs of decision-focused
    learning; singular at a degenerate vertex), ``K = [[γI, Gᵀ], [G, D]]`` with
    ``D = diag(1 − s)`` zero on the rows of ``G`` that are not zero. With the SVD
    ``G = U Σ Vᵀ`` restricted to the r singular values above the cutoff, ``K`` splits into
    2×2 blocks ``[[γ, σ], [σ, 0]]`` (inverse ``[[0, 1/σ], [1/σ, −γ/σ²]]``), ``γ`` on the
    null space of ``G`` and ``D``, so::

        K⁺ = [[(I − V Vᵀ)/γ,  V Σ⁻¹ Uᵀ        ],
              [U Σ⁻¹ Vᵀ,      D − γ U Σ⁻² Uᵀ ]]          ((I − V Vᵀ)/γ read as 0 for γ = 0)

    One decomposition of ``G`` (k × n) replaces the eigendecomposition of ``K``: its SVD
    (2.6× faster on W3, k = 64, n = 40), or the cheaper ones of
    :func:`_scalar_kkt_pseudo_inverse` where they are accurate. Other members go through
    :func:`~torchdiffopt.linalg.factorization.symmetric_pseudo_inverse`."""
    P = K.P
    gamma, scalar = _scalar_objective(P)
    if bool(scalar.all()):
        return _scalar_kkt_pseudo_inverse(K, gamma, rtol)
    if not bool(scalar.any()):
        return symmetric_pseudo_inverse(K.dense(), rtol)
    out = P.new_empty(len(K), K.order, K.order)
    general, ridge = (~scalar).nonzero().squeeze(-1), scalar.nonzero().squeeze(-1)
    out[general] = symmetric_pseudo_inverse(K.members(general).dense(), rtol)
    ridge_pinv = _scalar_kkt_pseudo_inverse(K.members(ridge), gamma[ridge], rtol)
    out[ridge] = ridge_pinv.dense()
    singular = torch.ones(len(K), dtype=torch.bool, device=P.device)
    singular[ridge] = ridge_pinv.singular
    return MixedKKTPseudoInverse(out, singular)


class MixedKKTPseudoInverse:
    """``K⁺`` of a batch with both kinds of members, as a matrix ``(S, n + k, n + k)``, with
    the singular flags its :class:`ScalarKKTPseudoInverse` members found (the general
    members are flagged singular: they reach a pseudo-inverse only as such)."""

    def __init__(self, matrix: torch.Tensor, singular: torch.Tensor):
        self.matrix, self.singular = matrix, singular

    def __matmul__(self, rhs: torch.Tensor) -> torch.Tensor:
        return self.matrix @ rhs

    def transpose(self, *dims):
        """``K⁺`` is symmetric: itself."""
        return self

    def dense(self) -> torch.Tensor:
        return self.matrix


class ScalarKKTPseudoInverse:
    """``K⁺`` of :func:`_kkt_pseudo_inverse` for ``P = γI``, kept as its factors and applied
    block by block: with ``Y = U Σ⁻¹`` (k × n, zero beyond the rank), ``V`` (n × n, zero
    beyond the rank; None for the identity, where every ``G`` has full column rank), ``d``
    the diagonal of ``D`` and ``t = Yᵀ r_y``::

        K⁺ [r_x; r_y] = [V t + (r_x − V Vᵀ r_x)/γ;   Y Vᵀ r_x + d ∘ r_y − γ Y t]

    (the first term's ``1/γ`` read as 0 for γ = 0). A dense ``K⁺`` would be written and read
    whole, ``(n + k)²`` entries a member against ``n (n + k)`` here: building it took 35 of
    the 86 ms of W3's pseudo-inverses (256 members, n = 40, k = 64).

    ``singular (S,)``: members whose ``K`` is singular at the rank ``r`` kept: ``r`` below
    the number of used rows (``d = 0``) or, for γ = 0, below ``n``; elsewhere
    ``K⁺ = K⁻¹``."""

    def __init__(self, V, Y, d, gamma, rank):
        self.V, self.Y, self.d = V, Y, d.unsqueeze(-1)
        self.gamma = gamma.reshape(-1, 1, 1)
        self.n = Y.shape[-1]
        self.singular = (rank < (d == 0).sum(-1)) | ((gamma == 0) & (rank < self.n))
        self.inv_gamma = torch.where(self.gamma > 0, 1.0 / torch.where(
            self.gamma > 0, self.gamma, 1.0), 0.0)

    def __matmul__(self, rhs: torch.Tensor) -> torch.Tensor:
        """``K⁺ rhs`` for ``rhs (S, n + k, c)``."""
        n = self.n
        r_x, r_y = rhs[..., :n, :], rhs[..., n:, :]
        t = self.Y.mT @ r_y
        if self.V is None:  # V = I: every member's G has full column rank
            top, Vt_rx = t, r_x
        else:
            Vt_rx = self.V.mT @ r_x
            top = self.V @ t + self.inv_gamma * (r_x - self.V @ Vt_rx)
        bottom = self.Y @ (Vt_rx - self.gamma * t) + self.d * r_y
        return torch.cat((top, bottom), dim=-2)

    def transpose(self, *dims):
        """``K⁺`` is symmetric: itself."""
        return self

    def dense(self) -> torch.Tensor:
        """``K⁺`` as a matrix ``(S, n + k, n + k)``."""
        k = self.Y.shape[-2]
        eye = torch.eye(self.n + k, dtype=self.Y.dtype, device=self.Y.device)
        return self @ eye.expand(len(self.Y), -1, -1)


#: largest ‖G⁺G − I‖∞ accepted from the Cholesky (normal-equations) pseudo-inverse of
#: :func:`_scalar_kkt_pseudo_inverse`; members above it take the SVD
LEFT_INVERSE_TOL = 1e-10


def _scalar_kkt_pseudo_inverse(K: KKTBlocks, gamma, rtol) -> ScalarKKTPseudoInverse:
    """The ``P = γI`` case of :func:`_kkt_pseudo_inverse` for every member of ``K``.

    At a degenerate vertex the active rows ``G`` (k × n, k > n) usually have full column
    rank: ``V Vᵀ = I``, ``G⁺ = (GᵀG)⁻¹Gᵀ`` and ``Y = G⁺ᵀ``, so ``K⁺`` needs one
    Cholesky factorization of the n × n Gram matrix instead of an SVD (W3, k = 64, n = 40:
    an SVD costs 0.19 ms a member). The normal equations square the condition number, so
    that result is kept only where it is a left inverse to ``LEFT_INVERSE_TOL``
    (‖G⁺G − I‖∞, a check of one product); the other members, and rank-deficient ``G``, take
    the eigendecomposition of the Gram matrix ``GᵀG``
    (:func:`_gram_kkt_pseudo_inverse`), checked by the Penrose conditions, and those it
    cannot resolve the SVD."""
    # contiguous: LAPACK on strided views runs about twice as slow
    # (members are copied out only where a step leaves some behind: at W3's sizes each
    # copy of G is 5 MB, and fresh memory costs more than the arithmetic)
    G, d, n, k = K.G.contiguous(), 1.0 - K.used, K.n, K.k
    S = len(K)
    eye = torch.eye(n, dtype=G.dtype, device=G.device)
    # full column rank needs at least n active rows; the Cholesky test settles the rest
    candidates = ((G != 0).any(-1).sum(-1) >= n).nonzero().squeeze(-1)
    Y_full = None
    if len(candidates):
        Gc = _members(G, candidates)
        L, info = torch.linalg.cholesky_ex(Gc.mT @ Gc)
        # a rank-deficient G (dependent columns: a cycle of free edges in W3's QPTL) shows
        # in the pivots; its members go on to the Gram matrix without a solve and a check
        factored = ((info == 0) & _well_pivoted(L)).nonzero().squeeze(-1)
        candidates, Gc, L = (_members(t, factored) for t in (candidates, Gc, L))
        # Y = G⁺ᵀ = G (GᵀG)⁻¹ = G L⁻ᵀ L⁻¹: two triangular solves from the right
        Y_full = torch.linalg.solve_triangular(
            L, torch.linalg.solve_triangular(L.mT, Gc, upper=True, left=False),
            upper=False, left=False)
        left_error = (Y_full.mT @ Gc - eye).abs().amax((-2, -1))
        accepted = (left_error <= LEFT_INVERSE_TOL).nonzero().squeeze(-1)
        candidates, Y_full = _members(candidates, accepted), _members(Y_full, accepted)
    n_full = 0 if Y_full is None else len(candidates)
    if n_full == S:
        return ScalarKKTPseudoInverse(None, Y_full, d, gamma, torch.full(
            (S,), n, dtype=torch.long, device=G.device))
    full_rank = torch.zeros(S, dtype=torch.bool, device=G.device)
    if n_full:
        full_rank[candidates] = True
    rest = (~full_rank).nonzero().squeeze(-1)
    V_rest, Y_rest, rank_rest, by_gram = _gram_kkt_pseudo_inverse(_members(G, rest), rtol)
    if n_full == 0 and bool(by_gram.all()):
        return ScalarKKTPseudoInverse(V_rest, Y_rest, d, gamma, rank_rest)
    V = eye.expand(S, n, n).clone()
    Y = G.new_zeros(S, k, n)
    rank = torch.full((S,), n, dtype=torch.long, device=G.device)
    if n_full:
        Y[candidates] = Y_full
    accepted = rest[by_gram]
    V[accepted], Y[accepted] = V_rest[by_gram], Y_rest[by_gram]
    rank[accepted] = rank_rest[by_gram]
    left = rest[~by_gram]
    if len(left):
        V[left], Y[left], rank[left] = _svd_kkt_pseudo_inverse(G[left], rtol)
    return ScalarKKTPseudoInverse(V, Y, d, gamma, rank)


#: largest ‖G G⁺ G − G‖ / ‖G‖ and ‖G⁺ G G⁺ − G⁺‖ / ‖G⁺‖ (entrywise maxima) accepted from the
#: Gram-matrix pseudo-inverse of :func:`_gram_kkt_pseudo_inverse`; members above it take
#: the SVD
PENROSE_TOL = 1e-10


def _gram_kkt_pseudo_inverse(G, rtol):
    """The factors ``V, Y`` of :class:`ScalarKKTPseudoInverse` from the eigendecomposition
    of the Gram matrix ``GᵀG = V Λ Vᵀ`` (n × n) instead of the SVD of ``G``: ``Σ² = Λ`` on
    the kept eigenvalues, ``Y = U Σ⁻¹ = G V Λ⁻¹`` and ``G⁺ = V Yᵀ``. On W3's QPTL members (64
    slots, 40 variables, both rows and columns dependent) that takes 36 ms for 256 members
    where the SVD takes 86. Squaring the singular values loses those below about 1e-6 of the
    largest in ``Λ``'s round-off, so eigenvalues below ``1e3 · ε · n · λ_max`` are dropped,
    and a member is kept only where that decision is the SVD's, ``‖G v_j‖ ≤ rtol · σ_max``
    for every dropped eigenvector ``v_j`` (``‖G v_j‖`` is its singular value, computed from
    ``G`` itself), and where the result satisfies the Penrose conditions ``G G⁺ G = G`` and
    ``G⁺ G G⁺ = G⁺`` to :data:`PENROSE_TOL` (which an inaccurate small kept eigenvalue
    violates). Returns ``V``, ``Y``, the rank kept and the mask of accepted members."""
    n = G.shape[-1]
    lam, V = torch.linalg.eigh(G.mT @ G)
    top = lam[..., -1:].clamp_min(torch.finfo(G.dtype).tiny)
    kept = lam > 1e3 * torch.finfo(G.dtype).eps * n * top

    def size(M):  # entrywise maximum of |M| (two reductions, no |M| allocated), zero if empty
        if M.shape[-1] * M.shape[-2] == 0:
            return M.new_zeros(M.shape[:-2])
        return torch.maximum(M.amax((-2, -1)), -M.amin((-2, -1)))

    dropped = _amax(torch.linalg.vector_norm(G @ (V * ~kept.unsqueeze(-2)), dim=-2))
    V = V * kept.unsqueeze(-2)
    Y = G @ (V * torch.where(kept, 1.0 / torch.where(kept, lam, 1.0), 0.0).unsqueeze(-2))
    G_pinv = V @ Y.mT
    H = G_pinv @ G  # n × n: both Penrose conditions from it, G H = G and H G⁺ = G⁺
    tiny = torch.finfo(G.dtype).tiny
    accepted = ((dropped <= rtol * top.squeeze(-1).sqrt())
                & (size(torch.baddbmm(G, G, H, beta=-1.0))
                   <= PENROSE_TOL * size(G).clamp_min(tiny))
                & (size(torch.baddbmm(G_pinv, H, G_pinv, beta=-1.0))
                   <= PENROSE_TOL * size(G_pinv).clamp_min(tiny)))
    return V, Y, kept.sum(-1), accepted


def _svd_kkt_pseudo_inverse(G, rtol):
    """The factors ``V, Y`` of :class:`ScalarKKTPseudoInverse` from the SVD of the active
    rows ``G``, singular values below ``rtol`` times the largest dropped, and the rank kept;
    zero columns pad both to ``n`` where ``G`` has fewer rows than columns."""
    k, n = G.shape[-2:]
    U, sigma, Vh = torch.linalg.svd(G, full_matrices=False)
    kept = sigma > rtol * _amax(sigma, keepdim=True).clamp_min(torch.finfo(G.dtype).tiny)
    inv_sigma = torch.where(kept, 1.0 / torch.where(kept, sigma, 1.0), 0.0)
    V = Vh.mT * kept.unsqueeze(-2)
    Y = U * inv_sigma.unsqueeze(-2)                       # U Σ⁻¹ on the kept columns
    pad = n - V.shape[-1]
    return (torch.nn.functional.pad(V, (0, pad)), torch.nn.functional.pad(Y, (0, pad)),
            kept.sum(-1))


#: a Cholesky factor ``L`` is trusted for the Schur-complement solve of
#: :class:`ActiveSetFactorization` when ``(min L_ii / max L_ii)² ≥ SCHUR_PIVOT_RTOL``
#: (roughly, a condition number below 1e10); other members are factored by LU
SCHUR_PIVOT_RTOL = 1e-10
#: the same test on the ``L_ii`` themselves: ``min ≥ √SCHUR_PIVOT_RTOL · max``
_SCHUR_PIVOT_RATIO = SCHUR_PIVOT_RTOL ** 0.5


class ActiveSetFactorization:
    """The KKT matrices ``K_b = [[P_b, G_bᵀ], [G_b, D_b]]`` of :class:`BatchedQuadraticKKT`
    (``G_b`` the active rows in ``k`` slots, ``D_b = diag(1 − s_b)`` 1 on the unused slots),
    given as :class:`KKTBlocks`, factored once for many solves. ``pseudo_inverse(K, rtol)``
    takes the blocks of singular members. Each member takes one of four ways:

    * where ``P_b ≻ 0`` and the used rows of ``G_b`` are independent, the Schur complement
      of ``P_b``, as OptNet's solver does: with ``P = L Lᵀ`` and ``W = L⁻¹ Gᵀ``, the
      complement is ``D − G P⁻¹ Gᵀ = Σ N`` with ``N = WᵀW + D ≻ 0`` and
      ``Σ = diag(+1 unused, −1 used)`` (``W``'s unused columns are zero, so ``N`` and ``Σ``
      commute), and::

          K [x; v] = [r₁; r₂]:   t = L⁻¹ r₁,   v = N⁻¹ Σ (r₂ − Wᵀ t),   x = L⁻ᵀ (t − W v).

      Two batched Cholesky factorizations of orders n and k replace an LU of order n + k
      (which on the CPU must go one matrix at a time from order 128 on, see
      :func:`~torchdiffopt.linalg.factorization.DenseFactorization`); each solve takes one
      step of iterative refinement against ``K``, which keeps it as accurate as LU when
      ``P`` is ill-conditioned;
    * where more rows are active than there are variables, the rows are dependent and ``K``
      is singular whatever ``P``: the ``pseudo_inverse`` given, without an LU first (the
      degenerate vertices of decision-focused LPs, W3: 64 active rows on 40 variables);
    * members of ``pinv_unless_schur`` (those with ``P = γI``, ``γ > 0``: the Schur
      complement fails only where the used rows are dependent or nearly so) that the Schur
      complement does not take: the ``pseudo_inverse``, which equals the inverse where
      ``K`` is regular (W3's QPTL: 52 of 256 members, an LU of order 104 saved);
    * the others (LPs at a vertex, singular ``P``, poorly conditioned factors):
      :class:`~torchdiffopt.linalg.factorization.DenseFactorization` with the same
      ``pseudo_inverse``, which judges singularity on the LU pivots.

    Degenerate members get the same minimum-norm solutions either way. (A badly scaled
    member, e.g. ``P`` near 1e6 against rows near 1, that passes the pivot tests is solved
    accurately by the Schur complement where LU's pivot test would call it singular.)
    ``solve`` takes ``(B, n + k, c)``; ``P_cholesky``, if given, is the Cholesky factor of
    every member's ``P``."""

    def __init__(self, K: KKTBlocks, pseudo_inverse,
                 pinv_unless_schur: torch.Tensor | None = None,
                 P_cholesky: torch.Tensor | None = None):
        self._pseudo_inverse, self._n = pseudo_inverse, K.n
        # the pseudo-inverse in DenseFactorization's form (None: its default)
        self._dense_pinv = None if pseudo_inverse is None else self._dense_pseudo_inverse
        n, used = K.n, K.used
        dependent = used.sum(-1) > n
        # (a caller that factored every member's P already, as the convexity test does,
        # hands the factor on)
        if P_cholesky is None:
            L, info = torch.linalg.cholesky_ex(K.P)
        else:
            L, info = P_cholesky, torch.zeros(len(K), dtype=torch.int32, device=K.P.device)
        schur = (info == 0) & _well_pivoted(L) & ~dependent
        candidates = schur.nonzero().squeeze(-1)
        if len(candidates):
            Kc, L = K.members(candidates), _members(L, candidates)
            W = torch.linalg.solve_triangular(L, Kc.G.mT, upper=False)
            LN, info = torch.linalg.cholesky_ex(W.mT @ W if Kc.full else
                                                torch.baddbmm(Kc.D, W.mT, W))
            ok = ((info == 0) & _well_pivoted(LN)).nonzero().squeeze(-1)
            if len(ok) < len(candidates):
                schur[candidates] = False
                schur[candidates[ok]] = True
            schur_way = _SchurComplement(Kc.members(ok), *(_members(t, ok) for t in (L, W, LN)))
        self._dependent_by_count = dependent
        if pinv_unless_schur is not None:
            dependent = dependent | (pinv_unless_schur & ~schur)
        self.singular = dependent.clone()
        # (members, solve) per way, members None where one way takes the whole batch
        way = torch.where(schur, 0, torch.where(dependent, 2, 1))
        self._ways = []
        for code, (count, make) in enumerate(zip(
                torch.bincount(way, minlength=3).tolist(),
                (lambda Kw, idx: schur_way.solve, self._lu_solver, self._pinv_solver))):
            if count:
                idx = None if count == len(K) else (way == code).nonzero().squeeze(-1)
                self._ways.append((idx, make(K.members(idx), idx)))

    def _dense_pseudo_inverse(self, Ks: torch.Tensor, rtol: float):
        """The ``pseudo_inverse`` on assembled matrices (DenseFactorization's form)."""
        return self._pseudo_inverse(KKTBlocks.of_dense(Ks, self._n), rtol)

    def _lu_solver(self, K: KKTBlocks, idx):
        """The solve of the members ``idx`` (None: all) by LU, singular ones flagged."""
        dense = DenseFactorization(K.dense(), pseudo_inverse=self._dense_pinv)
        if idx is None:
            self.singular = dense.singular
        else:
            self.singular[idx] = dense.singular
        return dense.solve

    def _pinv_solver(self, K, idx):
        """The solve of singular members (and of ``pinv_unless_schur`` members) by their
        pseudo-inverse (the cutoff of :class:`DenseFactorization`). Members are flagged
        singular, unless the pseudo-inverse says which are (a ``singular`` attribute)."""
        K_pinv = self._pseudo_inverse(K, pseudo_inverse_rtol(K.P.dtype, K.order))
        singular = getattr(K_pinv, "singular", None)
        if singular is not None:
            members = slice(None) if idx is None else idx
            self.singular[members] = singular | self._dependent_by_count[members]
        return lambda rhs: K_pinv @ rhs

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """``K⁻¹ rhs`` (``K⁺ rhs`` where ``K`` is singular) for ``rhs (B, n + k, c)``, each
        member by its way."""
        if not self._ways:  # an empty batch
            return rhs
        (idx, solve), *rest = self._ways
        if idx is None:
            return solve(rhs)
        z = rhs.new_zeros(rhs.shape).index_copy(0, idx, solve(rhs[idx]))
        for idx, solve in rest:
            z = z.index_copy(0, idx, solve(rhs[idx]))
        return z


#: right-hand sides of at least this many columns are solved by :class:`_SchurComplement`
#: through the explicit inverse of ``K`` (formed once from the same factors) rather than by
#: triangular solves. Measured as W6's ``vmap(jvp)`` on 2 cores, one path against the other
#: in one process: on 32 systems of order 80 level at 24–40 directions and 15.2 → 14.4 ms at
#: 50 through the inverse; on 16 systems of order about 160 (W1, n = 100) level from 32 to 96
INVERSE_MIN_COLUMNS = 32


class _SchurComplement:
    """The Schur-complement way of :class:`ActiveSetFactorization` for its members: the
    factors ``L`` (of ``P``), ``W = L⁻¹Gᵀ`` and ``L_N`` (of ``N``), and ``K`` itself for the
    refinement step."""

    def __init__(self, K: KKTBlocks, L, W, LN):
        self._K, self.n, self._L, self._W, self._LN = K, K.n, L, W, LN
        self._sigma = None if K.full else (1.0 - 2.0 * K.used).unsqueeze(-1)
        self._inverse = None

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """The Schur-complement solve and one step of iterative refinement against ``K``:
        the complement's rounding error grows with the condition of ``P`` (W2, κ(P) = 1e5:
        solutions to 6e-13, against LU's 4e-15), one refinement step brings it back.

        A right-hand side of :data:`INVERSE_MIN_COLUMNS` columns or more (many directions:
        ``jacfwd`` or ``jacrev`` over every output, folded into the columns by
        :func:`~torchdiffopt.folding.solve_columns`) is multiplied by the explicit inverse
        instead, formed on first use (:meth:`inverse`): a GEMM, where batched triangular
        solves take the columns at a third of the speed. (``jacfwd`` of W1's solution in
        its linear cost, n = 50, batch 32, 1,600 columns: 248 → 150 ms.)"""
        apply = self._apply if rhs.shape[-1] < INVERSE_MIN_COLUMNS else \
            (lambda r: self.inverse() @ r)
        z = apply(rhs)
        return z + apply(rhs - self._K @ z)

    def inverse(self) -> torch.Tensor:
        """``K⁻¹`` from the factors, formed once. With ``P⁻¹ = L⁻ᵀL⁻¹``,
        ``Z = P⁻¹Gᵀ = L⁻ᵀW`` (zero on unused slots) and ``N⁻¹`` from ``L_N``: ``K``'s Schur
        complement is ``D − G P⁻¹ Gᵀ = Σ N``, so::

            K⁻¹ = [[P⁻¹ − Z N⁻¹ Zᵀ,   Z N⁻¹],
                   [N⁻¹ Zᵀ,           Σ N⁻¹]]        (Σ: −1 on used slots, +1 on unused)
        """
        if self._inverse is None:
            # (triangular inverses and products: cholesky_inverse takes 3x as long here)
            L_inv, LN_inv = (torch.linalg.solve_triangular(
                F, torch.eye(F.shape[-1], dtype=F.dtype, device=F.device).expand_as(F),
                upper=False) for F in (self._L, self._LN))
            P_inv, N_inv = L_inv.mT @ L_inv, LN_inv.mT @ LN_inv
            Z = L_inv.mT @ self._W
            ZN = Z @ N_inv
            corner = -N_inv if self._sigma is None else self._sigma * N_inv
            self._inverse = torch.cat((
                torch.cat((torch.baddbmm(P_inv, ZN, Z.mT, alpha=-1.0), ZN), -1),
                torch.cat((ZN.mT, corner), -1)), -2)
        return self._inverse

    def _apply(self, rhs):
        n, W = self.n, self._W
        t = torch.linalg.solve_triangular(self._L, rhs[:, :n], upper=False)
        if self._sigma is None:  # every slot used: Σ = -I
            r = torch.baddbmm(rhs[:, n:], W.mT, t, beta=-1.0)
        else:
            r = self._sigma * torch.baddbmm(rhs[:, n:], W.mT, t, alpha=-1.0)
        v = torch.cholesky_solve(r, self._LN)
        x = torch.linalg.solve_triangular(self._L.mT, torch.baddbmm(t, W, v, alpha=-1.0),
                                          upper=True)
        return torch.cat((x, v), dim=-2)


def _members(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[idx]``, or ``t`` itself where ``idx`` lists every member (no copy)."""
    return t if len(idx) == len(t) else t[idx]


def _well_pivoted(L: torch.Tensor) -> torch.Tensor:
    """Members whose Cholesky factor ``L (B, r, r)`` passes the pivot test of
    :data:`SCHUR_PIVOT_RTOL` (an empty factor passes)."""
    d = L.diagonal(dim1=-2, dim2=-1)
    if d.shape[-1] == 0:
        return torch.ones(d.shape[0], dtype=torch.bool, device=L.device)
    # a NaN pivot fails the comparison, an infinite one (overflow in W^T W) the last test
    d_min, d_max = torch.aminmax(d, dim=-1)
    return (d_min >= _SCHUR_PIVOT_RATIO * d_max) & d_max.isfinite()


#: every data cotangent ``(P̄, q̄, r̄, C̄, c̄0)`` asked for
ALL_COTANGENTS = (True,) * 5


class ActiveSetDerivatives:
    """Forward and reverse mode of a batch of QP solutions through the KKT systems on their
    active sets (the formulas of :mod:`.quadratic`). A subclass builds, per member: the point
    ``x (B, n)``, the multipliers ``mu (B, m)`` of the constraint rows, ``valid (B,)``, the
    active rows (of the ``M`` rows: constraints, then bound rows) in slots,
    ``_slot_rows (B, k)`` with ``_used (B, k)`` (``_all_used`` where every slot is used),
    and ``_factor``, whose ``solve(rhs (B, n + k, c))`` applies ``K⁻¹`` (``K⁺`` where
    singular); and the sizes ``n``, ``m``, ``M``."""

    def _solve(self, rhs_x, rhs_rows):
        """``K⁻¹`` (``K⁺`` where singular) on ``[rhs_x; S rhs_rows]``, returned as the primal
        part and ``Sᵀ`` times the slot part: ``rhs_x (B, …, n)`` and ``rhs_rows (B, …, M)``
        (one trailing vector or a direction dimension before it) give ``(B, …, n)`` and
        ``(B, …, M)``, zero on inactive rows."""
        n = self.n
        vec = rhs_x.dim() == 2
        rx = rhs_x.unsqueeze(-1) if vec else rhs_x.transpose(-1, -2)
        rr = rhs_rows.unsqueeze(-1) if vec else rhs_rows.transpose(-1, -2)
        rows = self._slot_rows.unsqueeze(-1).expand(*rr.shape[:-2], -1, rr.shape[-1])
        used = None if self._all_used else self._used.unsqueeze(-1)
        mask = (lambda t: t) if used is None else (lambda t: t * used)  # noqa: E731
        z = solve_columns(self._factor.solve, torch.cat((rx, mask(rr.gather(-2, rows))), dim=-2))
        z_rows = torch.zeros_like(rr).scatter(-2, rows, mask(z[..., n:, :]))
        z_x = z[..., :n, :]
        if vec:
            return z_x.squeeze(-1), z_rows.squeeze(-1)
        return z_x.transpose(-1, -2), z_rows.transpose(-1, -2)

    # -- forward mode ---------------------------------------------------------------------
    def jvp(self, dP, dq, dr, dC, dc0):
        """Tangents ``(dx (B, D, n), dμ (B, D, m), df (B, D))`` for data tangents with a
        direction dimension: ``dP (B, D, n, n)``, ``dq (B, D, n)``, ``dr (B, D)``,
        ``dC (B, D, m, n)``, ``dc0 (B, D, m)``.

        ``dP`` need not be symmetric: only its symmetric part ``S = ½(dP + dPᵀ)`` enters,
        applied as ``S x = ½(dP x + dPᵀ x)`` and ``xᵀ S x = xᵀ dP x``, so it is never formed.
        The tangents are the largest arrays here (``B D n²``: 32 MB for W6's 50 directions),
        and each of these products reads them once."""
        m = self.m
        x, mu = self.x, self.mu
        # matmul against the point broadcast over the directions, not einsum: under vmap
        # the tangents' vmapped dimension leads physically, and einsum's bmm would need
        # the batch dimension first, a copy of each tangent (W6, 50 directions: 32 MB each);
        # and every product with the point's row, ``dC x`` as ``xᵀ dCᵀ``: under vmap a
        # product with a column vector took twice as long (W6: 1.8–2.1 against 0.8–0.9 ms)
        x_row = x[:, None, None, :]
        dCx = (x_row @ dC.mT).squeeze(-2) + dc0
        dPx = (x_row @ dP.mT).squeeze(-2)
        dPtx = (x_row @ dP).squeeze(-2)
        rhs_x = 0.5 * (dPx + dPtx) + dq + (mu[:, None, None, :] @ dC).squeeze(-2)
        # (bound rows have no tangent; without them, no concatenation: under vmap it copies)
        rhs_rows = dCx if self.M == m else torch.cat(
            (dCx, rhs_x.new_zeros(*rhs_x.shape[:2], self.M - m)), dim=-1)
        # K [dx; dμ] = −[rhs_x; rhs_rows]: the sign joins the mask of failed members, one
        # product instead of two negations of the right-hand sides
        z_x, z_rows = self._solve(rhs_x, rhs_rows)
        df = (0.5 * torch.einsum("bdi,bi->bd", dPx, x) + torch.einsum("bdi,bi->bd", dq, x)
              + dr + torch.einsum("bi,bdi->bd", mu, dCx))
        keep = self.valid.to(x.dtype)
        sign = -keep[:, None, None]
        return z_x * sign, z_rows[..., :m] * sign, df * keep[:, None]

    # -- reverse mode ---------------------------------------------------------------------
    def vjp(self, x_bar, mu_bar=None, f_bar=None, wanted=ALL_COTANGENTS):
        """Data cotangents ``(P̄, q̄, r̄, C̄, c̄0)`` for seeds ``x̄ (B, n)``, ``μ̄ (B, m)`` and
        ``f̄ (B,)`` (None: zero, and its terms skipped); zero for failed members; None for
        those that ``wanted`` (five flags) does not ask for."""
        m, M = self.m, self.M
        x, mu = self.x, self.mu
        B = x_bar.shape[0]
        if mu_bar is None:
            # (a zero seed under a torch.func transform must be wrapped like x̄)
            rows = torch.zeros_like(x_bar[:, :1]).expand(-1, M) if \
                torch._C._functorch.is_functorch_wrapped_tensor(x_bar) else x_bar.new_zeros(B, M)
        else:
            rows = mu_bar if M == m else torch.cat((mu_bar, mu_bar.new_zeros(B, M - m)), -1)
        u, v = self._solve(x_bar, rows)
        u, v = -u, -v[:, :m]
        if not bool(self.valid.all()):
            keep = self.valid.to(x.dtype)
            u, v = u * keep[:, None], v * keep[:, None]
            f_bar = None if f_bar is None else f_bar * keep
        return data_cotangents(x, mu, u, v, f_bar, wanted)


def data_cotangents(x, mu, u, v, f_bar, wanted=ALL_COTANGENTS):
    """The data cotangents ``(P̄, q̄, r̄, C̄, c̄0)`` of :mod:`.quadratic`'s reverse mode from
    the point ``x (B, n)``, the multipliers ``μ (B, m)``, the adjoint solution
    ``K [u; v_𝒜] = −[x̄; μ̄_𝒜]`` (``v (B, m)`` zero off the active rows) and the objective's
    seed ``f̄ (B,)`` (None: zero, and ``r̄`` None); torch tensors or numpy arrays alike.
    Those that ``wanted`` does not ask for are None and not computed: ``P̄`` and ``C̄`` are
    the large ones (B n² and B m n entries), which a layer whose only parameter is the
    linear cost (decision-focused learning) never uses, and which ``jacrev`` would
    materialize once per output entry."""
    if f_bar is None:
        q_bar, a, c0_bar = u, u, v
    else:
        fx = f_bar[:, None] * x
        q_bar, a, c0_bar = u + fx, u + 0.5 * fx, v + f_bar[:, None] * mu
    # P̄ = ½(a xᵀ + x aᵀ) with a = u + ½ f̄ x (symmetric to rounding), C̄ = μ q̄ᵀ + v xᵀ
    P_bar = C_bar = None
    if wanted[0]:
        half_a = 0.5 * a
        P_bar = _rank_two(half_a, x, x, half_a)
    if wanted[3]:
        C_bar = _rank_two(mu, q_bar, v, x)
    return tuple(c if want else None for c, want in zip(
        (P_bar, q_bar, f_bar, C_bar, c0_bar), wanted))


#: largest ``B · r · c`` (members times the entries of each ``r × c`` matrix) for which
#: :func:`_rank_two` forms its two outer products by broadcasting; larger ones go to one
#: matrix product of inner dimension two. (On 2 cores, Intel Xeon: batch 128, n = 10:
#: 20 against 57 µs; batch 1, n = 100: 10 against 12 µs; batch 32, n = 100: 73 against
#: 65 µs; batch 128, n = 100: 550 against 428 µs.)
RANK_TWO_BROADCAST_MAX_ENTRIES = 1 << 16


def _rank_two(a, b, c, d):
    """``a bᵀ + c dᵀ`` for batches of vectors ``a, c (B, r)``, ``b, d (B, c)`` (torch
    tensors or numpy arrays): ``(B, r, c)``. Small ones by broadcasting, larger ones and any
    under a ``torch.func`` transform (``addcmul_`` has no ``vmap`` batching rule: torch
    would run it a slice at a time, with a performance warning) as ``[a, c] [b, d]ᵀ``."""
    if isinstance(a, np.ndarray):
        out = a[..., :, None] * b[..., None, :]
        out += c[..., :, None] * d[..., None, :]
        return out
    if a.shape[0] * a.shape[-1] * b.shape[-1] <= RANK_TWO_BROADCAST_MAX_ENTRIES \
            and not is_transformed(a, b, c, d):
        return (a.unsqueeze(-1) * b.unsqueeze(-2)).addcmul_(c.unsqueeze(-1), d.unsqueeze(-2))
    return torch.stack((a, c), -1) @ torch.stack((b, d), -2)


class BatchedQuadraticKKT(ActiveSetDerivatives):
    """Factorized KKT systems of a batch of QPs at their solutions.

    Inputs (float64, on one device): ``P (B, n, n)``, ``q (B, n)``, ``C (B, m, n)``,
    ``c0 (B, m)``, the row senses ``sense (m,)`` and bounds ``lb, ub (n,)`` (numpy), the
    solver's points ``x (B, n)`` and multipliers ``mu (B, m + n_bound_rows)``, optionally
    an active mask from the solver, and ``valid (B,)``: members whose solve succeeded;
    optionally the Cholesky factor of every member's ``P`` (``P_cholesky``), if the caller
    has one.

    Attributes after construction: ``x`` (polished), ``mu`` (multipliers of the constraint
    rows), ``active`` (B, m), ``singular`` (B,), ``weak`` (B,) and ``kkt_residual`` (B,).
    """

    def __init__(self, P, q, C, c0, sense, lb, ub, x, mu_all, valid, active_hint=None,
                 P_cholesky=None):
        B, n = q.shape
        m = c0.shape[1]
        dev, dt = q.device, q.dtype
        C_all, c0_all, sense_all = with_bound_rows(C, c0, sense, lb, ub)
        sense_all = sense_all.to(dt)
        # (where every member is valid, the masks below are skipped: at small sizes each
        # torch operation costs more than its arithmetic)
        all_valid = bool(valid.all())
        keep = valid.reshape(B, 1)
        if not all_valid:
            # failed members get harmless placeholder data (identity K, zero point)
            x = torch.where(keep, x, 0.0)
            mu_all = torch.where(keep, mu_all, 0.0)

        residual = torch.baddbmm(c0_all.unsqueeze(-1), C_all, x.unsqueeze(-1)).squeeze(-1)
        C_abs = C_all.abs()
        x_size = 1.0 + x.abs().amax(-1, keepdim=True)
        row_scale = 1.0 + c0_all.abs() + C_abs.amax(-1) * x_size
        binding = residual.abs() <= ACTIVE_RTOL * row_scale
        if active_hint is not None:
            binding = binding | active_hint
        equality = sense_all == 0
        active = equality | binding
        if not all_valid:
            active = active & keep
        mu_all = mu_all * active

        M = C_all.shape[1]
        slot_rows, used = slots(active)
        k, used = slot_rows.shape[-1], used.to(dt)
        # S_b as indices: slot j holds row slot_rows[b, j] (a permutation's first k entries,
        # so the rows are distinct), used[b, j] says whether it is an active row
        self._slot_rows, self._used = slot_rows, used
        self._all_used = bool(used.all())
        SC = C_all.gather(1, slot_rows.unsqueeze(-1).expand(B, k, n))
        if not self._all_used:
            SC = SC * used.unsqueeze(-1)
        K = KKTBlocks(P if all_valid else torch.where(
            valid.reshape(B, 1, 1), P, torch.eye(n, dtype=dt, device=dev)), SC, used,
            self._all_used)
        gamma, scalar = _scalar_objective(P)
        ridge = scalar & (gamma > 0) & valid  # P = γI, γ > 0
        self._factor = ActiveSetFactorization(
            K, _kkt_pseudo_inverse, pinv_unless_schur=ridge,
            P_cholesky=P_cholesky if all_valid else None)
        self.singular = self._factor.singular if all_valid else self._factor.singular & valid
        self.n, self.m, self.M = n, m, M

        # Newton polish from the solver's point, kept per member where it is acceptable
        x_new, mu_new = self._solve(-q if all_valid else -q * keep, -c0_all)
        res_new = torch.baddbmm(c0_all.unsqueeze(-1), C_all, x_new.unsqueeze(-1)).squeeze(-1)
        feasible = (sense_all * res_new >= -ACTIVE_RTOL * row_scale).all(-1)
        mu_tol = 1e-7 * (1.0 + _amax(mu_new.abs(), keepdim=True))
        # (a NaN or infinite x_new fails `close`; an infinite multiplier can pass the
        # sign test, hence the test of mu_new)
        dual_ok = (sense_all * mu_new <= mu_tol).all(-1) & mu_new.isfinite().all(-1)
        close = (x_new - x).abs().amax(-1) <= 1e-4 * x_size.squeeze(-1)
        accept = feasible & dual_ok & close & ~self.singular
        if not all_valid:
            accept = accept & valid
        accept_col = accept.reshape(B, 1)
        x = torch.where(accept_col, x_new, x)
        mu_all = torch.where(accept_col, mu_new, mu_all)
        res = torch.where(accept_col, res_new, residual)

        self.valid = valid
        self.x = x
        self.mu_all = mu_all
        self.mu = mu_all[:, :m]
        self.active = active[:, :m]
        mu_abs = mu_all.abs()
        mu_scale = 1.0 + _amax(mu_abs, keepdim=True)
        self.weak = (active & ~equality & (mu_abs <= WEAK_RTOL * mu_scale)).any(-1)

        # relative KKT residual: stationarity, primal and dual feasibility
        Px = (P @ x.unsqueeze(-1)).squeeze(-1)
        stationarity = torch.baddbmm((Px + q).unsqueeze(-1), C_all.mT, mu_all.unsqueeze(-1))
        scale = 1.0 + torch.maximum(torch.maximum(q.abs().amax(-1), Px.abs().amax(-1)),
                                    _amax((C_abs.mT @ mu_abs.unsqueeze(-1)).squeeze(-1)))
        violation = torch.where(equality, res.abs(), torch.relu(-sense_all * res))
        residual = torch.maximum(
            torch.maximum(stationarity.abs().amax((-2, -1)), _amax(torch.relu(sense_all * mu_all)))
            / scale, _amax(violation / row_scale))
        # +inf where NaN (a point that overflowed): no tolerance certifies it
        residual = torch.where(residual.isnan(), torch.inf, residual)
        self.kkt_residual = residual if all_valid else torch.where(valid, residual, 0.0)
