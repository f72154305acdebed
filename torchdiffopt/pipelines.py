"""Model → solve → factorized optimality system, one class per backend.

Each pipeline compiles a model once and offers the same four operations on the *internal*
(minimization) problem, in the sign conventions of :mod:`torchdiffopt.backends.quadratic`
(row multipliers ``μ``, shadow prices ``-μ``):

* ``solve(theta) -> Solved``: solve at parameter tensors θ and factorize the KKT system;
* ``forward(solved, directions, objective_tangents, constraint_tangents)
  -> (dx, dμ, df*)``: parameter directions and functional tangents (they add);
* ``reverse(solved, x̄, μ̄, f̄) -> (θ̄, DataCotangent)``: parameter cotangents and the
  cotangents of the functional API;
* ``rows_of(constraint)``: the constraint's rows.

:class:`QuadraticPipeline` goes through the problem data ``D(θ)`` (the quadratic form);
:class:`NonlinearPipeline` through torch callables ``f(x; θ)``, ``g(x; θ)``;
:class:`ConicPipeline` through the cone program's data ``(P, c, r, A, b)(θ)``
(:mod:`torchdiffopt.compile.conic`), whose rows map to the user's by a fixed matrix ``T``:
its multipliers ``μ = -Tᵀy`` and the functional API's data live on the user's rows, in the
same conventions as the quadratic backend's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch.func import grad, jacrev

from .backends.conic import ConicDerivative
from .backends.nonlinear import NonlinearKKT
from .backends.quadratic import DataCotangent, DataTangent, check_convex
from .compile.conic import ConicForm, is_conic
from .compile.nonlinear import NonlinearForm
from .compile.quadratic import QuadraticForm
from .linalg.threads import serial_numpy_blas
from .modeling.expressions import Evaluator, ValueEvaluator
from .qp_function import solve_and_certify
from .solvers import NumericQP, conic_solver
from .solvers.nlp import solve_slsqp


def _serial_blas_when_small(operation):
    """A pipeline's ``solve``, ``forward`` or ``reverse`` under
    :func:`~torchdiffopt.linalg.threads.serial_numpy_blas` for the ``order`` of the system
    it factorizes: their numpy and scipy linear algebra runs between torch operations, whose
    lingering threads would hold up OpenBLAS's (a nonlinear layer of 60 variables, batch
    8, forward and backward after a two-thread torch product: 0.84–0.93 → 0.50–0.54 s)."""

    @functools.wraps(operation)
    def serially(self, *args):
        with serial_numpy_blas(self.order):
            return operation(self, *args)

    return serially


@dataclass
class Solved:
    """A solution: the point, the internal multipliers of the constraint rows, the internal
    optimal value, and the backend's factorized system (``kkt``)."""

    theta: tuple
    x: np.ndarray
    mu: np.ndarray
    objective: float
    kkt: object
    data: object = None


class QuadraticPipeline:
    """LP / convex QP: ``D(θ)`` → HiGHS or SCS → :class:`QuadraticKKT`."""

    def __init__(self, model):
        self.model = model
        self.form = QuadraticForm(model)

    @property
    def order(self) -> int:
        """The KKT system's: variables, constraint rows and finite bounds."""
        form = self.form
        return form.n + form.m + int(np.isfinite(form.lb).sum() + np.isfinite(form.ub).sum())

    def rows_of(self, constraint) -> np.ndarray:
        return self.form.rows_of(constraint)

    @_serial_blas_when_small
    def solve(self, theta: tuple) -> Solved:
        form = self.form
        data = form.data(dict(zip(form.parameters, theta)))
        problem = NumericQP(
            P=data.P_matrix(), q=data.q.detach().numpy().copy(), r=float(data.r),
            C=data.C_matrix(), c0=data.c0.detach().numpy().copy(), sense=data.sense,
            lb=data.lb, ub=data.ub)
        kkt = solve_and_certify(problem, self.model.solver, form.objective_sign < 0)
        kkt.warn_if_degenerate()
        x = kkt.x
        value = 0.5 * x @ (problem.P @ x) + problem.q @ x + problem.r
        return Solved(theta, x, kkt.mu, float(value), kkt, data)

    @_serial_blas_when_small
    def forward(self, solved: Solved, directions, objective_tangents, constraint_tangents):
        form, data = self.form, solved.data
        n, m = form.n, form.m
        t = functional_tangent(form, solved.theta, n, objective_tangents, constraint_tangents)
        if directions is not None:
            tP, tq, tr, tC, tc0 = (v.numpy() for v in form.data_jvp(solved.theta, directions))
            t.dP = t.dP + sp.csr_matrix((tP, (data.P_rows, data.P_cols)), shape=(n, n))
            t.dq, t.dr = t.dq + tq, t.dr + float(tr)
            t.dC = t.dC + sp.csr_matrix((tC, (data.C_rows, data.C_cols)), shape=(m, n))
            t.dc0 = t.dc0 + tc0
        return solved.kkt.jvp(t)

    @_serial_blas_when_small
    def reverse(self, solved: Solved, x_bar, mu_bar, f_bar):
        data = solved.data
        cot = solved.kkt.vjp(x_bar, mu_bar, f_bar)
        bars = (cot.P_at(data.P_rows, data.P_cols), cot.q, np.array(cot.r),
                cot.C_at(data.C_rows, data.C_cols), cot.c0)
        return parameter_cotangents(self.form, solved.theta, bars), cot


class ConicPipeline:
    """Cone programs (and LPs, QPs): ``(P, c, r, A, b)(θ)`` → SCS or Clarabel →
    :class:`~torchdiffopt.backends.conic.ConicDerivative` (refined, factorized once).
    ``solver`` (default: the model's) is ``"scs"``, ``"auto"`` (SCS) or ``"clarabel"``."""

    def __init__(self, model, solver: str | None = None):
        self.solve_conic = conic_solver(model.solver if solver is None else solver)
        self.model = model
        self.form = ConicForm(model)

    @property
    def order(self) -> int:
        """The residual map's: the cone program's variables (epigraph ones included) and
        cone rows."""
        return self.form.n_total + self.form.rows

    def rows_of(self, constraint) -> np.ndarray:
        return self.form.rows_of(constraint)

    @_serial_blas_when_small
    def solve(self, theta: tuple) -> Solved:
        form = self.form
        data = form.data(dict(zip(form.parameters, theta)))
        A, P = data.A_matrix(), data.P_matrix()
        b, c = data.b.detach().numpy().copy(), data.c.detach().numpy().copy()
        if P is not None:
            check_convex(P, form.objective_sign < 0)
        sol = self.solve_conic(A, b, c, data.cones, P)
        deriv = ConicDerivative(A, b, c, data.cones, sol.x, sol.y, sol.s, P)
        x = deriv.x
        value = c @ x + float(data.r) + (0.0 if P is None else 0.5 * x @ (P @ x))
        return Solved(theta, x[:form.n], -(data.T.T @ deriv.y), float(value), deriv, data)

    @_serial_blas_when_small
    def forward(self, solved: Solved, directions, objective_tangents, constraint_tangents):
        form, data, deriv = self.form, solved.data, solved.kkt
        N = data.n_total
        t = functional_tangent(form, solved.theta, N, objective_tangents, constraint_tangents)
        dP, dc, dr = t.dP, t.dq, t.dr
        dA, db = -(data.T @ t.dC), data.T @ t.dc0
        if directions is not None:
            tP, tc, tr, tA, tb = (v.numpy() for v in form.data_jvp(solved.theta, directions,
                                                                    nestable=True))
            dP = dP + sp.csr_matrix((tP, (data.P_rows, data.P_cols)), shape=(N, N))
            dc, dr = dc + tc, dr + float(tr)
            dA = dA + sp.csr_matrix((tA, (data.A_rows, data.A_cols)), shape=dA.shape)
            db = db + tb
        dx, dy, _ = deriv.jvp(sp.csr_matrix(dA), db, dc, sp.csr_matrix(dP))
        x, y = deriv.x, deriv.y
        # envelope theorem on L = ½xᵀPx + cᵀx + r + yᵀ(Ax + s - b)
        df = 0.5 * x @ (dP @ x) + dc @ x + dr + y @ (dA @ x - db)
        return dx[:form.n], -(data.T.T @ dy), float(df)

    @_serial_blas_when_small
    def reverse(self, solved: Solved, x_bar, mu_bar, f_bar):
        data, deriv = solved.data, solved.kkt
        x, y = deriv.x, deriv.y
        x_bar = np.concatenate((x_bar, np.zeros(data.n_total - len(x_bar))))
        r1, r2 = deriv.adjoint(x_bar, -(data.T @ mu_bar))
        # the user rows' cotangents in the quadratic backend's form: u = r₁, v = Tᵀr₂
        cot = DataCotangent(x, solved.mu, r1, data.T.T @ r2, float(f_bar))
        bars = (cot.P_at(data.P_rows, data.P_cols), cot.q, np.array(cot.r),
                y[data.A_rows] * cot.q[data.A_cols] - r2[data.A_rows] * x[data.A_cols],
                r2 - f_bar * y)
        return parameter_cotangents(self.form, solved.theta, bars), cot


class NonlinearPipeline:
    """Smooth NLP: torch callables → SLSQP → :class:`NonlinearKKT` (Newton-polished)."""

    def __init__(self, model):
        self.model = model
        self.form = NonlinearForm(model)
        self._last_x: np.ndarray | None = None

    @property
    def order(self) -> int:
        """The KKT system's: variables and constraint rows."""
        return self.form.n + self.form.m

    def rows_of(self, constraint) -> np.ndarray:
        return self.form.rows_of(constraint)

    def start(self) -> np.ndarray:
        """User start values where given, else the last solution, else zero; in the bounds."""
        form = self.form
        x0 = self._last_x.copy() if self._last_x is not None else np.zeros(form.n)
        given = ~np.isnan(self.model.start_values())
        x0[given] = self.model.start_values()[given]
        return np.clip(x0, form.lb, form.ub)

    @_serial_blas_when_small
    def solve(self, theta: tuple) -> Solved:
        form = self.form
        as_t = lambda x: torch.as_tensor(x, dtype=torch.float64)  # noqa: E731
        f = lambda z: form.objective(z, theta)  # noqa: E731
        g = lambda z: form.constraints_value(z, theta)  # noqa: E731
        x = solve_slsqp(
            lambda x: float(f(as_t(x))), lambda x: grad(f)(as_t(x)).numpy(),
            lambda x: g(as_t(x)).numpy(),
            lambda x: jacrev(g)(as_t(x)).numpy().reshape(form.m, form.n),
            form.sense, form.lb, form.ub, self.start())
        kkt = NonlinearKKT(form, theta, x)
        kkt.certify()
        self._last_x = kkt.x.copy()
        return Solved(theta, kkt.x, kkt.mu, float(f(kkt.x_t)), kkt)

    def _tangent_fn(self, theta, objective_tangents, constraint_tangents):
        if not objective_tangents and not constraint_tangents:
            return None
        form = self.form
        params = dict(zip(form.parameters, theta))

        def tangent(z):
            ev = ValueEvaluator(z, params)
            e_f = z.new_zeros(())
            for expr in objective_tangents:
                e_f = e_f + form.objective_sign * ev.value(expr).sum()
            e_g = z.new_zeros(form.m)
            for constraint, expr in constraint_tangents:
                rows = torch.as_tensor(form.rows_of(constraint).ravel())
                value = ev.value(expr).expand(tuple(constraint.shape)).reshape(-1)
                e_g = e_g.index_add(0, rows, value)
            return e_f, e_g

        return tangent

    @_serial_blas_when_small
    def forward(self, solved: Solved, directions, objective_tangents, constraint_tangents):
        theta = solved.theta
        if directions is None:
            directions = tuple(torch.zeros_like(t) for t in theta)
        tangent = self._tangent_fn(theta, objective_tangents, constraint_tangents)
        return solved.kkt.jvp(directions, tangent)

    @_serial_blas_when_small
    def reverse(self, solved: Solved, x_bar, mu_bar, f_bar):
        return solved.kkt.vjp(x_bar, mu_bar, f_bar)


def functional_tangent(form, theta: tuple, n: int, objective_tangents,
                       constraint_tangents) -> DataTangent:
    """The tangent of the internal data seeded by the functional API, over ``n`` variables
    and the user's rows: objective tangents (internal sign) and constraint-function tangents
    ``(dC, dc0)``."""
    m = form.m
    dP, dq, dr = sp.csr_matrix((n, n)), np.zeros(n), 0.0
    dC, dc0 = sp.csr_matrix((m, n)), np.zeros(m)
    ev = Evaluator(dict(zip(form.parameters, theta)))
    sign = form.objective_sign
    for expr in objective_tangents:
        canon = ev.canon(expr.sum() if expr.shape else expr)
        i, j = canon.quad.vars
        v = canon.quad.vals.numpy()
        dP = dP + sign * sp.csr_matrix(
            (np.concatenate((v, v)), (np.concatenate((i, j)), np.concatenate((j, i)))),
            shape=(n, n))
        dq = dq + sign * np.bincount(canon.lin.vars[0], canon.lin.vals.numpy(), minlength=n)
        dr += sign * float(canon.const.sum())
    for constraint, expr in constraint_tangents:
        rows = form.rows_of(constraint).ravel()
        canon = ev.broadcast(expr, tuple(constraint.shape))
        dC = dC + sp.csr_matrix(
            (canon.lin.vals.numpy(), (rows[canon.lin.rows], canon.lin.vars[0])), shape=(m, n))
        np.add.at(dc0, rows, canon.const.numpy())
    return DataTangent(dP, dq, dr, dC, dc0)


def parameter_cotangents(form, theta: tuple, bars: tuple) -> tuple:
    """``θ̄ = (∂D/∂θ)ᵀ D̄`` by torch autograd through ``form.data_values``, for the cotangents
    ``bars`` of the data values (zeros for parameters the data do not depend on)."""
    if not form.parameters:
        return ()
    theta = tuple(t.detach().clone().requires_grad_(True) for t in theta)
    with torch.enable_grad():
        values = form.data_values(*theta)
    pairs = [(v, torch.as_tensor(b, dtype=v.dtype).reshape(v.shape))
             for v, b in zip(values, bars) if v.requires_grad]
    grads = (torch.autograd.grad([v for v, _ in pairs], theta, [b for _, b in pairs],
                                 allow_unused=True) if pairs else [None] * len(theta))
    return tuple(torch.zeros_like(t) if g is None else g for t, g in zip(theta, grads))


PIPELINES = {"quadratic": QuadraticPipeline, "nonlinear": NonlinearPipeline}


def pipeline_for(model, backend: str | None = None, solver: str | None = None):
    """The pipeline of ``backend`` (default: the model's) with ``solver`` (default: the
    model's; only the conic pipeline takes it, the others read the model's). ``"auto"``:
    conic when a cone constraint or a norm atom appears, else nonlinear when the objective is
    not quadratic or a constraint not affine, else (LP/QP) quadratic, or conic when the
    solver is the conic-only Clarabel."""
    backend = model.backend if backend is None else backend
    solver = model.solver if solver is None else solver
    if backend == "auto":
        if is_conic(model):
            backend = "conic"
        else:
            nonlinear = (model.objective_expression is not None
                         and model.objective_expression.degree > 2) or any(
                c.relation.expression.degree > 1 for c in model.constraints)
            backend = ("nonlinear" if nonlinear
                       else "conic" if solver == "clarabel" else "quadratic")
    return ConicPipeline(model, solver) if backend == "conic" else PIPELINES[backend](model)
