"""Solves with batched matrices that are block lower triangular up to a permutation.

Some unknowns of a linear system are fixed by one equation each, without the rest: a row
with a single nonzero fixes its unknown outright, and a column with a single nonzero lets its
unknown be read off its one row once all the others are known. Ordering the first kind first
and the second kind last, each member's matrix ``M`` (order ``N``) becomes, with its rows
taken in the order ``rows[b]`` and its columns in the order ``cols[b]``,

    M̃ = M[rows][:, cols] = [[T_F,  0,    0  ],
                            [M_SF, M_SS, 0  ],
                            [M_LF, M_LS, T_L]]

with ``T_F (k_F, k_F)`` and ``T_L (k_L, k_L)`` diagonal. Then ``det M = ± det T_F · det M_SS ·
det T_L``, and only ``M_SS`` (order ``s = N − k_F − k_L``) needs a factorization: ``M z = r``
is solved by substitution,

    z_F = T_F⁻¹ r_F,   z_S = M_SS⁻¹ (r_S − M_SF z_F),   z_L = T_L⁻¹ (r_L − M_LF z_F − M_LS z_S)

(``r̃ = r[rows]``, ``z[cols] = z̃``), and ``Mᵀ w = g`` the other way round,

    w_L = T_L⁻¹ g_L,   w_S = M_SS⁻ᵀ (g_S − M_LSᵀ w_L),   w_F = T_F⁻¹ (g_F − M_SFᵀ w_S − M_LFᵀ w_L)

(``g̃ = g[cols]``, ``w[rows] = w̃``). Dividing by a diagonal entry of ``T`` adds no rounding
growth: it is the only nonzero of its row (``T_F``) or of its column (``T_L``), so the
substitution is exact elimination, not pivoting. The factorization costs ``(s / N)³`` of the
whole matrix's: a cone program's residual-map Jacobian whose bound constraints are active
loses two unknowns an active bound (W4: order 157 → 73; its factorization, 14 ms whole,
takes 1.4 ms).

No library offers this: torch and LAPACK factorize dense matrices whole, scipy's sparse LU
takes one matrix at a time; the permutations and the blocks here are the caller's, read off
its structure (:meth:`~torchdiffopt.backends.batched_conic.ResidualJacobians.eliminated`
builds them from a cone program's parts, so that ``M`` is never formed).
"""

from __future__ import annotations

import torch

from .factorization import SINGULAR_RTOL, DenseFactorization


class TriangularElimination:
    """The factorization of ``M (B, N, N)`` laid out as in the module docstring, from its
    blocks: the orders ``rows``, ``cols`` (``(B, N)`` permutations of ``0 … N − 1``) that
    take ``M`` to ``M̃``, the diagonals ``t_F (B, k_F)``, ``t_L (B, k_L)`` of ``T_F``,
    ``T_L``, and ``M_SF (B, s, k_F)``, ``M_SS (B, s, s)``, ``M_LF (B, k_L, k_F)``,
    ``M_LS (B, k_L, s)``. The caller reads the blocks off its own structure: ``M`` itself
    need not exist. ``singular (B,)`` marks members whose ``M_SS`` (hence ``M``) is
    singular, by :class:`~.factorization.DenseFactorization`'s pivot test; their solves are
    not meaningful, and the caller factorizes ``M`` whole for them."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, t_F, M_SF, M_SS, M_LF, M_LS,
                 t_L, rtol: float = SINGULAR_RTOL):
        B, N = rows.shape
        self.sizes = (t_F.shape[1], M_SS.shape[1], t_L.shape[1])
        self.rows, self.cols = rows, cols
        # the inverse orders put the substitution's results back: z = z̃[inverse]
        positions = torch.arange(N, device=rows.device).expand(B, N)
        self.rows_inverse, self.cols_inverse = (torch.empty_like(p).scatter_(1, p, positions)
                                                for p in (rows, cols))
        self.t_F, self.t_L = t_F, t_L
        self.M_SF, self.M_LF, self.M_LS = M_SF, M_LF, M_LS
        self._lu = DenseFactorization(M_SS, rtol, symmetric=False)
        self.singular = self._lu.singular

    def solve(self, rhs: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``M⁻¹ rhs`` (``M⁻ᵀ rhs`` with ``transpose``) for ``rhs (B, N, k)``."""
        # Mᵀ's rows are M's columns: g̃ = g[cols], and w comes back by the rows' order
        first = self.cols if transpose else self.rows
        inverse = self.rows_inverse if transpose else self.cols_inverse
        r = _take_rows(rhs, first)
        rF, rS, rL = r.split(self.sizes, 1)
        if transpose:
            zL = rL / self.t_L[..., None]
            zS = self._lu.solve(torch.baddbmm(rS, self.M_LS.mT, zL, alpha=-1.0), transpose=True)
            zF = torch.baddbmm(torch.baddbmm(rF, self.M_SF.mT, zS, alpha=-1.0),
                               self.M_LF.mT, zL, alpha=-1.0) / self.t_F[..., None]
        else:
            zF = rF / self.t_F[..., None]
            zS = self._lu.solve(torch.baddbmm(rS, self.M_SF, zF, alpha=-1.0))
            zL = torch.baddbmm(torch.baddbmm(rL, self.M_LF, zF, alpha=-1.0),
                               self.M_LS, zS, alpha=-1.0) / self.t_L[..., None]
        return _take_rows(torch.cat((zF, zS, zL), 1), inverse)


def _take_rows(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``t[b, order[b]]`` for ``t (B, N, k)``."""
    return t.gather(1, order[..., None].expand(-1, -1, t.shape[-1]))
