"""Batched primal-dual interior point for dense cone programs over zero, nonnegative and
second-order cones, in pure torch.

No maintained library solves batches of second-order cone programs in torch: cvxpylayers and
diffcp call SCS or Clarabel once per member from Python, and qpth takes no cones. This solver
iterates on the whole batch at once, on CPU or CUDA. It is the conic sibling of
:mod:`.ipm` (the same homogeneous embedding, predictor-corrector and stopping rules, and the
same status codes); that one keeps the diagonal scaling of LPs and QPs, with reductions this
one cannot use (one GEMM for the Newton matrices of a shared constraint matrix).

Problem, in SCS's form, for B members that share their sizes and cones::

    minimize    ½ xᵀ P_b x + c_bᵀ x
    subject to  A_b x + s = b_b,   s ∈ K = {0}^z × ℝ₊^l × Q^{q_1} × … × Q^{q_k}

with ``Q^d = {(t, u) ∈ ℝ × ℝ^{d-1}: ‖u‖₂ ≤ t}``, rows in that order (SCS's ``z``, ``l``,
``q`` cones), and ``P_b`` symmetric positive semidefinite. The dual is ``y ∈ K*`` (free on
the zero rows, K itself on the others) with ``P x + Aᵀy + c = 0``, SCS's convention.

Algorithm. Rows are scaled to unit ∞-norm (one factor per second-order cone, which keeps
the cone). The homogeneous self-dual embedding (Clarabel's, Goulart and Chen 2024) adds
``τ, κ ≥ 0``::

    P x + Aᵀy + c τ = 0,    A x + s − b τ = 0,    cᵀx + bᵀy + xᵀPx / τ + κ = 0.

Each iteration scales ``s`` and ``y`` by the Nesterov–Todd scaling ``W`` of every cone
(``W y = W⁻¹ s = λ``; the diagonal ``√(s/y)`` on nonnegative rows; on a second-order cone
``W = η [[w₀, w₁ᵀ], [w₁, I + w₁w₁ᵀ/(1 + w₀)]]`` from the normalized points, as in
Vandenberghe's *The CVXOPT linear and quadratic cone program solvers*, §4) and takes a
Mehrotra predictor-corrector step, 0.99 of the way to the boundary, with the linearized
complementarity ``λ ∘ (W Δy + W⁻¹ Δs) = −d`` in the cones' Jordan product. As in
:mod:`.ipm`, Δs and Δκ are eliminated, Δτ is recovered from the solve with ``[−c; b]``, and
what is left is ``[[P, Aᵀ], [A, −W²]]`` (zero in place of ``W²`` on the zero rows), reduced
to ``P + (W⁻¹A)ᵀ(W⁻¹A)`` (``A_zᵀA_z / δ`` for the zero rows) and factored by one batched
Cholesky, retried with ρI added where it fails; every solve (the part in Δτ, the
predictor and the corrector) is refined against the exact system while its residual is
above round-off.

Stopping rules, per member, are :mod:`.ipm`'s (relative primal and dual residuals and gap
below ``tol``; Farkas certificates of primal or dual infeasibility, the latter confirmed by
a feasibility solve; an iteration limit or a numerical failure). Finished members are
frozen while the others go on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..backends.cones import ConeDims
from .cone_program import ACCEPT_RESIDUAL, ConicSolution, certify, cone_program
from .ipm import (DUAL_INFEASIBLE, DUAL_REGULARIZATION, NOT_CONVERGED, OPTIMAL,
                  PRIMAL_INFEASIBLE, REFINEMENT_RTOL, STEP_FRACTION, _dot, _inf_norm, _matvec,
                  cholesky_solve_by_columns, cholesky_with_retries, status_error,
                  stopping_verdict)

#: iterative refinement sweeps of a Newton solve, at most
REFINEMENT_STEPS = 3


def supports(cones) -> bool:
    """Whether the cones are only zero, nonnegative and second-order cones."""
    dims = ConeDims.from_dict(cones)
    return not (dims.s or dims.ep or dims.ed or dims.p)


@dataclass
class ConicIPMResult:
    """Per-member outcome of :func:`solve_conic_ipm`, float64.

    ``x (B, n)``, ``y (B, m)`` (dual, in K*) and ``s (B, m)`` (slack, in K) solve the program
    where ``status == 0``; NaN where it is 1 (primal infeasible) or 2 (dual infeasible:
    unbounded); the last iterate where it is 3 (iteration limit or numerical failure).
    ``iterations (B,)``: Newton steps taken by each member."""

    x: torch.Tensor
    y: torch.Tensor
    s: torch.Tensor
    status: torch.Tensor
    iterations: torch.Tensor


def _lorentz_square(V):
    """``v₀² − ‖v₁‖²`` over the last dimension, as ``(v₀ − ‖v₁‖)(v₀ + ‖v₁‖)``: the difference
    of squares cancels near a cone's boundary, the product keeps its relative accuracy."""
    norm = torch.linalg.vector_norm(V[..., 1:], dim=-1)
    return (V[..., 0] - norm) * (V[..., 0] + norm)


class _Cones:
    """The cone rows (all rows but the zero cone's) of K, in the solver's internal order:
    the ``l`` nonnegative rows, then the second-order cones sorted by size, so that the
    ``k`` cones of size ``d`` are one contiguous run of rows, ``groups = [(d, k, start)]``.
    ``row_order`` maps the internal rows to the caller's (zero rows first, unchanged).
    Vectors on the cone rows are ``(B, m_c)``; the scaling acts on ``(B, m_c, r)``."""

    def __init__(self, dims: ConeDims, device):
        self.l = dims.l  # noqa: E741  (SCS's name)
        self.size = dims.l + sum(dims.q)
        self.degree = dims.l + len(dims.q)
        first = dims.z + dims.l + np.concatenate(([0], np.cumsum(dims.q)[:-1])).astype(int)
        order = [np.arange(dims.z + dims.l)]
        self.groups, start = [], dims.l
        for d in sorted(set(dims.q)):
            cones = [f for f, dd in zip(first, dims.q) if dd == d]
            order += [np.arange(f, f + d) for f in cones]
            self.groups.append((d, len(cones), start))
            start += d * len(cones)
        self.row_order = torch.as_tensor(np.concatenate(order), device=device)
        e = [torch.ones(self.l, dtype=torch.float64, device=device)]
        for d, k, _ in self.groups:
            head = torch.zeros(k, d, dtype=torch.float64, device=device)
            head[:, 0] = 1.0
            e.append(head.flatten())
        self.identity = torch.cat(e)  # the identity element e of the Jordan algebra

    def split(self, v, dim: int = 1):
        """The nonnegative part ``v_l`` and, for each size ``d``, the view of the cones of
        that size as ``(…, k, d, …)`` (the cone rows of ``v`` along ``dim``)."""
        blocks = [v.narrow(dim, start, d * k).unflatten(dim, (k, d))
                  for d, k, start in self.groups]
        return v.narrow(dim, 0, self.l), blocks

    def join(self, v_l, blocks, dim: int = 1):
        """The inverse of :meth:`split`."""
        return torch.cat([v_l] + [V.flatten(dim, dim + 1) for V in blocks], dim)

    def min_eigenvalue(self, v):
        """``min_i λ_min(v_i)`` over the cones, ``(B,)``: ``v`` is in the interior iff > 0."""
        v_l, blocks = self.split(v)
        low = torch.cat([v_l] + [V[..., 0] - torch.linalg.vector_norm(V[..., 1:], dim=-1)
                                 for V in blocks], -1)
        return low.amin(-1) if low.shape[-1] else v.new_full(v.shape[:1], float("inf"))

    def shift_inside(self, v):
        """CVXOPT's initial shift: ``v`` if it is interior, else ``v + (1 − λ_min) e``."""
        low = self.min_eigenvalue(v).unsqueeze(-1)
        return torch.where(low > 0, v, v + (1.0 - low) * self.identity)

    def product(self, u, v):
        """The Jordan product ``u ∘ v``: ``u_i v_i`` on nonnegative rows,
        ``(uᵀv, u₀v₁ + v₀u₁)`` on a second-order cone."""
        (u_l, U), (v_l, V) = self.split(u), self.split(v)
        return self.join(u_l * v_l, [
            torch.cat([(X * Y).sum(-1, keepdim=True),
                       X[..., :1] * Y[..., 1:] + Y[..., :1] * X[..., 1:]], -1)
            for X, Y in zip(U, V)])

    def divide(self, lam, w):
        """``λ ⋄ w``, the solution ``r`` of ``λ ∘ r = w`` (``λ`` interior)."""
        (l_l, L), (w_l, W) = self.split(lam), self.split(w)
        blocks = []
        for X, Y in zip(L, W):
            l0, l1, w0, w1 = X[..., :1], X[..., 1:], Y[..., :1], Y[..., 1:]
            det = _lorentz_square(X).unsqueeze(-1)
            r0 = (l0 * w0 - (l1 * w1).sum(-1, keepdim=True)) / det
            blocks.append(torch.cat([r0, (w1 - r0 * l1) / l0], -1))
        return self.join(w_l / l_l, blocks)

    def max_step(self, v, dv):
        """The largest ``α ≤ 1`` with ``v + α dv ∈ K`` (``v`` interior), per member: the
        ratio test on nonnegative rows, the smallest positive root of
        ``(v₀ + α dv₀)² − ‖v₁ + α dv₁‖² = 0`` on a second-order cone."""
        (v_l, Vs), (d_l, Ds) = self.split(v), self.split(dv)
        ratios = [torch.where(d_l < 0, -v_l / d_l, torch.full_like(v_l, float("inf")))]
        for V, D in zip(Vs, Ds):
            a = _lorentz_square(D)
            half_b = V[..., 0] * D[..., 0] - (V[..., 1:] * D[..., 1:]).sum(-1)
            c = _lorentz_square(V).clamp(min=0.0)
            disc = (half_b * half_b - a * c).clamp(min=0.0).sqrt()
            # roots c / q and q / a with q = −(b/2 + sign(b/2) √disc): no cancellation
            q = -(half_b + torch.where(half_b >= 0, disc, -disc))
            inf = torch.full_like(a, float("inf"))
            r1 = torch.where(q != 0, c / q, inf)
            r2 = torch.where(a != 0, q / a, inf)
            root = torch.minimum(torch.where(r1 > 0, r1, inf), torch.where(r2 > 0, r2, inf))
            # no real root (then a > 0): f > 0 on the whole ray, which stays inside; v on
            # the boundary (c = 0 by round-off) with the ray pointing out: no step at all
            root = torch.where(half_b * half_b >= a * c, root, inf)
            ratios.append(torch.where((c <= 0) & (half_b < 0), 0.0, root))
        return torch.cat(ratios, -1).amin(-1).clamp(max=1.0) if self.size else \
            v.new_ones(v.shape[:1])


class _Scaling:
    """The Nesterov–Todd scaling ``W`` of the cone rows at ``(s, y)`` (both interior):
    ``W y = W⁻¹ s = λ``. ``apply(u, power)`` gives ``W^power u`` for ``power`` ±1 on
    ``u (B, m_c, r)``."""

    def __init__(self, cones: _Cones, s, y):
        self.cones = cones
        (s_l, Ss), (y_l, Ys) = cones.split(s), cones.split(y)
        self.w = (s_l / y_l).sqrt().unsqueeze(-1)
        self.soc = []
        for S, Y in zip(Ss, Ys):
            s_norm = _lorentz_square(S).clamp(min=0.0).sqrt()
            y_norm = _lorentz_square(Y).clamp(min=0.0).sqrt()
            S_bar = S / s_norm.unsqueeze(-1)
            Y_bar = Y / y_norm.unsqueeze(-1)
            gamma = ((1.0 + (S_bar * Y_bar).sum(-1)) / 2.0).clamp(min=0.0).sqrt()
            J_Y = torch.cat([Y_bar[..., :1], -Y_bar[..., 1:]], -1)
            w_bar = ((S_bar + J_Y) / (2.0 * gamma.unsqueeze(-1))).unsqueeze(-1)
            eta = (s_norm / y_norm).sqrt()[..., None, None]
            self.soc.append((w_bar[..., :1, :], w_bar[..., 1:, :], eta))
        self.lam = self.apply(y.unsqueeze(-1), 1).squeeze(-1)

    def apply(self, u, power: int):
        """``W u`` (``power = 1``) or ``W⁻¹ u`` (``power = -1``) for ``u (B, m_c, r)``:
        ``W̄⁻¹ = J W̄ J`` (``J = diag(1, −1, …, −1)``), so the inverse flips the sign of ``w₁``."""
        u_l, Us = self.cones.split(u)
        blocks = []
        for U, (w0, w1, eta) in zip(Us, self.soc):  # U (B, k, d, r)
            if power < 0:
                w1 = -w1
            u0, u1 = U[..., :1, :], U[..., 1:, :]
            w1u1 = (w1 * u1).sum(-2, keepdim=True)
            tail = u1 + (w1u1 / (1.0 + w0) + u0) * w1
            blocks.append((eta if power > 0 else 1.0 / eta)
                          * torch.cat([w0 * u0 + w1u1, tail], -2))
        return self.cones.join(u_l * self.w if power > 0 else u_l / self.w, blocks)


class _Newton:
    """The Newton matrix ``K = [[P, Aᵀ], [A, −H]]`` of one iteration, ``H = W²`` on the cone
    rows and zero on the ``mz`` zero rows, with the Cholesky factor ``L`` of its reduction
    ``P (+ ρI) + GᵀG``, ``G = [A_z/√δ; W⁻¹A_c]``. Vectors stack ``[x; y]`` with a trailing
    dimension of right-hand sides. ``P`` is None for a linear objective (``P = 0``), whose
    products are skipped."""

    def __init__(self, P, A, mz, scaling: _Scaling):
        self.P, self.A, self.mz, self.scaling = P, A, mz, scaling
        self.n = A.shape[-1]
        self.G = torch.cat([A[:, :mz] / DUAL_REGULARIZATION ** 0.5,
                            scaling.apply(A[:, mz:], -1)], 1)
        self.L, self.ok = cholesky_with_retries(
            self.G.mT @ self.G if P is None else torch.baddbmm(P, self.G.mT, self.G))

    def _scaled(self, v):
        """``[v_z/√δ; W⁻¹v_c]``: a dual-row vector in the units of ``G``."""
        mz = self.mz
        return torch.cat([v[:, :mz] / DUAL_REGULARIZATION ** 0.5,
                          self.scaling.apply(v[:, mz:], -1)], 1)

    def apply(self, u):
        """``K u``, exactly."""
        n, mz = self.n, self.mz
        dx, dy = u[:, :n], u[:, n:]
        top = _matvec(self.A.mT, dy)
        if self.P is not None:
            top = top + _matvec(self.P, dx)
        W = self.scaling
        H_dy = W.apply(W.apply(dy[:, mz:], 1), 1)
        bottom = _matvec(self.A, dx) - torch.cat([torch.zeros_like(dy[:, :mz]), H_dy], 1)
        return torch.cat([top, bottom], 1)

    def regularized_solve(self, r):
        """The solve with ``−δI`` in place of the zero block of ``H``: with
        ``t = [r_z/√δ; W⁻¹r_c]``, ``Δx = (P + GᵀG)⁻¹(r_x + Gᵀt)`` and
        ``Δy = [(GΔx − t)_z/√δ; W⁻¹(GΔx − t)_c]``."""
        n = self.n
        t = self._scaled(r[:, n:])
        dx = cholesky_solve_by_columns(r[:, :n] + _matvec(self.G.mT, t), self.L)
        return torch.cat([dx, self._scaled(_matvec(self.G, dx) - t)], 1)

    def solve(self, r, sweeps: int = REFINEMENT_STEPS):
        """``K⁻¹ r``: the regularized solve, refined against ``K`` while any member's
        residual is above ``REFINEMENT_RTOL`` times the size of its terms (at most
        ``sweeps`` sweeps)."""
        u = self.regularized_solve(r)
        for _ in range(sweeps):
            Ku = self.apply(u)
            residual = r - Ku
            size = torch.maximum(r.abs(), Ku.abs()).amax((1, 2))
            if not bool((residual.abs().amax((1, 2)) > REFINEMENT_RTOL * size).any()):
                break
            u = u + self.regularized_solve(residual)
        return u


@torch.no_grad()
def solve_conic_ipm(P, c, A, b, cones, *, tol: float = 1e-10,
                    max_iter: int = 100) -> ConicIPMResult:
    """Solve a batch of cone programs ``min ½xᵀPx + cᵀx  s.t.  A x + s = b, s ∈ K``.

    ``P (B, n, n)`` symmetric PSD (zeros for a linear objective), ``c (B, n)``,
    ``A (B, m, n)``, ``b (B, m)``; ``cones`` is SCS's dictionary (or a
    :class:`~torchdiffopt.backends.cones.ConeDims`) with zero, nonnegative and second-order
    cones only (:func:`supports`). Any float dtype and device; the iterations run in
    float64. See the module docstring for the method and :class:`ConicIPMResult` for what
    comes back (SCS's conventions)."""
    dims = ConeDims.from_dict(cones)
    if not supports(dims):
        raise ValueError("the batched conic interior point takes zero, nonnegative and "
                         "second-order cones only; use SCS or Clarabel for PSD, exponential "
                         "and power cones")
    f64, device = torch.float64, c.device
    P, c, A, b = (v.to(f64) for v in (P, c, A, b))
    B, n = c.shape
    m, mz = b.shape[1], dims.z
    if dims.size != m:
        raise ValueError(f"the cones have {dims.size} rows but A has {m}")
    cones = _Cones(dims, device)

    # internal row order (second-order cones grouped by size); one scale per row, shared
    # by the rows of a second-order cone
    A, b = A[:, cones.row_order], b[:, cones.row_order]
    row_norm = _inf_norm(A)
    z_norm, (l_norm, soc_norms) = row_norm[:, :mz], cones.split(row_norm[:, mz:])
    row_norm = torch.cat([z_norm, cones.join(l_norm, [
        V.amax(-1, keepdim=True).expand_as(V) for V in soc_norms])], 1)
    scale = 1.0 / torch.where(row_norm > 0, row_norm, torch.ones_like(row_norm))
    A_s, b_s = scale.unsqueeze(-1) * A, scale * b

    result = _iterate(P, c, A_s, b_s, mz, cones, tol, max_iter)
    x, y, s, status, iterations = result

    # a direction of unbounded descent makes the program unbounded only where it is feasible
    descent = status == DUAL_INFEASIBLE
    if bool(descent.any()):
        k = int(descent.sum())
        phase_one = _iterate(P.new_zeros(k, n, n), c.new_zeros(k, n), A_s[descent],
                             b_s[descent], mz, cones, tol, max_iter)
        status[descent] = torch.where(phase_one[3] == OPTIMAL, DUAL_INFEASIBLE, phase_one[3])
        iterations[descent] += phase_one[4]

    no_solution = ((status == PRIMAL_INFEASIBLE) | (status == DUAL_INFEASIBLE)).unsqueeze(-1)
    nan = torch.tensor(float("nan"), dtype=f64, device=device)
    y_out, s_out = torch.empty_like(y), torch.empty_like(s)
    y_out[:, cones.row_order] = torch.where(no_solution, nan, scale * y)
    s_out[:, cones.row_order] = torch.where(no_solution, nan, s / scale)
    return ConicIPMResult(x=torch.where(no_solution, nan, x), y=y_out, s=s_out,
                          status=status, iterations=iterations)


def _iterate(P, c, A, b, mz, cones: _Cones, tol, max_iter):
    """The interior point on row-scaled data: ``(x, y, s, status, iterations)``."""
    f64, device = torch.float64, c.device
    B, n = c.shape
    m = b.shape[1]
    norm_c, norm_b = _inf_norm(c), _inf_norm(b)
    P_or_none = P if bool(P.any()) else None  # None: a linear objective, its products skipped

    def pad(v):  # cone-row values → all rows
        return torch.cat([v.new_zeros(v.shape[0], mz, *v.shape[2:]), v], 1)

    # initial point: [[P, Aᵀ], [A, −I]] [x; y] = [−c; b] (W = I), shifted into the cone
    ones = torch.ones(B, cones.size, dtype=f64, device=device)
    unit = _Scaling(cones, ones * cones.identity, ones * cones.identity)
    newton = _Newton(P_or_none, A, mz, unit)
    u = newton.solve(torch.cat([-c, b], -1).unsqueeze(-1)).squeeze(-1)
    x, y = u[:, :n], u[:, n:].clone()
    s = cones.shift_inside(-y[:, mz:])
    y[:, mz:] = cones.shift_inside(y[:, mz:])
    tau = torch.ones(B, dtype=f64, device=device)
    kappa = torch.ones_like(tau)

    running = newton.ok.clone()
    status = torch.full((B,), NOT_CONVERGED, dtype=torch.int64, device=device)
    iterations = torch.zeros(B, dtype=torch.int64, device=device)
    out = [torch.full((B, size), float("nan"), dtype=f64, device=device)
           for size in (n, m, m)]

    def record(members, verdict):
        if bool(members.any()):
            t = tau.unsqueeze(-1)
            for o, v in zip(out, (x / t, y / t, pad(s) / t)):
                o[members] = v[members]
            status[members] = verdict[members]

    for it in range(max_iter + 1):
        Px = torch.zeros_like(x) if P_or_none is None else \
            _matvec(P, x.unsqueeze(-1)).squeeze(-1)
        Ax = _matvec(A, x.unsqueeze(-1)).squeeze(-1)
        Aty = _matvec(A.mT, y.unsqueeze(-1)).squeeze(-1)
        xPx, cx, by, sy = _dot(x, Px), _dot(c, x), _dot(b, y), _dot(s, y[:, mz:])
        r1 = Px + Aty + c * tau.unsqueeze(-1)
        r2 = Ax + pad(s) - b * tau.unsqueeze(-1)
        r3 = cx + by + xPx / tau + kappa

        t2 = tau * tau
        verdict, done = stopping_verdict(tol, x, y, pad(s), tau, kappa, Px, Ax, Aty, r1, r2,
                                         xPx, cx, by, sy, norm_c, norm_b)
        finished = running & done
        if it == max_iter:
            finished = running
        record(finished, verdict)
        running = running & ~finished
        if not bool(running.any()):
            break

        # frozen members keep a harmless scaling (their steps are discarded)
        e = cones.identity
        yc = y[:, mz:]
        inside = running.unsqueeze(-1)
        scaling = _Scaling(cones, torch.where(inside, s, e), torch.where(inside, yc, e))
        newton = _Newton(P_or_none, A, mz, scaling)
        record(running & ~newton.ok, torch.full_like(verdict, NOT_CONVERGED))
        running &= newton.ok
        go = running.unsqueeze(-1)
        iterations += running
        lam = scaling.lam
        c_xi = c + 2.0 * Px / tau.unsqueeze(-1)
        # K⁻¹[−c; b], the part in Δτ, and the predictor's K⁻¹ (its complementarity term
        # W(λ⋄(λ∘λ)) = Wλ = s), in one solve
        both = newton.solve(torch.stack([torch.cat([-c, b], -1),
                                         torch.cat([-r1, -r2 + pad(s)], -1)], -1))
        x2, y2 = both[:, :n, 0], both[:, n:, 0]

        def direction(sol, d_tau, d_kappa, keep):
            """The step from ``sol``, ``K⁻¹`` of the right-hand side without the part in
            Δτ, for the residuals scaled by ``keep`` and ``d_tau``, ``d_kappa``."""
            x1, y1 = sol[:, :n], sol[:, n:]
            dtau = (-d_tau + d_kappa / tau - _dot(c_xi, x1) - _dot(b, y1)) / (
                _dot(c_xi, x2) + _dot(b, y2) - xPx / t2 - kappa / tau)
            dx = x1 + dtau.unsqueeze(-1) * x2
            dy = y1 + dtau.unsqueeze(-1) * y2
            # Δs from the primal row A Δx + Δs − b Δτ = −r₂ rather than from the
            # complementarity row: near the end W² spans many orders of magnitude, and
            # −W(λ⋄d) − W²Δy would leave its round-off in the primal residual
            Adx = _matvec(A[:, mz:], dx.unsqueeze(-1)).squeeze(-1)
            ds = b[:, mz:] * dtau.unsqueeze(-1) - keep * r2[:, mz:] - Adx
            dkappa = -(d_kappa + kappa * dtau) / tau
            return dx, dy, ds, dtau, dkappa

        def max_step(dy, ds, dtau, dkappa):
            alpha = torch.minimum(cones.max_step(s, ds), cones.max_step(yc, dy[:, mz:]))
            for v, dv in ((tau, dtau), (kappa, dkappa)):
                alpha = torch.minimum(alpha, torch.where(dv < 0, -v / dv, 1.0))
            return alpha.clamp(max=1.0)

        # predictor (affine step): sets the centering σ and the second-order term
        mu = (sy + tau * kappa) / (cones.degree + 1)
        one = torch.ones_like(tau).unsqueeze(-1)
        _, dy_a, ds_a, dtau_a, dkappa_a = direction(both[..., 1], r3, tau * kappa, one)
        sigma = (1.0 - max_step(dy_a, ds_a, dtau_a, dkappa_a)) ** 3

        # corrector: centering and Mehrotra's second-order term (W⁻¹Δs_a) ∘ (WΔy_a),
        # linearized as λ∘(WΔy + W⁻¹Δs) = −d_s
        W_inv_ds_a = scaling.apply(ds_a.unsqueeze(-1), -1).squeeze(-1)
        W_dy_a = scaling.apply(dy_a[:, mz:].unsqueeze(-1), 1).squeeze(-1)
        d_s = (cones.product(lam, lam) + cones.product(W_inv_ds_a, W_dy_a)
               - (sigma * mu).unsqueeze(-1) * e)
        d_kappa = tau * kappa + dtau_a * dkappa_a - sigma * mu
        keep = (1.0 - sigma).unsqueeze(-1)
        W_div = scaling.apply(cones.divide(lam, d_s).unsqueeze(-1), 1).squeeze(-1)
        sol = newton.solve(torch.cat([-keep * r1, -keep * r2 + pad(W_div)], -1).unsqueeze(-1))
        dx, dy, ds, dtau, dkappa = direction(sol.squeeze(-1), keep.squeeze(-1) * r3, d_kappa,
                                             keep)
        alpha = torch.where(running, STEP_FRACTION * max_step(dy, ds, dtau, dkappa), 0.0)
        a = alpha.unsqueeze(-1)
        x = torch.where(go, x + a * dx, x)
        y = torch.where(go, y + a * dy, y)
        s = torch.where(go, s + a * ds, s)
        tau = torch.where(running, tau + alpha * dtau, tau)
        kappa = torch.where(running, kappa + alpha * dkappa, kappa)

    return (*out, status, iterations)


def solve_ipm_conic(A, b, c, cones, P=None, *, accept: float = ACCEPT_RESIDUAL,
                    **options) -> ConicSolution:
    """One cone program through :func:`solve_conic_ipm` (dense copies of ``A`` and ``P``),
    as a conic adapter (:mod:`.cone_program`): ``options`` are ``tol`` and ``max_iter``.

    Raises :class:`~torchdiffopt.errors.InfeasibleError` /
    :class:`~torchdiffopt.errors.UnboundedError` on a certificate,
    :class:`~torchdiffopt.errors.SolverError` when the iterations stop without a solution
    or the point has a relative residual above ``accept``, ``ValueError`` for unsupported
    cones, inconsistent sizes or non-finite data."""
    pr = cone_program(A, b, c, cones, P)
    m, n = pr.shape
    P_dense = pr.P.toarray() if pr.P is not None else np.zeros((n, n))
    data = (torch.as_tensor(v, dtype=torch.float64).unsqueeze(0)
            for v in (P_dense, pr.c, pr.A.toarray(), pr.b))
    res = solve_conic_ipm(*data, pr.dims, **options)
    code, iters = int(res.status[0]), int(res.iterations[0])
    if code != OPTIMAL:
        raise status_error(code, "the conic interior point")[1]
    return certify(pr, res.x[0].numpy(), res.y[0].numpy(), res.s[0].numpy(),
                   "the conic interior point", "solved", iters, accept)


__all__ = ["ConicIPMResult", "solve_conic_ipm", "solve_ipm_conic", "supports"]
