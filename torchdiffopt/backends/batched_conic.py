"""The derivatives of a batch of cone programs, in torch, on the stored entries of ``A``, ``P``.

Every member ``b`` is a cone program of :mod:`torchdiffopt.backends.conic` with the same
sizes, cones and sparsity patterns: ``A`` (m, n) and ``P`` (n, n) are given by value arrays
``A_vals (B, nnz_A)``, ``P_vals (B, nnz_P)`` at fixed ``(rows, cols)`` (repeated pairs add
up; only ``½(P + Pᵀ)`` enters). At a member's refined solution ``z = (u, v)`` with
``D = DΠ_{K*}(v)``, the residual-map Jacobian is ``M = [[P, AᵀD], [-A, I - D]]`` and

* **forward**: ``M dz = -[dP x + dAᵀy + dc ; db - dA x]``, ``dx = du``, ``dy = D dv``,
  ``ds = D dv - dv``;
* **reverse**: ``Mᵀ r = -[x̄ ; D(ȳ + s̄) - s̄]``, ``c̄ = r₁``, ``b̄ = r₂``, and on the stored
  entries ``Ā_e = y_{i_e} r₁_{j_e} - r₂_{i_e} x_{j_e}``,
  ``P̄_e = ½(r₁_{i_e} x_{j_e} + x_{i_e} r₁_{j_e})``.

These right-hand sides and read-outs are torch index operations on the entries, shared by two
ways of holding ``M``:

* :class:`DenseSystems` — for ``n + m`` up to
  :data:`~torchdiffopt.linalg.factorization.DENSE_MAX_ORDER`: the ``(B, N, N)`` tensor of all
  members' ``M``, assembled in torch from the entries and the stacked ``D``, factorized by
  one batched LU (:class:`~torchdiffopt.linalg.factorization.DenseFactorization`; singular
  members get the pseudo-inverse: minimum-norm least-squares derivatives) — of the block
  that is left once the unknowns fixed by active bounds and inactive rows are taken out by
  substitution (:meth:`ResidualJacobians.eliminated`,
  :class:`~torchdiffopt.linalg.elimination.TriangularElimination`). Every operation is
  a torch op, so ``backward``, ``jvp`` and every ``torch.func`` transform work. The solvers'
  points are refined batched too (:func:`refine_dense`): Newton steps with one batched LU of
  ``M`` at the solvers' points, whose factors then solve with ``M`` at the refined points by
  iterative refinement (:class:`NearbySystems`).
* :class:`SparseSystems` — larger programs: each member's
  :class:`~torchdiffopt.backends.conic.ConicDerivative` (sparse LU, LSMR where singular), one
  numpy solve per member; ``backward`` and forward-mode AD, no ``torch.func`` transforms.

Members that failed (``valid`` False) carry zeros and get zero tangents and cotangents.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.sparse as sp
import torch

from ..errors import warn_degenerate
from ..folding import is_transformed
from ..linalg.elimination import TriangularElimination
from ..linalg.factorization import DENSE_MAX_ORDER, DenseFactorization, slots
from ..linalg.threads import take_last
from .cones import project_rows, projection_derivative_blocks
from .conic import newton_refine

_F64 = torch.float64


class ConicPattern:
    """The shared structure of the batch: sizes ``n``, ``m`` and the ``(rows, cols)`` of the
    stored entries of ``A`` and ``P``."""

    def __init__(self, n: int, m: int, A_rows, A_cols, P_rows, P_cols):
        self.n, self.m = n, m
        self.A_rows, self.A_cols = np.asarray(A_rows, np.int64), np.asarray(A_cols, np.int64)
        self.P_rows, self.P_cols = np.asarray(P_rows, np.int64), np.asarray(P_cols, np.int64)
        self._index = {name: torch.as_tensor(getattr(self, name)) for name in
                       ("A_rows", "A_cols", "P_rows", "P_cols")}
        self._csc_layouts: dict = {}
        self._positions = None  # for single_entries

    @property
    def dense(self) -> bool:
        """Whether ``M`` (order ``n + m``) is held densely."""
        return self.n + self.m <= DENSE_MAX_ORDER

    def idx(self, name: str, device) -> torch.Tensor:
        return self._index[name].to(device)

    def matvec(self, vals, rows: str, cols: str, x, size: int) -> torch.Tensor:
        """``(M x)`` for the sparse matrix of entries ``vals (..., nnz)`` at ``(rows, cols)``
        and ``x (..., ·)``: ``out[..., rows_e] += vals_e x[..., cols_e]``."""
        r, c = self.idx(rows, vals.device), self.idx(cols, vals.device)
        prod = vals * take_last(x, c)
        return prod.new_zeros(*prod.shape[:-1], size).index_add(-1, r, prod)

    def csc(self, vals: np.ndarray, which: str) -> sp.csc_matrix:
        """One member's ``A`` (``which="A"``), ``P`` (``"P"``) or the upper triangle of
        ``½(P + Pᵀ)`` (``"P_upper"``) from its stored entries ``vals`` (repeated pairs
        added, explicit zeros kept: every member has the same pattern), in CSC form from a
        layout computed once (scipy's conversion from triplets sorts the entries again for
        every member: 64 of W4's, 3.5 → 0.5 ms)."""
        gather, indices, indptr, shape = self._layout(which)
        return sp.csc_matrix((gather.T @ vals, indices, indptr), shape=shape)

    def csc_entries(self, vals: np.ndarray, which: str) -> tuple[sp.csc_matrix, np.ndarray]:
        """:meth:`csc` for the batch ``vals (B, nnz)``: the first member's matrix (the
        pattern) and every member's CSC entries ``(B, nnz_csc)``, in its ``data`` order."""
        gather, indices, indptr, shape = self._layout(which)
        data = np.ascontiguousarray((gather.T @ vals.T).T)  # each member's row contiguous
        return sp.csc_matrix((data[0], indices, indptr), shape=shape), data

    def _layout(self, which: str):
        """``(gather, indices, indptr, shape)``: the sparse ``(nnz, nnz_csc)`` map from the
        stored entries to the CSC entries (repeated pairs added; ``"P_upper"``: an entry
        off the diagonal gives half to its upper pair) and the CSC pattern."""
        layout = self._csc_layouts.get(which)
        if layout is None:
            kind = which[0]
            rows, cols = getattr(self, f"{kind}_rows"), getattr(self, f"{kind}_cols")
            shape = (self.m, self.n) if kind == "A" else (self.n, self.n)
            weights = np.ones(len(rows))
            if which == "P_upper":
                rows, cols = np.minimum(rows, cols), np.maximum(rows, cols)
                weights[rows != cols] = 0.5
            keys, where = np.unique(cols * shape[0] + rows, return_inverse=True)
            indptr = np.searchsorted(keys // shape[0], np.arange(shape[1] + 1))
            gather = sp.csc_matrix((weights, (np.arange(len(rows)), where.reshape(-1))),
                                   shape=(len(rows), len(keys)))
            layout = self._csc_layouts[which] = (gather, keys % shape[0], indptr, shape)
        return layout

    def single_entries(self, A_vals) -> tuple[torch.Tensor, torch.Tensor]:
        """``(single, column)``, both ``(B, m)``, of the batch's ``A`` from its entries
        ``A_vals (B, nnz)``: whether row ``i`` has exactly one nonzero (repeated pairs
        added first, so entries that cancel count as zero), and that nonzero's column
        where it has, 0 elsewhere."""
        if self._positions is None:  # A's distinct (row, col) pairs: its CSC entries
            gather, indices, indptr, _ = self._layout("A")
            where = gather.tocsr().indices  # each stored entry's CSC slot
            columns = np.repeat(np.arange(self.n), np.diff(indptr))
            self._positions = tuple(torch.as_tensor(a, dtype=torch.int64)
                                    for a in (where, indices, columns))
        where, rows, cols = (t.to(A_vals.device) for t in self._positions)
        B = A_vals.shape[0]
        nonzero = A_vals.new_zeros(B, len(rows)).index_add(1, where, A_vals) != 0
        count = torch.zeros(B, self.m, dtype=torch.int64, device=A_vals.device)
        count.index_add_(1, rows, nonzero.to(torch.int64))
        # the column of a row's one nonzero is the sum of its nonzeros' columns
        column = torch.zeros_like(count).index_add_(1, rows, nonzero * cols)
        single = count == 1
        return single, torch.where(single, column, 0)

    def dense_matrix(self, vals, rows: str, cols: str, shape) -> torch.Tensor:
        """``(B, nnz) → (B, *shape)``, repeated entries added."""
        r, c = self.idx(rows, vals.device), self.idx(cols, vals.device)
        out = vals.new_zeros(vals.shape[0], shape[0] * shape[1])
        return out.index_add(-1, r * shape[1] + c, vals).unflatten(-1, shape)


class BlockDiagonalD:
    """Every member's ``D = DΠ_{K*}(v)``, block diagonal as
    :func:`~torchdiffopt.backends.cones.projection_derivative_blocks` gives it: ``diag (B, m)``
    on the zero and nonnegative rows and dense ``(B, k, d, d)`` blocks for each group of
    ``k`` same-size cones at rows ``idx (k, d)``. Products with it cost ``O(m)`` plus the
    blocks', where the dense ``(B, m, m)`` would cost ``O(m²)`` (W4: 50 nonnegative rows
    beside one second-order cone of 56)."""

    def __init__(self, diag: torch.Tensor, blocks: list):
        self.diag, self.blocks = diag, blocks
        # each group's rows as a slice where they are one run (same-size cones side by
        # side, the common case): slices write blocks 2-3× faster than index lists
        self._spans = [_run(idx) for idx, _ in blocks]

    @classmethod
    def at(cls, V: np.ndarray, dims, device) -> "BlockDiagonalD":
        """``DΠ_{K*}`` at the rows of ``V (B, m)``."""
        diag, blocks = projection_derivative_blocks(V, dims, dual=True)
        tensor = lambda a, dtype=_F64: torch.as_tensor(a, dtype=dtype, device=device)  # noqa: E731
        return cls(tensor(diag), [(tensor(idx, torch.int64), tensor(mats))
                                  for idx, mats in blocks])

    def right_of(self, X: torch.Tensor, transpose: bool = False, out=None) -> torch.Tensor:
        """``X D`` (``X Dᵀ`` with ``transpose``: the rows ``D xᵢ``) for ``X (B, r, m)``;
        with ``out``, written into it (a view of a larger matrix), in place."""
        columns = [span if span is not None else idx.reshape(-1)
                   for (idx, _), span in zip(self.blocks, self._spans)]
        # (a run's columns read as a slice, and the k blocks as one batched matmul:
        # 0.75 -> 0.5 ms against an index list and einsum for W4's elimination blocks)
        parts = [(X[..., cols].unflatten(-1, idx.shape).transpose(-3, -2)
                  @ (mats.mT if transpose else mats)).transpose(-3, -2).flatten(-2)
                 for (idx, mats), cols in zip(self.blocks, columns)]
        out = X * self.diag[:, None, :] if out is None else \
            torch.mul(X, self.diag[:, None, :], out=out)
        for cols, part in zip(columns, parts):
            out[..., cols] = part
        return out

    def identity_minus(self, out: torch.Tensor) -> torch.Tensor:
        """``I - D`` written into ``out (B, m, m)`` (a view of a larger matrix)."""
        out.zero_()
        out.diagonal(dim1=-2, dim2=-1).copy_(1.0 - self.diag)
        for (idx, mats), span in zip(self.blocks, self._spans):
            k, d = idx.shape
            blocks = torch.eye(d, dtype=mats.dtype, device=mats.device) - mats  # (B, k, d, d)
            if span is None:
                out[:, idx[:, :, None], idx[:, None, :]] = blocks
            else:  # the k diagonal (d, d) blocks of the run, as a view
                run = out[:, span, span].unflatten(1, (k, d)).unflatten(3, (k, d))
                run.diagonal(dim1=1, dim2=3).copy_(blocks.permute(0, 2, 3, 1))
        return out

    def row_abs_sums(self) -> torch.Tensor:
        """``Σ_k |D_lk|`` for every row ``l``: ``(B, m)``."""
        out = self.diag.abs()
        for idx, mats in self.blocks:
            out = out.index_copy(-1, idx.reshape(-1), mats.abs().sum(-1).flatten(-2))
        return out


def _taken(t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``t[b][rows[b]][:, cols[b]]`` of every member of ``t (B, R, C)`` (contiguous), for
    ``rows (B, r)`` and ``cols (B, c)``: ``(B, r, c)``, by one index into the flat ``t``
    (W4's ``A``: 0.7 against 1.7 ms for a gather of the rows and one of the columns)."""
    B, R, C = t.shape
    base = torch.arange(B, device=t.device)[:, None, None] * (R * C)
    return t.reshape(-1)[base + rows[:, :, None] * C + cols[:, None, :]]


def _run(idx: torch.Tensor) -> slice | None:
    """``slice(lo, lo + len)`` where the flattened ``idx`` is ``lo, lo + 1, …``, else None."""
    flat = idx.reshape(-1).cpu()
    lo = int(flat[0]) if len(flat) else 0
    return slice(lo, lo + len(flat)) if torch.equal(flat, torch.arange(lo, lo + len(flat))) \
        else None


class ResidualJacobians:
    """Every member's residual-map Jacobian ``M = [[P, AᵀD], [-A, I - D]]`` by its parts:
    ``P (B, n, n)`` (symmetric), ``A (B, m, n)``, ``D`` (:class:`BlockDiagonalD`), and
    ``valid``; a failed (not ``valid``) member's ``M`` is the identity. Products with ``M``
    and ``Mᵀ`` are taken from the parts; the dense ``(B, n + m, n + m)`` is formed only to
    be factorized."""

    def __init__(self, P, A, D: BlockDiagonalD, valid, single_entries):
        self.P, self.A, self.D, self.valid, self.n = P, A, D, valid, P.shape[-1]
        #: ``(single, column)`` of :meth:`ConicPattern.single_entries`, which ``D`` leaves
        self.single_entries = single_entries

    @classmethod
    def of_entries(cls, pattern: ConicPattern, P_vals, A_vals, D: BlockDiagonalD, valid):
        """From the stored entries of ``P`` (symmetrized here) and ``A``."""
        n, m = pattern.n, pattern.m
        P = pattern.dense_matrix(P_vals, "P_rows", "P_cols", (n, n))
        A = pattern.dense_matrix(A_vals, "A_rows", "A_cols", (m, n))
        return cls(0.5 * (P + P.transpose(-1, -2)), A, D, valid,
                   pattern.single_entries(A_vals))

    def at(self, D: BlockDiagonalD) -> "ResidualJacobians":
        """The same programs' Jacobians with ``D`` taken at other points."""
        return ResidualJacobians(self.P, self.A, D, self.valid, self.single_entries)

    def dense(self) -> torch.Tensor:
        """``M (B, n + m, n + m)``."""
        n, A = self.n, self.A
        B, m = A.shape[:2]
        # written block by block into one allocation (fresh memory is what costs at W4's
        # 64 matrices of order 157: two concatenations and a select took 16 ms)
        M = A.new_empty(B, n + m, n + m)
        M[:, :n, :n] = self.P
        self.D.right_of(A.mT, out=M[:, :n, n:])
        torch.neg(A, out=M[:, n:, :n])
        self.D.identity_minus(out=M[:, n:, n:])
        if not bool(self.valid.all()):
            M[~self.valid] = torch.eye(n + m, dtype=M.dtype, device=M.device)
        return M

    def eliminated(self) -> TriangularElimination | None:
        """Every member's ``M`` as a :class:`~torchdiffopt.linalg.elimination.
        TriangularElimination`, its blocks read off ``P``, ``A`` and ``D`` (``M`` itself is
        never formed), or None where too few unknowns come out.

        On a zero or nonnegative row ``i`` (``D`` diagonal there, ``D_ii`` 0 or 1):

        * ``D_ii = 1`` and ``A_i`` with one nonzero ``A_ij`` (a bound on ``x_j``, active, or
          an equality fixing it; the *pairs* ``(i, j)``): row ``n + i`` of ``M`` is
          ``-A_ij e_j``, so it fixes ``u_j`` (first), and column ``n + i`` is ``A_ij e_j``,
          so ``v_i`` is read off row ``j`` (last) — where no other such row bounds ``x_j``;
        * ``D_ii = 0`` (an inactive bound or inequality): column ``n + i`` is ``e_i``, so
          ``v_i`` is read off its own row (last).

        What is left, ``u_S`` (the variables not fixed) and ``v_S`` (the other diagonal rows,
        then the cones' rows), has ``M_SS = [[P_SS, A_SSᵀ D_SS], [-A_SS, I - D_SS]]``: the
        residual-map Jacobian of the program without the pairs and the inactive rows, since
        ``D`` has no entry between a diagonal row and any other. With ``F`` the fixed
        variables, ``I`` the inactive rows and ``ᵢ`` the pairs' rows in the pairs' order::

            t_F = -diag(A_ᵢF),  t_L = [diag(A_ᵢF) D_ᵢᵢ ; 1 - D_II],
            M_SF = [P_SF ; -A_SF],  M_LF = [P_FF ; -A_IF],
            M_LS = [[P_FS, A_SFᵀ D_SS], [-A_IS, 0]].

        Every member eliminates as many as the fewest of the valid members can (the rest
        stay in ``M_SS``: keeping an eliminable unknown there with its row is always
        allowed); a failed member's ``M`` is the identity in its natural order."""
        sets = self._elimination_sets()
        if sets is None:
            return None
        i_F, j_F, i_I, u_S, v_S, s_d, cone_rows = sets
        A, D, valid, n = self.A, self.D, self.valid, self.n
        B, m = A.shape[:2]
        N, device = n + m, A.device
        k_I, s_u, s_v = i_I.shape[1], u_S.shape[1], v_S.shape[1]
        keep = valid[:, None]
        # P with its rows and columns in the order (u_S, F), A's rows v_S and I so, and the
        # pairs' entries A_{i_k j_k}
        u_order = torch.cat((u_S, j_F), 1)
        P = _taken(self.P, u_order, u_order)
        P_SS, P_SF, P_FS, P_FF = P[:, :s_u, :s_u], P[:, :s_u, s_u:], P[:, s_u:, :s_u], \
            P[:, s_u:, s_u:]
        A_S, A_I = _taken(A, v_S, u_order), _taken(A, i_I, u_order)
        A_SS, A_SF, A_IS, A_IF = A_S[..., :s_u], A_S[..., s_u:], A_I[..., :s_u], A_I[..., s_u:]
        A_iF = A.reshape(B, m * n).gather(1, i_F * n + j_F)
        # D on v_S: the kept diagonal rows, then the cones' blocks moved up by what is gone
        position = torch.full((m,), -1, dtype=torch.int64, device=device)
        position[cone_rows] = s_d + torch.arange(len(cone_rows), device=device)
        D_SS = BlockDiagonalD(D.diag.gather(1, v_S), [(position[idx], mats)
                                                      for idx, mats in D.blocks])
        M_SS = ResidualJacobians(P_SS, A_SS, D_SS, valid, None).dense()
        M_SF = torch.cat((P_SF, -A_SF), 1)
        M_LF = torch.cat((P_FF, -A_IF), 1)
        M_LS = torch.cat((torch.cat((P_FS, D_SS.right_of(A_SF.mT)), 2),
                          torch.cat((-A_IS, A.new_zeros(B, k_I, s_v)), 2)), 1)
        t_F = -A_iF
        t_L = torch.cat((A_iF * D.diag.gather(1, i_F), 1.0 - D.diag.gather(1, i_I)), 1)
        rows = torch.cat((n + i_F, u_S, n + v_S, j_F, n + i_I), 1)
        cols = torch.cat((j_F, u_S, n + v_S, n + i_F, n + i_I), 1)
        if not bool(valid.all()):  # the identity, in its natural order
            natural = torch.arange(N, device=device)
            rows, cols = (torch.where(keep, p, natural) for p in (rows, cols))
            t_F, t_L = (torch.where(keep, t, 1.0) for t in (t_F, t_L))
            M_SF, M_LF, M_LS = (torch.where(keep[..., None], t, 0.0)
                                for t in (M_SF, M_LF, M_LS))
        return TriangularElimination(rows, cols, t_F, M_SF, M_SS, M_LF, M_LS, t_L)

    def _elimination_sets(self):
        """The index sets of :meth:`eliminated`, every member's in order: the pairs' rows
        ``i_F`` and variables ``j_F`` ``(B, k_F)``, the inactive rows ``i_I (B, k_I)``, the
        variables left ``u_S (B, n - k_F)`` and the rows left ``v_S`` (the kept diagonal
        rows, ``s_d`` of them, then ``cone_rows``, the cones' rows); None where too few
        unknowns come out. A failed member's sets are any of the right sizes."""
        A, D, valid, n = self.A, self.D, self.valid, self.n
        if not bool(valid.any()):
            return None
        B, m = A.shape[:2]
        N, device = n + m, A.device
        diagonal = torch.ones(m, dtype=torch.bool, device=device)
        for idx, _ in D.blocks:
            diagonal[idx.reshape(-1)] = False
        single, column = self.single_entries
        bound = diagonal & single & (D.diag == 1)
        bounds_per_column = torch.zeros(B, n, dtype=A.dtype, device=device).scatter_add(
            1, column, bound.to(A.dtype))
        pair = bound & (bounds_per_column.gather(1, column) == 1)
        inactive = diagonal & (D.diag == 0)
        k_F, k_I = (int(mask[valid].sum(1).min()) for mask in (pair, inactive))
        if 2 * k_F + k_I < TRIANGULAR_MIN_FRACTION * N:
            return None
        first = lambda mask, k: slots(mask)[0][:, :k]  # noqa: E731  (in order)
        keep = valid[:, None]
        ranks = torch.cumsum(diagonal, 0) - 1
        i_F = first(torch.where(keep, pair, diagonal & (ranks < k_F)), k_F)
        i_I = first(torch.where(keep, inactive,
                                diagonal & (ranks >= k_F) & (ranks < k_F + k_I)), k_I)
        j_F = torch.where(keep, column.gather(1, i_F), torch.arange(k_F, device=device))
        free = torch.ones(B, n, dtype=torch.bool, device=device).scatter_(1, j_F, False)
        kept = diagonal.expand(B, m).clone()
        kept.scatter_(1, torch.cat((i_F, i_I), 1), False)
        s_u, s_d = n - k_F, int(diagonal.sum()) - k_F - k_I
        cone_rows = torch.nonzero(~diagonal).flatten()
        u_S = first(free, s_u)
        v_S = torch.cat((first(kept, s_d), cone_rows.expand(B, -1)), 1)
        return i_F, j_F, i_I, u_S, v_S, s_d, cone_rows

    @functools.cached_property
    def norm_bound(self) -> torch.Tensor:
        """An upper bound on every member's ``‖M‖∞`` (largest row sum of ``|M|``): ``(B,)``,
        from ``|P|1 + |A|ᵀ|D|1`` on the first ``n`` rows and ``|A|1 + 1 + |D|1`` on the
        others."""
        d = self.D.row_abs_sums()
        absA = self.A.abs()
        top = self.P.abs().sum(-1) + (d[:, None, :] @ absA).squeeze(1)
        bottom = absA.sum(-1) + 1.0 + d
        return torch.maximum(top.amax(-1), bottom.amax(-1))

    def times(self, z: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``M zᵢ`` (``Mᵀ zᵢ`` with ``transpose``) for the rows ``z (B, K, n + m)``:
        ``M z = [P z_u + AᵀD z_v ; z_v - A z_u - D z_v]``,
        ``Mᵀ z = [P z_u - Aᵀ z_v ; z_v + Dᵀ(A z_u - z_v)]``."""
        n, P, A, D = self.n, self.P, self.A, self.D
        zu, zv = z[..., :n], z[..., n:]
        if transpose:
            top = zu @ P - zv @ A
            bottom = zv + D.right_of(zu @ A.mT - zv)
        else:
            Dzv = D.right_of(zv, transpose=True)
            top = zu @ P + Dzv @ A
            bottom = zv - zu @ A.mT - Dzv
        return torch.where(self.valid[:, None, None], torch.cat((top, bottom), -1), z)


#: least share of the unknowns that :meth:`ResidualJacobians.eliminated` must take
#: out of the factorization to be used (the gathers cost ``O(N²)`` against the ``O(N³)``
#: they save)
TRIANGULAR_MIN_FRACTION = 0.1


class _HeldDensely:
    """What the dense ways of holding ``M`` share: ``D`` (:class:`BlockDiagonalD`)."""

    D: BlockDiagonalD

    def apply_D(self, v):
        """``D v`` for ``v (B, K, m)``."""
        return self.D.right_of(v, transpose=True)


class DenseSystems(_HeldDensely):
    """All members' ``M`` (:class:`ResidualJacobians`) LU-factorized once."""

    def __init__(self, jacobians: ResidualJacobians):
        self.D = jacobians.D
        self._lu = jacobians.eliminated()
        if self._lu is not None and bool((self._lu.singular & jacobians.valid).any()):
            # a singular member's derivative is the pseudo-inverse of M itself
            self._lu = None
        if self._lu is None:
            self._lu = DenseFactorization(jacobians.dense(), symmetric=False)
        self.singular = self._lu.singular & jacobians.valid

    def solve(self, rhs, transpose: bool = False):
        """``M⁻¹ rhs`` (``M⁻ᵀ`` with ``transpose``) for ``rhs (B, K, N)``."""
        return self._lu.solve(rhs.transpose(-1, -2), transpose).transpose(-1, -2)


#: sweeps of iterative refinement on a nearby factorization (:class:`NearbySystems`)
#: before it gives way to a factorization of its own, and the relative residual they reach
NEARBY_MAX_SWEEPS = 3
NEARBY_RTOL = 1e-12


class NearbySystems(_HeldDensely):
    """The systems ``M₁`` at the refined points (:class:`ResidualJacobians`), solved by
    iterative refinement on the LU factors of ``M₀`` at the solvers' points (``base``):
    ``z ← z + M₀⁻¹(rhs − M₁ z)`` from ``z = M₀⁻¹ rhs``, until every valid member's residual
    is below :data:`NEARBY_RTOL` times ``‖M₁‖∞‖z‖∞ + ‖rhs‖∞`` (a backward error: an exact
    solve passes it at any condition number).

    The refinement moves a point by about the solver's tolerance, and ``M`` (through ``D``)
    with it, so ``M₀⁻¹(M₁ − M₀)`` is small and each sweep gains its size: one or two
    sweeps (a product with ``M₁`` from its parts and a solve each) replace a second
    factorization (W4's 64 LU factorizations of order 157, 20–40 ms). Where
    :data:`NEARBY_MAX_SWEEPS` do not reach the tolerance, ``M₁`` is factorized after all
    (:class:`DenseSystems`) and serves from then on; members it finds singular, though
    ``M₀`` was not, are reported then (:func:`warn_singular`; ``M₀``'s are reported with
    the solution). Under ``torch.func`` transforms, whose solves cannot test their data,
    the sweep count is taken from a random probe, solved once in both orientations."""

    def __init__(self, jacobians: ResidualJacobians, base: DenseSystems):
        self.jacobians, self.D, self.singular = jacobians, jacobians.D, base.singular
        self._base = base
        self._own: DenseSystems | None = None  # M₁'s factorization, once needed
        self._probe_sweeps: int | None = None

    def _factorize(self) -> None:
        self._own = DenseSystems(self.jacobians)
        newly = self._own.singular & ~self.singular
        self.singular = self._own.singular
        if bool(newly.any()):
            warn_singular(torch.nonzero(newly).flatten().tolist())

    def solve(self, rhs, transpose: bool = False):
        """``M₁⁻¹ rhs`` (``M₁⁻ᵀ`` with ``transpose``) for ``rhs (B, K, N)``."""
        if self._own is None and is_transformed(rhs):
            sweeps = self._sweeps_of_probe()
            if sweeps is not None:
                return self._swept(rhs, transpose, sweeps)
        if self._own is None:
            z, _ = self._refined(rhs, transpose)
            if z is not None:
                return z
            self._factorize()
        return self._own.solve(rhs, transpose)

    def _swept(self, rhs, transpose, sweeps: int):
        """``sweeps`` sweeps from ``M₀⁻¹ rhs``, untested."""
        z = self._base.solve(rhs, transpose)
        for _ in range(sweeps):
            z = z + self._base.solve(rhs - self.jacobians.times(z, transpose), transpose)
        return z

    def _refined(self, rhs, transpose):
        """Sweeps from ``M₀⁻¹ rhs`` until the residual passes, at most
        :data:`NEARBY_MAX_SWEEPS`: ``(z, sweeps taken)``, or ``(None, None)``."""
        z = self._base.solve(rhs, transpose)
        for sweep in range(NEARBY_MAX_SWEEPS + 1):
            residual = rhs - self.jacobians.times(z, transpose)
            if self._converged(rhs, z, residual):
                return z, sweep
            if sweep < NEARBY_MAX_SWEEPS:
                z = z + self._base.solve(residual, transpose)
        return None, None

    def _converged(self, rhs, z, residual) -> bool:
        valid = self.jacobians.valid
        amax = lambda t: t.abs().amax((-2, -1))[valid]  # noqa: E731
        scale = self.jacobians.norm_bound[valid] * amax(z) + amax(rhs)
        return bool((amax(residual) <= NEARBY_RTOL * scale).all())

    def _sweeps_of_probe(self) -> int | None:
        """The sweeps a random right-hand side needs in both orientations (None: more than
        :data:`NEARBY_MAX_SWEEPS`, and ``M₁`` is factorized)."""
        if self._probe_sweeps is None:
            A = self.jacobians.A
            # (numpy's generator: torch's random operations are refused inside vmap)
            probe = torch.as_tensor(np.random.default_rng(0).standard_normal(
                (A.shape[0], 1, sum(A.shape[1:]))), dtype=A.dtype, device=A.device)
            counts = [self._refined(probe, transpose)[1] for transpose in (False, True)]
            if None in counts:
                self._factorize()
                return None
            self._probe_sweeps = max(counts)
        return self._probe_sweeps


def warn_singular(members: list) -> None:
    """The DegenerateSolutionWarning for batch members whose ``M`` is singular."""
    warn_degenerate(
        f"batch members {members}: the cone program's derivative matrix M is singular "
        "(the primal or dual solution is not unique); their derivatives are the "
        "minimum-norm least-squares solution of the linearized optimality conditions "
        "(exact along data directions that keep a solution path)")


def refine_dense(pattern: ConicPattern, dims, z: np.ndarray, P_vals, c, A_vals, b, valid,
                 refine: bool = True):
    """The valid members' points ``z = (u, v)`` (``(B, n + m)``) of the batch's programs
    (the entries ``P_vals``, ``A_vals`` and ``c``, ``b``, float64; cones ``dims``) refined
    by :func:`~torchdiffopt.backends.conic.newton_refine` with every ``M`` factorized once
    at the solvers' points, and the systems at the returned points, ``(z, systems)``:
    :class:`NearbySystems` on those factors where they serve, else :class:`DenseSystems`
    factorized again. The residual map ``R(u, v) = [P u + Aᵀ Π_{K*}(v) + c ;
    b − A u + v − Π_{K*}(v)]`` is evaluated for the whole batch at once."""
    n, m = pattern.n, pattern.m
    device = valid.device
    members = np.flatnonzero(valid.cpu().numpy())

    def D_at(z):
        return BlockDiagonalD.at(z[:, n:], dims, device)

    start_jacobians = ResidualJacobians.of_entries(pattern, P_vals, A_vals, D_at(z), valid)
    systems = DenseSystems(start_jacobians)
    if not refine or not len(members):
        return z, systems

    def residual(rows, idx):
        # (a step for every member, the common case, takes the data as they are)
        sel = slice(None) if len(idx) == len(z) else \
            torch.as_tensor(members[idx], device=device)
        u = torch.as_tensor(rows[:, :n], dtype=_F64, device=device)
        v = rows[:, n:]
        y = torch.as_tensor(project_rows(v, dims, dual=True), dtype=_F64, device=device)
        Av = A_vals[sel]
        dual = pattern.matvec(Av, "A_cols", "A_rows", y, n) + c[sel]
        if len(pattern.P_rows):
            Pv = P_vals[sel]
            dual = dual + 0.5 * (pattern.matvec(Pv, "P_rows", "P_cols", u, n)
                                 + pattern.matvec(Pv, "P_cols", "P_rows", u, n))
        primal = b[sel] - pattern.matvec(Av, "A_rows", "A_cols", u, m) \
            + torch.as_tensor(v, dtype=_F64, device=device) - y
        return torch.cat((dual, primal), -1).cpu().numpy()

    def solve(rows, idx):
        if len(idx) == len(z):
            rhs = torch.as_tensor(rows, dtype=_F64, device=device)[:, None]
            return systems.solve(rhs)[:, 0].cpu().numpy()
        rhs = torch.zeros(len(z), 1, n + m, dtype=_F64, device=device)
        rhs[members[idx], 0] = torch.as_tensor(rows, dtype=_F64, device=device)
        return systems.solve(rhs)[members[idx], 0].cpu().numpy()

    start = z[members]
    scale = torch.cat((b, c), -1).abs().amax(-1).clamp(min=1.0).cpu().numpy()[members]
    floor = 4 * np.finfo(float).eps * np.maximum(scale, np.abs(start).max(axis=1, initial=0.0))
    refined = newton_refine(start, residual, solve, floor)
    if np.array_equal(refined, start):
        return z, systems
    z = z.copy()
    z[members] = refined
    refined_jacobians = start_jacobians.at(D_at(z))
    if bool(systems.singular.any()):  # the pseudo-inverse of M₁ itself
        return z, DenseSystems(refined_jacobians)
    return z, NearbySystems(refined_jacobians, systems)


class SparseSystems:
    """Each member's factorized :class:`~torchdiffopt.backends.conic.ConicDerivative` (None
    for failed members); numpy solves, one member at a time (under ``torch.func``
    transforms the seeds arrive plain, a slice at a time: :mod:`torchdiffopt.folding`)."""

    def __init__(self, members: list, device):
        self.members = members
        self.singular = torch.tensor([d is not None and d.singular for d in members],
                                     device=device)

    def _each(self, t, fn):
        arr = t.detach().cpu().numpy()
        out = np.zeros_like(arr)
        for b, deriv in enumerate(self.members):
            if deriv is not None:
                out[b] = fn(deriv, arr[b].T).T
        return torch.as_tensor(out, dtype=t.dtype, device=t.device)

    def solve(self, rhs, transpose: bool = False):
        return self._each(rhs, lambda d, r: d.system.solve(r, transpose=transpose))

    def apply_D(self, v):
        return self._each(v, lambda d, w: d.D.matvec(w))


class BatchedConicDerivative:
    """``jvp`` / ``vjp`` of ``(P_vals, c, A_vals, b) ↦ (x, y, s)`` for the batch (module
    docstring), at the refined points ``x (B, n)``, ``y (B, m)``, with ``M`` held by
    ``systems`` (:class:`DenseSystems` or :class:`SparseSystems`)."""

    def __init__(self, pattern: ConicPattern, x, y, systems, valid):
        self.pattern, self.systems, self.valid = pattern, systems, valid
        self.x, self.y = x, y

    def jvp(self, dP_vals, dc, dA_vals, db):
        """Tangents with a direction dimension ``K`` after the batch, ``(B, K, …)``:
        returns ``(dx, dy, ds)``."""
        pt, n, m = self.pattern, self.pattern.n, self.pattern.m
        x, y = self.x.unsqueeze(1), self.y.unsqueeze(1)
        dPx = 0.5 * (pt.matvec(dP_vals, "P_rows", "P_cols", x, n)
                     + pt.matvec(dP_vals, "P_cols", "P_rows", x, n))
        rhs_u = dPx + pt.matvec(dA_vals, "A_cols", "A_rows", y, n) + dc
        rhs_v = db - pt.matvec(dA_vals, "A_rows", "A_cols", x, m)
        dz = -self.systems.solve(torch.cat((rhs_u, rhs_v), -1))
        keep = self.valid.reshape(-1, 1, 1)
        du, dv = torch.where(keep, dz[..., :n], 0.0), torch.where(keep, dz[..., n:], 0.0)
        dy = self.systems.apply_D(dv)
        return du, dy, dy - dv

    def vjp(self, x_bar, y_bar, s_bar):
        """Cotangents ``(B, …)`` of ``(x, y, s)`` → those of ``(P_vals, c, A_vals, b)``."""
        pt, n = self.pattern, self.pattern.n
        keep = self.valid.reshape(-1, 1)
        x_bar, y_bar, s_bar = (torch.where(keep, t, 0.0) for t in (x_bar, y_bar, s_bar))
        zv = self.systems.apply_D((y_bar + s_bar).unsqueeze(1)).squeeze(1) - s_bar
        r = self.systems.solve(-torch.cat((x_bar, zv), -1).unsqueeze(1), transpose=True)
        r1, r2 = r[:, 0, :n], r[:, 0, n:]
        x, y, dev = self.x, self.y, x_bar.device
        Ai, Aj = pt.idx("A_rows", dev), pt.idx("A_cols", dev)
        Pi, Pj = pt.idx("P_rows", dev), pt.idx("P_cols", dev)
        A_bar = y[:, Ai] * r1[:, Aj] - r2[:, Ai] * x[:, Aj]
        P_bar = 0.5 * (r1[:, Pi] * x[:, Pj] + x[:, Pi] * r1[:, Pj])
        return P_bar, r1, A_bar, r2
