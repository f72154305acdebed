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
  ``M`` at the solvers' points, whose factors then solve with ``M`` at the refined points by
  iterative refinement (:class:`NearbySystems`).
* :class:`SparseSystems` — larger programs: each member's
  :class:`~torchdiffopt.backends.conic.ConicDerivative` (sparse LU, LSMR where singular), one
  numpy solve per member; ``backward`` and forward-mode AD, no ``torch.func`` transforms.

Members that failed (``valid`` False) carry zeros and get zero tangents and cotangents.
"""

from __future__ import annotations

import numpy as np
import torch

from ..folding import is_transformed
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


def residual_jacobians(pattern: ConicPattern, P_vals, A_vals, D, valid) -> torch.Tensor:
    """All members' ``M = [[P, AᵀD], [-A, I - D]]`` as one ``(B, N, N)`` tensor, the
    identity in place of failed (not ``valid``) members'."""
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
    return M


class DenseSystems:
    """All members' ``M`` (:func:`residual_jacobians`) LU-factorized once, and their
    ``D``."""

    def __init__(self, M, D, valid):
        self.M, self.D = M, D
        self._lu = DenseFactorization(M, symmetric=False)
        self.singular = self._lu.singular & valid

    def solve(self, rhs, transpose: bool = False):
        """``M⁻¹ rhs`` (``M⁻ᵀ`` with ``transpose``) for ``rhs (B, K, N)``."""
        return self._lu.solve(rhs.transpose(-1, -2), transpose).transpose(-1, -2)

    def apply_D(self, v):
        """``D v`` for ``v (B, K, m)``."""
        return v @ self.D.transpose(-1, -2)


#: sweeps of iterative refinement on a nearby factorization (:class:`NearbySystems`)
#: before it gives way to a factorization of its own, and the relative residual they reach
NEARBY_MAX_SWEEPS = 3
NEARBY_RTOL = 1e-12


class NearbySystems:
    """The systems ``M₁`` at the refined points, solved by iterative refinement on the LU
    factors of ``M₀`` at the solvers' points (``base``): ``z ← z + M₀⁻¹(rhs − M₁ z)`` from
    ``z = M₀⁻¹ rhs``, until every valid member's residual is below :data:`NEARBY_RTOL`
    times the size of its terms.

    The refinement moves a point by about the solver's tolerance, and ``M`` (through ``D``)
    with it, so ``M₀⁻¹(M₁ − M₀)`` is small and each sweep gains its size: one or two
    sweeps (a batched product with ``M₁`` and a solve each) replace a second factorization
    (W4's 64 LU factorizations of order 157, 20–40 ms). Where :data:`NEARBY_MAX_SWEEPS`
    do not reach the tolerance, ``M₁`` is factorized after all (:class:`DenseSystems`) and
    serves from then on. Under ``torch.func`` transforms, whose solves cannot test their
    data, the sweep count is taken from a random probe, solved once in both orientations."""

    def __init__(self, M, D, base: DenseSystems, valid):
        self.M, self.D, self.singular = M, D, base.singular
        self._base, self._valid = base, valid
        self._own: DenseSystems | None = None  # M₁'s factorization, once needed
        self._probe_sweeps: int | None = None

    def solve(self, rhs, transpose: bool = False):
        """``M₁⁻¹ rhs`` (``M₁⁻ᵀ`` with ``transpose``) for ``rhs (B, K, N)``."""
        if self._own is None and is_transformed(rhs):
            sweeps = self._sweeps_of_probe()
            if sweeps is not None:
                return self._refined(rhs, transpose, sweeps)
        if self._own is None:
            z = self._refined(rhs, transpose, NEARBY_MAX_SWEEPS, tested=True)
            if z is not None:
                return z
            self._own = DenseSystems(self.M, self.D, self._valid)
        return self._own.solve(rhs, transpose)

    def _refined(self, rhs, transpose, sweeps, tested=False):
        """``sweeps`` sweeps from ``M₀⁻¹ rhs``; with ``tested``, as many as the residual
        needs, up to ``sweeps``, and None if it is still above the tolerance after them."""
        z = self._base.solve(rhs, transpose)
        for sweep in range(sweeps + 1):
            if sweep == sweeps and not tested:
                return z
            residual = rhs - _times(self.M, z, transpose)
            if tested and self._converged(rhs, residual):
                return z
            if sweep == sweeps:
                return None
            z = z + self._base.solve(residual, transpose)
        return z

    def _converged(self, rhs, residual) -> bool:
        error = residual.abs().amax((-2, -1))[self._valid]
        size = rhs.abs().amax((-2, -1))[self._valid]
        return bool((error <= NEARBY_RTOL * size).all())

    def _sweeps_of_probe(self) -> int | None:
        """The sweeps a random right-hand side needs in both orientations (None: more than
        :data:`NEARBY_MAX_SWEEPS`, and ``M₁`` is factorized)."""
        if self._probe_sweeps is None:
            M = self.M
            # (numpy's generator: torch's random operations are refused inside vmap)
            probe = torch.as_tensor(np.random.default_rng(0).standard_normal(
                (M.shape[0], 1, M.shape[-1])), dtype=M.dtype, device=M.device)
            counts = []
            for transpose in (False, True):
                for sweeps in range(NEARBY_MAX_SWEEPS + 1):
                    z = self._refined(probe, transpose, sweeps)
                    if self._converged(probe, probe - _times(M, z, transpose)):
                        counts.append(sweeps)
                        break
            if len(counts) < 2:
                self._own = DenseSystems(self.M, self.D, self._valid)
                return None
            self._probe_sweeps = max(counts)
        return self._probe_sweeps

    def apply_D(self, v):
        """``D v`` for ``v (B, K, m)``."""
        return v @ self.D.transpose(-1, -2)


def _times(M, z, transpose: bool):
    """``M z`` (``Mᵀ z`` with ``transpose``) for the rows ``z (B, K, N)``."""
    return z @ M if transpose else z @ M.transpose(-1, -2)


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

    def jacobians(z):
        D = torch.as_tensor(projection_derivative_rows(z[:, n:], dims, dual=True),
                            dtype=_F64, device=device)
        return residual_jacobians(pattern, P_vals, A_vals, D, valid), D

    systems = DenseSystems(*jacobians(z), valid)
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
    M, D = jacobians(z)
    if bool(systems.singular.any()):  # the pseudo-inverse of M₁ itself
        return z, DenseSystems(M, D, valid)
    return z, NearbySystems(M, D, systems, valid)


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
