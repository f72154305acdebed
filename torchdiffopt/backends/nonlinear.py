"""Nonlinear backend: implicit differentiation of the KKT conditions of a smooth NLP at a
local solution.

Internal problem (see :mod:`torchdiffopt.compile.nonlinear`): minimize ``f(x; θ)`` s.t.
``g(x; θ) ∈ S`` (rows ``= 0``, ``≥ 0``, ``≤ 0``) and ``lb ≤ x ≤ ub`` (folded in as rows
``x_j - lb_j ≥ 0``, ``x_j - ub_j ≤ 0``). With ``L(x, μ; θ) = f + μᵀ g`` (the sign convention
of the quadratic backend: ``μ ≤ 0`` on ``≥`` rows, ``μ ≥ 0`` on ``≤`` rows, shadow price
``-μ``) and the active set 𝒜, the KKT system and its Jacobian are

    F(x, μ_𝒜; θ) = [∇ₓL ; g_𝒜] = 0,        K = [[∇²ₓₓL, J_𝒜ᵀ], [J_𝒜, 0]]   (symmetric).

* Forward: ``K [dx; dμ_𝒜] = -(∂F/∂θ) dθ``;  ``df* = (∂L/∂θ) dθ`` (envelope theorem).
* Reverse: ``K [u; v] = -[x̄; μ̄_𝒜]``, then ``θ̄ = ∇_θ (uᵀ∇ₓL + vᵀg_𝒜 + f̄ L)``: ONE adjoint
  solve and ONE reverse pass through the model's torch functions, never the Jacobian
  ``∂F/∂θ`` (whose size grows with the number of parameters).

``∇²ₓₓL``, ``J`` and the θ-derivatives come from ``torch.func``; nothing is a finite
difference. The solver's point is first polished: the active set is identified, the
multipliers estimated by least squares, and Newton steps on ``F`` are taken (dropping
inequality rows whose multiplier has the wrong sign) until the relative KKT residual is at
round-off. A singular ``K`` (LICQ or strict complementarity failing) gives minimum-norm
derivatives, and a reduced Hessian that is not positive definite on the null space of
``J_𝒜`` (the second-order sufficient condition failing) is reported; both warn with a
:class:`~torchdiffopt.errors.DegenerateSolutionWarning`.
"""

from __future__ import annotations


import numpy as np
import scipy.linalg
import torch
from torch.func import grad, jacrev

from ..errors import SolverError, warn_degenerate
from ..linalg.factorization import factorize_symmetric
from ..nested_jvp import double_backward_jvp
from .quadratic import ACTIVE_RTOL, WEAK_RTOL, DataCotangent, bound_rows, largest_residual

_F64 = torch.float64
#: relative KKT residual a polished point must reach
KKT_TOLERANCE = 1e-9


class NonlinearKKT:
    """The factorized KKT system of an NLP at a local solution (see the module docstring).

    Built from the compiled form, the parameter tensors ``theta`` and the solver's point.
    Attributes: ``x``, ``mu`` (multipliers of the constraint rows), ``active`` (mask of
    binding constraint rows), ``singular``, ``weakly_active``, ``kkt_residual``.
    """

    def __init__(self, form, theta: tuple, x0: np.ndarray):
        self.form = form
        self.theta = tuple(t.detach() for t in theta)
        n, m = form.n, form.m
        self.n, self.m = n, m
        b_cols, b_c0, b_sense = bound_rows(form.lb, form.ub)
        self._b_cols = b_cols
        self._b_c0 = b_c0
        self._sense = np.concatenate((form.sense, b_sense))
        x = torch.as_tensor(x0, dtype=_F64)
        active = self._binding(x) | (self._sense == 0)
        for _ in range(6):  # active-set corrections
            x, mu_all = self._polish(x, active)
            rows = self._rows(x)
            tol = ACTIVE_RTOL * self._row_scale(x, self._jacobian(x))
            mu_scale = 1 + np.abs(mu_all).max(initial=0.0)
            wrong_sign = active & (self._sense * mu_all > 1e-9 * mu_scale)
            violated = ~active & (self._sense * rows < -tol)
            if not wrong_sign.any() and not violated.any():
                break
            active = (active & ~wrong_sign) | violated
        self.x_t = x
        self.mu_all = mu_all
        self.active_all = active
        self.x = x.numpy()
        self.mu = mu_all[:m]
        self.active = active[:m]
        self._factorize()
        mu_scale = 1.0 + np.abs(mu_all).max(initial=0.0)
        weak = active & (self._sense != 0) & (np.abs(mu_all) <= WEAK_RTOL * mu_scale)
        self.weakly_active = np.flatnonzero(weak[:m])
        self._weak_any = bool(weak.any())
        self.kkt_residual = self._residual()

    # -- pieces of the KKT system -----------------------------------------------------------
    def _rows(self, x: torch.Tensor) -> np.ndarray:
        """All rows: constraints ``g(x)`` then bounds ``x_j + c0``."""
        g = self.form.constraints_value(x, self.theta).detach().numpy()
        return np.concatenate((g, x.detach().numpy()[self._b_cols] + self._b_c0))

    def _row_scale(self, x: torch.Tensor, J: np.ndarray) -> np.ndarray:
        """``1 + ‖∇g_i‖∞ (1 + ‖x‖∞)``: the size a row's residual is measured against."""
        x_size = 1.0 + float(x.abs().max()) if x.numel() else 1.0
        return 1.0 + np.abs(J).max(axis=1, initial=0.0) * x_size

    def _binding(self, x: torch.Tensor) -> np.ndarray:
        return np.abs(self._rows(x)) <= ACTIVE_RTOL * self._row_scale(x, self._jacobian(x))

    def _jacobian(self, x: torch.Tensor) -> np.ndarray:
        """Jacobian of all rows (constraints, then unit rows of the bounds), dense."""
        n = self.n
        if self.m:
            Jg = jacrev(lambda z: self.form.constraints_value(z, self.theta))(x).numpy()
        else:
            Jg = np.zeros((0, n))
        E = np.zeros((len(self._b_cols), n))
        E[np.arange(len(self._b_cols)), self._b_cols] = 1.0
        return np.vstack((Jg.reshape(self.m, n), E))

    def _lagrangian(self, x, mu_c, theta):
        return self.form.lagrangian(x, mu_c, theta)

    def _hessian(self, x: torch.Tensor, mu_c: torch.Tensor) -> np.ndarray:
        # reverse over reverse (not torch.func.hessian's forward over reverse): this may run
        # inside a forward-mode AD level of the caller, and forward-mode levels cannot nest
        hess = jacrev(grad(lambda z: self._lagrangian(z, mu_c, self.theta)))(x)
        return hess.numpy().reshape(self.n, self.n)

    def _gradient_f(self, x: torch.Tensor) -> np.ndarray:
        return grad(lambda z: self.form.objective(z, self.theta))(x).numpy()

    def _polish(self, x: torch.Tensor, active: np.ndarray):
        """Multipliers by least squares on the active rows, then Newton on F = 0."""
        idx = np.flatnonzero(active)
        mu_all = np.zeros(len(self._sense))
        gf = self._gradient_f(x)
        scale = 1.0 + np.abs(gf).max(initial=0.0)
        if len(idx):
            mu_all[idx] = np.linalg.lstsq(self._jacobian(x)[idx].T, -gf, rcond=None)[0]
        for _ in range(30):
            mu_c = torch.as_tensor(mu_all[: self.m])
            J_all = self._jacobian(x)
            J = J_all[idx]
            stationarity = self._gradient_f(x) + J_all.T @ mu_all
            F = np.concatenate((stationarity, self._rows(x)[idx]))
            if np.abs(F).max(initial=0.0) <= 1e-13 * scale:
                break
            H = self._hessian(x, mu_c)
            K = np.block([[H, J.T], [J, np.zeros((len(idx), len(idx)))]])
            step = np.linalg.lstsq(K, -F, rcond=None)[0]
            x = x + torch.as_tensor(step[: self.n])
            mu_all[idx] = mu_all[idx] + step[self.n:]
        return x.detach(), mu_all

    def _factorize(self):
        idx = np.flatnonzero(self.active_all)
        self._idx = idx
        J = self._jacobian(self.x_t)[idx]
        H = self._hessian(self.x_t, torch.as_tensor(self.mu))
        K = np.block([[H, J.T], [J, np.zeros((len(idx), len(idx)))]])
        self._system = factorize_symmetric(K)
        self.singular = self._system.singular
        # second-order sufficient condition: ∇²L positive definite on null(J_𝒜)
        Z = scipy.linalg.null_space(J) if len(idx) else np.eye(self.n)
        reduced = Z.T @ H @ Z
        self.reduced_hessian_min = (float(np.linalg.eigvalsh(reduced).min())
                                    if reduced.size else np.inf)

    def _residual(self) -> float:
        x = self.x_t
        gf = self._gradient_f(x)
        J = self._jacobian(x)
        rows = self._rows(x)
        scale = 1.0 + max(np.abs(gf).max(initial=0.0),
                          (np.abs(J).T @ np.abs(self.mu_all)).max(initial=0.0))
        stationarity = np.abs(gf + J.T @ self.mu_all).max(initial=0.0) / scale
        row_scale = self._row_scale(x, J)
        violation = np.where(self._sense == 0, np.abs(rows), np.maximum(-self._sense * rows, 0))
        primal = (violation / row_scale).max(initial=0.0)
        dual = np.maximum(self._sense * self.mu_all, 0.0).max(initial=0.0) / scale
        complementarity = (np.abs(self.mu_all * rows) / (scale * row_scale)).max(initial=0.0)
        return largest_residual(stationarity, primal, dual, complementarity)

    def certify(self) -> None:
        """Raise unless the polished point satisfies the KKT conditions; warn when the
        derivative is degenerate (singular K, weakly active rows, SOSC failing)."""
        if self.kkt_residual > KKT_TOLERANCE:
            raise SolverError(
                f"no local optimum found (relative KKT residual {self.kkt_residual:.1e} after "
                "polishing): the problem may be locally infeasible, unbounded or nonsmooth here")
        if self.singular:
            warn_degenerate(
                "the KKT matrix is singular at this solution (linear independence of the active "
                "constraint gradients or strict complementarity fails); derivatives are "
                "minimum-norm least-squares derivatives")
        elif self.reduced_hessian_min <= 1e-10:
            warn_degenerate(
                "the second-order sufficient condition fails at this point (reduced Hessian "
                f"eigenvalue {self.reduced_hessian_min:.2e}): it may not be a strict local "
                "minimum, and derivatives describe the stationary point")
        elif self._weak_any:
            warn_degenerate(
                f"weakly active constraints (binding with a zero dual) at constraint rows "
                f"{list(self.weakly_active)} or bounds: derivatives are one-sided (these "
                "constraints kept binding)")

    # -- differentiation --------------------------------------------------------------------
    def _F_theta(self, theta: tuple):
        """``(∇ₓL, g_𝒜, L)`` as functions of θ at the fixed (x, μ)."""
        x, mu_c = self.x_t, torch.as_tensor(self.mu)
        grad_x = grad(lambda z: self._lagrangian(z, mu_c, theta))(x)
        g = self.form.constraints_value(x, theta)
        return grad_x, g, self._lagrangian(x, mu_c, theta)

    def _theta_jvp(self, directions: tuple):
        """``(∂F/∂θ) dθ`` for ``F = (∇ₓL, g, L)``, by reverse mode twice
        (:func:`~torchdiffopt.nested_jvp.double_backward_jvp`): the layer's own ``jvp`` may
        already run inside a forward-mode level."""
        if not self.theta:
            return np.zeros(self.n), np.zeros(self.m), 0.0
        _, tangents = double_backward_jvp(lambda *theta: self._F_theta(theta), self.theta,
                                          directions)
        jv = torch.cat([t.reshape(-1) for t in tangents]).numpy()
        return jv[: self.n].copy(), jv[self.n: self.n + self.m].copy(), float(jv[-1])

    def _solve(self, rhs_x: np.ndarray, rhs_rows: np.ndarray) -> tuple:
        z = self._system.solve(np.concatenate((rhs_x, rhs_rows[self._idx])))
        d_all = np.zeros(len(self._sense))
        d_all[self._idx] = z[self.n:]
        return z[: self.n], d_all[: self.m]

    def jvp(self, directions: tuple, tangent_fn=None):
        """``(dx, dμ, df*)`` for parameter directions ``dθ`` and, optionally, a functional
        tangent: ``tangent_fn(x) -> (e_f, e_g)``, the tangents of the internal objective and
        of the constraint rows as torch functions of ``x``."""
        rhs_x, rhs_g, df = self._theta_jvp(directions)
        if tangent_fn is not None:
            mu_c = torch.as_tensor(self.mu)

            def perturbation(z):
                e_f, e_g = tangent_fn(z)
                return e_f + mu_c @ e_g

            rhs_x += grad(perturbation)(self.x_t).numpy()
            e_f, e_g = tangent_fn(self.x_t)
            rhs_g += e_g.detach().numpy()
            df += float(e_f + mu_c @ e_g)
        rows = np.concatenate((rhs_g, np.zeros(len(self._sense) - self.m)))
        dx, dmu = self._solve(-rhs_x, -rows)
        return dx, dmu, df

    def vjp(self, x_bar: np.ndarray, mu_bar: np.ndarray, f_bar: float):
        """Parameter cotangents ``θ̄`` (a tuple) and the :class:`DataCotangent` of the
        functional API, for seeds on ``x``, the row multipliers and the optimal value."""
        rows = np.concatenate((mu_bar, np.zeros(len(self._sense) - self.m)))
        u, v = self._solve(-x_bar, -rows)
        cot = DataCotangent(self.x, self.mu, u, v, float(f_bar))
        theta = tuple(t.detach().requires_grad_(True) for t in self.theta)
        if not theta:
            return (), cot
        u_t, v_t = torch.as_tensor(u), torch.as_tensor(v)
        with torch.enable_grad():
            gx, g, L = self._F_theta(theta)
            total = u_t @ gx + v_t @ g + f_bar * L
            grads = torch.autograd.grad(total, theta, allow_unused=True)
        grads = tuple(torch.zeros_like(t) if gr is None else gr.detach()
                      for t, gr in zip(theta, grads))
        return grads, cot
