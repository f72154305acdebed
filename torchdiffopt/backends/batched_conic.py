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
  members get the pseudo-inverse: minimum-norm least-squares derivatives). Every operation is
  a torch op, so ``backward``, ``jvp`` and every ``torch.func`` transform work. The solvers'
  points are refined batched too (:func:`refine_dense`): Newton steps with one batched LU of
  ``M`` at the solvers' points, then one at the refined points.
* :class:`SparseSystems` — larger programs: each member's
  :class:`~torchdiffopt.backends.conic.ConicDerivative` (sparse LU, LSMR where singular), one
  numpy solve per member; ``backward`` and forward-mode AD, no ``torch.func`` transforms.

Members that failed (``valid`` False) carry zeros and get zero tangents and cotangents.
"""

from __future__ import annotations

import numpy as np
import torch

from ..linalg.factorization import DENSE_MAX_ORDER, DenseFactorization
from .cones import project_rows, projection_derivative_rows
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
        prod = vals * x[..., c]
        return prod.new_zeros(*prod.shape[:-1], size).index_add(-1, r, prod)

    def dense_matrix(self, vals, rows: str, cols: str, shape) -> torch.Tensor:
        """``(B, nnz) → (B, *shape)``, repeated entries added."""
        r, c = self.idx(rows, vals.device), self.idx(cols, vals.device)
        out = vals.new_zeros(vals.shape[0], shape[0] * shape[1])
        return out.index_add(-1, r * shape[1] + c, vals).unflatten(-1, shape)


class DenseSystems:
    """All members' ``M`` as one ``(B, N, N)`` tensor, LU-factorized once."""

    def __init__(self, pattern: ConicPattern, P_vals, A_vals, D, valid):
        n, m = pattern.n, pattern.m
        B = D.shape[0]
        P = pattern.dense_matrix(P_vals, "P_rows", "P_cols", (n, n))
        P = 0.5 * (P + P.transpose(-1, -2))
        A = pattern.dense_matrix(A_vals, "A_rows", "A_cols", (m, n))
        # written block by block into one allocation (fresh memory is what costs at W4's
        # 64 matrices of order 157: two concatenations and a select took 16 ms)
        M = D.new_empty(B, n + m, n + m)
        M[:, :n, :n] = P
        torch.matmul(A.transpose(-1, -2), D, out=M[:, :n, n:])
        torch.neg(A, out=M[:, n:, :n])
        torch.sub(torch.eye(m, dtype=D.dtype, device=D.device), D, out=M[:, n:, n:])
        if not bool(valid.all()):
            M[~valid] = torch.eye(n + m, dtype=M.dtype, device=M.device)
        self.D = D
        self._lu = DenseFactorization(M, symmetric=False)
        self.singular = self._lu.singular & valid

    def solve(self, rhs, transpose: bool = False):
        """``M⁻¹ rhs`` (``M⁻ᵀ`` with ``transpose``) for ``rhs (B, K, N)``."""
        return self._lu.solve(rhs.transpose(-1, -2), transpose).transpose(-1, -2)

    def apply_D(self, v):
        """``D v`` for ``v (B, K, m)``."""
        return v @ self.D.transpose(-1, -2)


def refine_dense(pattern: ConicPattern, dims, z: np.ndarray, P_vals, c, A_vals, b, valid,
                 refine: bool = True):
    """The valid members' points ``z = (u, v)`` (``(B, n + m)``) of the batch's programs
    (the entries ``P_vals``, ``A_vals`` and ``c``, ``b``, float64; cones ``dims``) refined
    by :func:`~torchdiffopt.backends.conic.newton_refine` with every ``M`` factorized once
    at the solvers' points, and :class:`DenseSystems` at the returned points:
    ``(z, systems)``. The residual map ``R(u, v) = [P u + Aᵀ Π_{K*}(v) + c ;
    b − A u + v − Π_{K*}(v)]`` is evaluated for the whole batch at once."""
    n, m = pattern.n, pattern.m
    device = valid.device
    members = np.flatnonzero(valid.cpu().numpy())

    def linearize(z):
        D = projection_derivative_rows(z[:, n:], dims, dual=True)
        return DenseSystems(pattern, P_vals, A_vals, torch.as_tensor(D, dtype=_F64,
                                                                     device=device), valid)

    systems = linearize(z)
    if not refine or not len(members):
        return z, systems

    def residual(rows, idx):
        sel = torch.as_tensor(members[idx], device=device)
        u = torch.as_tensor(rows[:, :n], dtype=_F64, device=device)
        v = rows[:, n:]
        y = torch.as_tensor(project_rows(v, dims, dual=True), dtype=_F64, device=device)
        Pv, Av = P_vals[sel], A_vals[sel]
        Pu = 0.5 * (pattern.matvec(Pv, "P_rows", "P_cols", u, n)
                    + pattern.matvec(Pv, "P_cols", "P_rows", u, n))
        dual = Pu + pattern.matvec(Av, "A_cols", "A_rows", y, n) + c[sel]
        primal = b[sel] - pattern.matvec(Av, "A_rows", "A_cols", u, m) \
            + torch.as_tensor(v, dtype=_F64, device=device) - y
        return torch.cat((dual, primal), -1).cpu().numpy()

    def solve(rows, idx):
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
    return z, linearize(z)


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
