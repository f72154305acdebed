"""The torch layer: a parametric LP/QP as a differentiable, batched ``nn.Module``.

``Layer(model, parameters=[θ₁, …], outputs=[x, con, model.objective])`` maps parameter
tensors to the optimal primal values, duals (shadow prices) and optimal value. The map is

    θ  --D(θ), torch ops-->  QP data  --QPSolve (solver + KKT)-->  (x*, μ*, f*)  --> outputs

so torch autograd differentiates ``D(θ)`` and :class:`QPSolve` differentiates the solution
with respect to the data only, from one batched KKT factorization per call
(:mod:`torchdiffopt.backends.batched_quadratic`) shared by ``backward``, ``jvp``, every
``torch.func`` transform and :meth:`Layer.jacobian`.

Batching: a parameter tensor with one more leading dimension than the parameter's shape is
batched; the others broadcast, and their gradient is the **sum** over the batch.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch

from .backends.batched_quadratic import BatchedQuadraticKKT
from .backends.quadratic import bound_rows
from .compile.quadratic import QuadraticForm
from .errors import DegenerateSolutionWarning, NonconvexError, SolverError
from .modeling.model import ConstraintRef, Model, ObjectiveRef
from .modeling.expressions import Parameter, Variable
from .solvers import NumericQP, qp_solver, solve_highs, solve_scs
from .solvers.batch import solve_each, solve_qpth, status_of

#: largest relative KKT residual accepted from a solver
KKT_TOLERANCE = 1e-6
_F64 = torch.float64


class QPStructure:
    """The fixed structure of a batch of internal QPs (see
    :mod:`torchdiffopt.compile.quadratic`): sizes, sparsity patterns, row senses, bounds,
    and how to solve them (``solver``, ``n_jobs``)."""

    def __init__(self, n, m, P_rows, P_cols, C_rows, C_cols, sense, lb, ub,
                 solver=None, n_jobs=None):
        self.n, self.m = n, m
        self.P_rows, self.P_cols = np.asarray(P_rows), np.asarray(P_cols)
        self.C_rows, self.C_cols = np.asarray(C_rows), np.asarray(C_cols)
        self.sense, self.lb, self.ub = sense, lb, ub
        self.solver, self.n_jobs = solver, n_jobs
        self._P_flat = torch.as_tensor(self.P_rows * n + self.P_cols, dtype=torch.long)
        self._C_flat = torch.as_tensor(self.C_rows * n + self.C_cols, dtype=torch.long)

    def dense_P(self, vals: torch.Tensor) -> torch.Tensor:
        """``(..., nnz) → (..., n, n)``, adding repeated entries and taking the symmetric
        part (only ``½(P + Pᵀ)`` enters ``½ xᵀPx``)."""
        out = vals.new_zeros(*vals.shape[:-1], self.n * self.n)
        P = out.index_add(-1, self._P_flat.to(vals.device), vals).unflatten(-1, (self.n, self.n))
        return 0.5 * (P + P.transpose(-1, -2))

    def dense_C(self, vals: torch.Tensor) -> torch.Tensor:
        out = vals.new_zeros(*vals.shape[:-1], self.m * self.n)
        return out.index_add(-1, self._C_flat.to(vals.device), vals).unflatten(-1, (self.m, self.n))

    def P_entries(self, dense: torch.Tensor) -> torch.Tensor:
        """Cotangent of the stored entries from a symmetric dense ``(..., n, n)`` cotangent
        (the adjoint of :meth:`dense_P`)."""
        return dense.flatten(-2)[..., self._P_flat.to(dense.device)]

    def C_entries(self, dense: torch.Tensor) -> torch.Tensor:
        return dense.flatten(-2)[..., self._C_flat.to(dense.device)]

    def numeric(self, P_vals, q, r, C_vals, c0) -> NumericQP:
        """One member's data for a CPU solver."""
        n, m = self.n, self.m
        return NumericQP(
            P=sp.csr_matrix((P_vals, (self.P_rows, self.P_cols)), shape=(n, n)), q=q,
            r=float(r), C=sp.csr_matrix((C_vals, (self.C_rows, self.C_cols)), shape=(m, n)),
            c0=c0, sense=self.sense, lb=self.lb, ub=self.ub)


class SolveCall:
    """One call of :class:`QPSolve`: its structure, and the side channel through which
    ``forward`` hands the factorized KKT system and per-member statuses on."""

    def __init__(self, structure: QPStructure):
        self.structure = structure
        self.kkt: BatchedQuadraticKKT | None = None
        self.status: list[str] = []
        self.errors: dict[int, Exception] = {}


def _solve_batch(call: SolveCall, P_vals, q, r, C_vals, c0):
    """Solve every member, build the batched KKT system, certify each member's point."""
    st = call.structure
    B, n = q.shape
    P, C = st.dense_P(P_vals), st.dense_C(C_vals)
    status = ["optimal"] * B
    errors: dict[int, Exception] = {}

    finite = torch.stack([t.reshape(B, -1).isfinite().all(-1)
                          for t in (P_vals, q, r.reshape(B, 1), C_vals, c0)]).all(0)
    eig = torch.linalg.eigvalsh(torch.where(finite.reshape(B, 1, 1), P, torch.zeros_like(P)))
    scale = eig.abs().amax(-1).clamp_min(1.0)
    convex = eig.amin(-1) >= -1e-9 * scale
    for b in torch.nonzero(~finite).flatten().tolist():
        status[b] = "invalid_data"
        errors[b] = ValueError("the problem data contain NaN or inf")
    for b in torch.nonzero(finite & ~convex).flatten().tolist():
        status[b] = "nonconvex"
        errors[b] = NonconvexError("nonconvex objective: the quadratic form is indefinite")

    b_cols, _, _ = bound_rows(st.lb, st.ub)
    valid = finite & convex
    solver = st.solver
    hint = None
    if solver == "qpth":
        strict = eig.amin(-1) > 1e-10 * scale
        for b in torch.nonzero(valid & ~strict).flatten().tolist():
            status[b] = "nonconvex"
            errors[b] = NonconvexError("qpth needs a strictly convex objective (P ≻ 0)")
        valid = valid & strict
        eye = torch.eye(n, dtype=q.dtype, device=q.device)
        x, mu_all, hint = _qpth(st, torch.where(valid.reshape(B, 1, 1), P, eye),
                                torch.where(valid.reshape(B, 1), q, 0.0), C, c0)
    else:
        x, mu_all, valid = _cpu_solve(st, solver, P_vals, q, r, C_vals, c0, valid, b_cols,
                                      status, errors, range(B))
    kkt = BatchedQuadraticKKT(P, q, C, c0, st.sense, st.lb, st.ub, x, mu_all, valid, hint)

    bad = valid & (kkt.kkt_residual > KKT_TOLERANCE)
    if bad.any() and solver in (None, "auto", "highs"):
        # HiGHS's QP solver can call a QP unbounded along a flat direction "optimal"; SCS,
        # which detects unboundedness, decides those members
        retry = torch.nonzero(bad).flatten().tolist()
        x2, mu2, valid2 = _cpu_solve(st, "scs", P_vals, q, r, C_vals, c0, valid, b_cols,
                                     status, errors, retry)
        x = torch.where(bad.reshape(B, 1), x2, x)
        mu_all = torch.where(bad.reshape(B, 1), mu2, mu_all)
        valid = valid & (valid2 | ~bad)
        kkt = BatchedQuadraticKKT(P, q, C, c0, st.sense, st.lb, st.ub, x, mu_all, valid, hint)
        bad = valid & (kkt.kkt_residual > KKT_TOLERANCE)
    for b in torch.nonzero(bad).flatten().tolist():
        status[b] = "not_optimal"
        errors[b] = SolverError(
            f"the solver's point is not optimal (relative KKT residual "
            f"{float(kkt.kkt_residual[b]):.1e}): infeasible, unbounded or badly scaled")
    kkt.valid = valid & ~bad

    degenerate = torch.nonzero(kkt.valid & (kkt.singular | kkt.weak)).flatten().tolist()
    if degenerate:
        warnings.warn(DegenerateSolutionWarning(
            f"batch members {degenerate}: singular KKT system or weakly active constraints; "
            "their derivatives are minimum-norm least-squares or one-sided derivatives"),
            stacklevel=6)
    call.kkt, call.status, call.errors = kkt, status, errors
    keep = kkt.valid.reshape(B, 1)
    x_out = torch.where(keep, kkt.x, torch.nan)
    mu_out = torch.where(keep, kkt.mu, torch.nan)
    f = (0.5 * torch.einsum("bi,bij,bj->b", kkt.x, P, kkt.x)
         + (q * kkt.x).sum(-1) + r)
    return x_out, mu_out, torch.where(kkt.valid, f, torch.nan)


def _cpu_solve(st, solver, P_vals, q, r, C_vals, c0, valid, b_cols, status, errors, members):
    """Solve ``members`` with a per-instance CPU solver, in a thread pool."""
    B, n = q.shape
    dev = q.device
    arrays = [t.detach().cpu().numpy() for t in (P_vals, q, r, C_vals, c0)]
    members = [b for b in members if bool(valid[b])]
    problems = [st.numeric(*(a[b] for a in arrays)) for b in members]
    chosen = {"scs": solve_scs, "highs": solve_highs}.get(solver)
    outcomes = solve_each(problems, chosen or (lambda p: qp_solver(solver, p)(p)), st.n_jobs)
    x = np.zeros((B, n))
    mu = np.zeros((B, st.m + len(b_cols)))
    ok = np.zeros(B, dtype=bool)
    for b, out in zip(members, outcomes):
        status[b] = status_of(out)
        if status[b] == "optimal":
            x[b] = out.x
            mu[b] = np.concatenate((-out.row_shadow, -out.bound_shadow[b_cols]))
            ok[b] = True
            errors.pop(b, None)
        else:
            errors[b] = out
    as_t = lambda a: torch.as_tensor(a, dtype=_F64, device=dev)  # noqa: E731
    return as_t(x), as_t(mu), torch.as_tensor(ok, device=dev)


def _qpth(st, P, q, C, c0):
    B, n = q.shape
    b_cols, b_c0, b_sense = bound_rows(st.lb, st.ub)
    E = torch.zeros(len(b_cols), n, dtype=q.dtype, device=q.device)
    E[torch.arange(len(b_cols)), torch.as_tensor(b_cols, dtype=torch.long)] = 1.0
    C_all = torch.cat((C, E.expand(B, -1, -1)), 1)
    c0_all = torch.cat((c0, torch.as_tensor(b_c0, dtype=q.dtype, device=q.device)
                        .expand(B, -1)), 1)
    sense_all = torch.as_tensor(np.concatenate((st.sense, b_sense)), device=q.device)
    return solve_qpth(P, q, C_all, c0_all, sense_all)


class QPSolve(torch.autograd.Function):
    """``(P_vals, q, r, C_vals, c0) ↦ (x*, μ*, f*)`` for a batch (leading dimension ``B``)
    of internal QPs, in float64. ``backward`` is the vector-Jacobian product, ``jvp`` the
    Jacobian-vector product, ``vmap`` folds a vmapped dimension into the batch."""

    @staticmethod
    def forward(call, P_vals, q, r, C_vals, c0):
        with torch.no_grad():
            return _solve_batch(call, P_vals, q, r, C_vals, c0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        call = inputs[0]
        ctx.kkt, ctx.structure = call.kkt, call.structure
        ctx.set_materialize_grads(True)

    @staticmethod
    def backward(ctx, x_bar, mu_bar, f_bar):
        kkt, st = ctx.kkt, ctx.structure
        keep = kkt.valid
        x_bar = torch.where(keep.reshape(-1, 1), x_bar, 0.0)
        mu_bar = torch.where(keep.reshape(-1, 1), mu_bar, 0.0)
        f_bar = torch.where(keep, f_bar, 0.0)
        P_bar, q_bar, r_bar, C_bar, c0_bar = kkt.vjp(x_bar, mu_bar, f_bar)
        return None, st.P_entries(P_bar), q_bar, r_bar, st.C_entries(C_bar), c0_bar

    @staticmethod
    def jvp(ctx, _call_tangent, dP_vals, dq, dr, dC_vals, dc0):
        kkt, st = ctx.kkt, ctx.structure
        like = kkt.x
        B, n, m = like.shape[0], st.n, st.m
        dP = st.dense_P(dP_vals) if dP_vals is not None else like.new_zeros(B, n, n)
        dC = st.dense_C(dC_vals) if dC_vals is not None else like.new_zeros(B, m, n)
        dq = dq if dq is not None else like.new_zeros(B, n)
        dr = dr if dr is not None else like.new_zeros(B)
        dc0 = dc0 if dc0 is not None else like.new_zeros(B, m)
        dx, dmu, df = kkt.jvp(dP.unsqueeze(1), dq.unsqueeze(1), dr.unsqueeze(1),
                              dC.unsqueeze(1), dc0.unsqueeze(1))
        return dx.squeeze(1), dmu.squeeze(1), df.squeeze(1)

    @staticmethod
    def vmap(info, in_dims, call, *tensors):
        dims = in_dims[1:]
        if all(d is None for d in dims):
            return QPSolve.apply(call, *tensors), (None, None, None)
        V = info.batch_size
        merged = []
        for t, d in zip(tensors, dims):
            t = t.unsqueeze(0).expand(V, *t.shape) if d is None else t.movedim(d, 0)
            merged.append(t.reshape(V * t.shape[1], *t.shape[2:]))
        outs = QPSolve.apply(call, *merged)
        return tuple(o.reshape(V, -1, *o.shape[1:]) for o in outs), (0, 0, 0)


def failure_error(status: list, errors: dict) -> Exception:
    failed = sorted(errors)
    causes = "; ".join(f"[{b}] {status[b]}: {errors[b]}" for b in failed[:5])
    more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
    kinds = {type(errors[b]) for b in failed}
    cls = kinds.pop() if len(kinds) == 1 else SolverError
    if not issubclass(cls, (SolverError, ValueError)):
        cls = SolverError
    return cls(f"optimization failed for batch members {failed}: {causes}{more}")


class Layer(torch.nn.Module):
    """An LP / convex QP as a differentiable function of some of its parameters.

    Args:
        model: the :class:`~torchdiffopt.Model` (its structure is compiled once, here).
        parameters: the parameters fed by the layer's inputs, in call order; the others keep
            their model values.
        outputs: variables (primal values), constraint references (duals, shadow-price
            convention) and ``model.objective`` (optimal value). One output returns a tensor,
            several a tuple.
        solver: ``"highs"``, ``"scs"``, ``"qpth"`` (batched, CPU or CUDA, strictly convex QPs)
            or ``None``/``"auto"``.
        backend: ``"quadratic"`` (KKT).
        n_jobs: threads for per-instance CPU solvers (default: the CPU count).
        on_failure: ``"raise"`` (a named error listing the failed batch members) or ``"nan"``
            (failed members give NaN outputs and zero gradients; the rest of the batch goes on).

    After each call, ``last_status`` holds one status per batch member (``"optimal"``,
    ``"infeasible"``, ``"unbounded"``, ``"nonconvex"``, ``"invalid_data"``, ``"not_optimal"``,
    ``"solver_error"``).
    """

    def __init__(self, model: Model, parameters, outputs, solver=None, backend="quadratic",
                 n_jobs=None, on_failure="raise"):
        super().__init__()
        if backend != "quadratic":
            raise ValueError(f"unknown backend {backend!r}; available: 'quadratic'")
        if on_failure not in ("raise", "nan"):
            raise ValueError("on_failure must be 'raise' or 'nan'")
        solver = model.solver if solver is None else solver
        if solver not in (None, "auto", "highs", "scs", "qpth"):
            raise ValueError(f"unknown solver {solver!r}; available: 'highs', 'scs', 'qpth', "
                             "'auto'")
        self.model = model
        self.parameters_in = list(parameters)
        for p in self.parameters_in:
            if not isinstance(p, Parameter) or p.model is not model:
                raise ValueError(f"{p!r} is not a parameter of this model")
        self.outputs_spec = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        for o in self.outputs_spec:
            if not isinstance(o, (Variable, ConstraintRef, ObjectiveRef)) or o.model is not model:
                raise ValueError(f"{o!r} is not a variable, constraint or objective of this model")
        self._single = not isinstance(outputs, (list, tuple))
        self.form = QuadraticForm(model)
        probe = self.form.data({p: torch.as_tensor(p.value, dtype=_F64)
                                for p in self.form.parameters})
        self.structure = QPStructure(
            self.form.n, self.form.m, probe.P_rows, probe.P_cols, probe.C_rows, probe.C_cols,
            self.form.sense, self.form.lb, self.form.ub, solver, n_jobs)
        self.on_failure = on_failure
        self.last_status: list[str] | None = None

    # -- inputs -------------------------------------------------------------------------
    def _batch(self, params):
        if len(params) != len(self.parameters_in):
            raise ValueError(f"the layer takes {len(self.parameters_in)} parameter tensors "
                             f"({[p.name for p in self.parameters_in]}), got {len(params)}")
        batch = None
        ref = None
        for p, t in zip(self.parameters_in, params):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"parameter {p.name!r}: expected a torch.Tensor")
            shape = tuple(t.shape)
            if shape == p.shape:
                continue
            if len(shape) == len(p.shape) + 1 and shape[1:] == p.shape:
                if batch is not None and shape[0] != batch:
                    raise ValueError(f"batch size mismatch: parameter {p.name!r} has batch "
                                     f"size {shape[0]}, parameter {ref!r} {batch}")
                batch, ref = shape[0], p.name
                continue
            raise ValueError(f"parameter {p.name!r} has shape {p.shape}; got a tensor of shape "
                             f"{shape} (expected {p.shape} or (batch, *{p.shape}))")
        self._check_finite(params)
        return batch

    def _check_finite(self, params):
        for p, t in zip(self.parameters_in, params):
            if torch._C._functorch.is_functorch_wrapped_tensor(t):
                continue  # under a torch.func transform: QPSolve reports bad data per member
            bad = ~torch.isfinite(t.detach())
            if bad.any():
                where = ""
                if t.dim() > p.ndim:
                    idx = torch.nonzero(bad.reshape(t.shape[0], -1).any(-1)).flatten().tolist()
                    where = f" at batch members {idx}"
                raise ValueError(f"parameter {p.name!r} contains NaN or inf{where}")

    # -- the map --------------------------------------------------------------------------
    def _theta(self, params, device, detach=False):
        """All of the form's parameter tensors (float64): the inputs, else model values."""
        given = dict(zip(self.parameters_in, params))
        return tuple((given[p].detach() if detach else given[p]).to(_F64) if p in given
                     else torch.as_tensor(p.value, dtype=_F64, device=device)
                     for p in self.form.parameters)

    @staticmethod
    def _batched(values, B, device):
        """Data values ``(P_vals, q, r, C_vals, c0)`` expanded to a leading batch ``B``
        (expanding makes the gradient of a broadcast parameter the sum over the batch)."""
        P_vals, q, r, C_vals, c0 = values
        out = [t.expand(B, *t.shape[-1:]) for t in (P_vals, q, r.reshape(-1, 1), C_vals, c0)]
        out[2] = out[2].reshape(B)
        return [t.to(device) for t in out]

    def _solve(self, values, B, device):
        call = SolveCall(self.structure)
        x, mu, f = QPSolve.apply(call, *self._batched(values, B, device))
        self.last_status = call.status
        if call.errors and self.on_failure == "raise":
            raise failure_error(call.status, call.errors)
        return call, x, mu, f

    def forward(self, *params):
        batch = self._batch(params)
        like = params[0] if params else torch.zeros(())
        dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
        theta = self._theta(params, like.device)
        _, x, mu, f = self._solve(self.form.data_values(*theta), batch or 1, like.device)
        outs = [self._output(o, x, mu, f) for o in self.outputs_spec]
        if batch is None:
            outs = [o.squeeze(0) for o in outs]
        outs = [o.to(dtype) for o in outs]
        return outs[0] if self._single else tuple(outs)

    def _output(self, spec, x, mu, f):
        sign = self.form.objective_sign
        B = x.shape[0]
        if isinstance(spec, Variable):
            return x[:, spec.offset: spec.offset + spec.size].reshape(B, *spec.shape)
        if isinstance(spec, ConstraintRef):
            rows = torch.as_tensor(self.form.rows_of(spec).ravel(), device=x.device)
            return (-sign * mu[:, rows]).reshape(B, *spec.shape)
        return sign * f

    def jacobian(self, *params):
        """Jacobians of every output with respect to every layer parameter, for each batch
        member, from one factorization and one multi-right-hand-side solve.

        Returns ``J[i][j]`` of shape ``(B, *output_i.shape, *parameter_j.shape)`` (no ``B``
        for an unbatched call); dtype float64.
        """
        batch = self._batch(params)
        B = batch or 1
        device = params[0].device if params else torch.device("cpu")
        theta = self._theta(params, device, detach=True)
        index = {p: k for k, p in enumerate(self.form.parameters)}
        directions = []  # one tangent per scalar entry of each layer parameter
        for p in self.parameters_in:
            k = index[p]
            for j in range(p.size):
                tangent = [torch.zeros_like(t) for t in theta]
                tangent[k].view(*tangent[k].shape[: tangent[k].dim() - p.ndim], p.size)[..., j] = 1
                directions.append(tuple(tangent))
        with torch.no_grad():
            call, _, _, _ = self._solve(self.form.data_values(*theta), B, device)
            tangents = [self._batched(self.form.data_jvp(theta, d), B, device)
                        for d in directions]
            stacked = [torch.stack([t[k] for t in tangents], 1) for k in range(5)]
            st = self.structure
            dx, dmu, df = call.kkt.jvp(st.dense_P(stacked[0]), stacked[1], stacked[2],
                                       st.dense_C(stacked[3]), stacked[4])
        result = []
        for spec in self.outputs_spec:
            per_dir = self._output(spec, dx.flatten(0, 1), dmu.flatten(0, 1), df.flatten(0, 1))
            per_dir = per_dir.reshape(B, len(directions), *per_dir.shape[1:])
            row, k = [], 0
            for p in self.parameters_in:
                block = per_dir[:, k:k + p.size].movedim(1, -1)
                block = block.reshape(*block.shape[:-1], *p.shape)
                row.append(block if batch is not None else block.squeeze(0))
                k += p.size
            result.append(row)
        return result


__all__ = ["Layer", "QPSolve", "QPStructure", "SolveCall"]
