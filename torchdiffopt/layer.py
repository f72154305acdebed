"""The torch layer: a parametric optimization problem as a differentiable, batched ``nn.Module``.

``Layer(model, parameters=[θ₁, …], outputs=[x, con, model.objective])`` maps parameter
tensors to the optimal primal values, duals (shadow prices) and optimal value. The map is

    θ  --D(θ), torch ops-->  QP data  --QPSolve (solver + KKT)-->  (x*, μ*, f*)  --> outputs

so torch autograd differentiates ``D(θ)`` and :class:`~torchdiffopt.qp_function.QPSolve`
differentiates the solution with respect to the data only, from one KKT factorization per
call shared by ``backward``, ``jvp``, every ``torch.func`` transform and
:meth:`Layer.jacobian`. The conic backend works the same way: ``D(θ) = (P, c, r, A, b)`` of
the cone program (:mod:`torchdiffopt.compile.conic`, evaluated once for the whole batch) →
:class:`~torchdiffopt.conic_function.ConicSolve` (SCS or Clarabel per member, one batched
factorization of the residual-map Jacobians) → ``(x̃, y, s)``, read back as the model's
``x`` (the first ``n`` entries of ``x̃``), multipliers ``μ = -Tᵀy`` and optimal value (the
Lagrangian at the solution, :func:`~torchdiffopt.conic_function.conic_lagrangian`).

Batching: a parameter tensor with one more leading dimension than the parameter's shape is
batched; the others broadcast, and their gradient is the **sum** over the batch.

The nonlinear backend solves member by member through its pipeline
(:mod:`torchdiffopt.nlp_function`): torch differentiates nothing there, the pipeline's
reverse and forward operations give the parameters' cotangents and tangents directly.
"""

from __future__ import annotations

import numpy as np
import torch

from .backends.batched_conic import ConicPattern
from .conic_function import ConicCall, ConicSolve, ConicStructure, conic_lagrangian
from .modeling.expressions import Parameter, Variable
from .modeling.model import ConstraintRef, Model, ObjectiveRef
from .nlp_function import NLPCall, NLPSolve
from .pipelines import ConicPipeline, NonlinearPipeline, pipeline_for
from .folding import envelope_point, reject_nested_derivatives
from .linalg.threads import take_last
from .qp_function import QPSolve, QPStructure, SolveCall, failure_error

_F64 = torch.float64


class Layer(torch.nn.Module):
    """An optimization problem (LP, convex QP, cone program, or smooth NLP) as a
    differentiable function of some of its parameters.

    Args:
        model: the :class:`~torchdiffopt.Model` (its structure is compiled once, here).
        parameters: the parameters fed by the layer's inputs, in call order; the others keep
            their model values.
        outputs: variables (primal values), constraint references (duals, shadow-price
            convention) and ``model.objective`` (optimal value). One output returns a tensor,
            several a tuple.
        solver: ``None`` for the model's. For the quadratic backend ``"highs"``, ``"scs"``,
            ``"qpth"`` (batched, CPU or CUDA, strictly convex QPs), ``"ipm"`` (this package's
            batched interior point in torch, CPU or CUDA, LPs too), ``"daqp"`` (DAQP's dual
            active set in C, member by member in ``n_jobs`` threads, LPs too) or ``"auto"``
            (for problems held densely, DAQP on the CPU and the IPM on CUDA; HiGHS/SCS for
            problems too large to hold densely); for the conic backend ``"scs"`` (also
            ``"auto"``), ``"clarabel"`` (which makes ``backend=None`` pick the conic backend
            for LPs and QPs too) or ``"ipm"`` (the batched conic interior point in torch:
            zero, nonnegative and second-order cones, the whole batch in one call, CPU or
            CUDA); the nonlinear backend uses SLSQP.
        backend: ``"quadratic"``, ``"nonlinear"``, ``"conic"`` or ``None`` (the model's:
            ``"auto"`` picks by the problem class). The conic backend solves members with
            SCS or Clarabel (in ``n_jobs`` threads), or the whole batch with its interior
            point, and differentiates the batch at once,
            like the quadratic one (``torch.func`` transforms while ``M`` is held densely);
            the nonlinear backend solves members one after the other and supports
            ``backward``, forward-mode AD, ``vmap`` and :meth:`jacobian`.
        n_jobs: threads for per-instance CPU solvers (default: the CPU count).
        on_failure: ``"raise"`` (a named error listing the failed batch members) or ``"nan"``
            (failed members give NaN outputs and zero gradients; the rest of the batch goes on).

    After each call, ``last_status`` holds one status per batch member (``"optimal"``,
    ``"infeasible"``, ``"unbounded"``, ``"nonconvex"``, ``"invalid_data"``, ``"not_optimal"``,
    ``"solver_error"``).
    """

    def __init__(self, model: Model, parameters, outputs, solver=None, backend=None,
                 n_jobs=None, on_failure="raise"):
        super().__init__()
        if backend not in (None, "auto", "quadratic", "nonlinear", "conic"):
            raise ValueError(f"unknown backend {backend!r}; available: 'quadratic', "
                             "'nonlinear', 'conic', 'auto'")
        if on_failure not in ("raise", "nan"):
            raise ValueError("on_failure must be 'raise' or 'nan'")
        solver = model.solver if solver is None else solver
        if solver not in (None, "auto", "highs", "scs", "qpth", "ipm", "daqp", "slsqp",
                          "clarabel"):
            raise ValueError(f"unknown solver {solver!r}; available: 'highs', 'scs', 'qpth', "
                             "'ipm', 'daqp', 'slsqp', 'clarabel', 'auto'")
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
        pipeline = pipeline_for(model, backend, solver)
        if solver == "clarabel" and not isinstance(pipeline, ConicPipeline):
            raise ValueError("solver='clarabel' needs the conic backend (backend='conic')")
        self.nonlinear = isinstance(pipeline, NonlinearPipeline)
        self.conic = isinstance(pipeline, ConicPipeline)
        #: whether members are solved one at a time by a per-instance solver (SLSQP, SCS,
        #: Clarabel) rather than a batched one
        self.memberwise = self.nonlinear or self.conic
        self.pipeline = pipeline
        self.form = pipeline.form
        values = {p: torch.as_tensor(p.value, dtype=_F64) for p in self.form.parameters}
        if self.conic:
            probe = self.form.data(values, check=False)
            self.structure = ConicStructure(
                ConicPattern(self.form.n_total, self.form.rows, probe.A_rows, probe.A_cols,
                             probe.P_rows, probe.P_cols),
                self.form.cones, pipeline.solve_conic, n_jobs=n_jobs,
                nonconvex_error=self.form.nonconvex_error)
            T = self.form.T.tocoo()
            self._T = tuple(torch.as_tensor(a) for a in (T.row.astype(np.int64),
                                                         T.col.astype(np.int64), T.data))
        elif not self.nonlinear:
            probe = self.form.data(values)
            self.structure = QPStructure(
                self.form.n, self.form.m, probe.P_rows, probe.P_cols, probe.C_rows,
                probe.C_cols, self.form.sense, self.form.lb, self.form.ub, solver, n_jobs)
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
        """Data values (``(P_vals, q, r, C_vals, c0)`` or the conic ``(P_vals, c, r, A_vals, b,
        margins)``; ``r``, one scalar per member, third) expanded to a leading batch ``B``
        (expanding makes the gradient of a broadcast parameter the sum over the batch)."""
        return [(t.reshape(-1).expand(B) if k == 2 else t.expand(B, *t.shape[-1:])).to(device)
                for k, t in enumerate(values)]

    def _conic_outputs(self, values, x, y, point):
        """``(x, μ, f)`` of the model from the cone program's data ``values = (P_vals, c, r,
        A_vals, b)`` and solution ``(x̃, y)``: ``x = x̃[:n]``, ``μ = -Tᵀy`` and ``f`` the
        Lagrangian at ``point`` (the solution, constant to first order:
        :func:`~.folding.envelope_point`; :func:`conic_lagrangian`). Linear in
        all three, so it maps tangents too (``point`` unsqueezed over the directions)."""
        rows, cols, vals = (t.to(y.device) for t in self._T)
        mu = y.new_zeros(*y.shape[:-1], self.form.m).index_add(-1, cols, -vals * take_last(y, rows))
        return x[..., :self.form.n], mu, conic_lagrangian(self.structure.pattern, values, *point)

    def _solve(self, theta, B, device):
        """Solve the batch: ``(call, x, μ, f)`` (internal sign conventions)."""
        reject_nested_derivatives()
        if self.nonlinear:
            call = NLPCall(self.pipeline)
            members = [t if t.dim() > p.ndim else t.unsqueeze(0).expand(B, *p.shape)
                       for p, t in zip(self.form.parameters, theta)]
            x, mu, f = NLPSolve.apply(call, *members)
        elif self.conic:
            call = ConicCall(self.structure)
            data = self.form.data(dict(zip(self.form.parameters, theta)), check=False)
            values = self._batched(data.values() + (data.margins,), B, device)
            xt, y, _ = ConicSolve.apply(call, *(values[k] for k in (0, 1, 3, 4, 5)))
            valid = torch.isfinite(xt).all(-1, keepdim=True)  # failed members are NaN
            point = envelope_point(torch.where(valid, xt, 0.0), torch.where(valid, y, 0.0))
            x, mu, f = self._conic_outputs(values[:5], xt, y, point)
            f = torch.where(valid[:, 0], f, torch.nan)
        else:
            call = SolveCall(self.structure)
            x, mu, f = QPSolve.apply(call, *self._batched(self.form.data_values(*theta), B,
                                                          device))
        self.last_status = call.status
        if call.errors and self.on_failure == "raise":
            raise failure_error(call.status, call.errors)
        return call, x, mu, f

    def forward(self, *params):
        batch = self._batch(params)
        like = params[0] if params else torch.zeros(())
        dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
        theta = self._theta(params, like.device)
        _, x, mu, f = self._solve(theta, batch or 1, like.device)
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
            call, _, _, _ = self._solve(theta, B, device)
            if self.nonlinear:
                dx, dmu, df = self._memberwise_directions(call, directions, B, device)
            else:
                stacked = self._data_tangents(theta, directions, B, device)
                if self.conic:
                    deriv = call.derivative
                    dxt, dy, _ = deriv.jvp(*(stacked[k] for k in (0, 1, 3, 4)))
                    point = (deriv.x.unsqueeze(1), deriv.y.unsqueeze(1))
                    dx, dmu, df = self._conic_outputs(stacked, dxt, dy, point)
                    df = torch.where(deriv.valid.reshape(B, 1), df, 0.0)
                else:
                    dx, dmu, df = call.kkt.jvp(*stacked)
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

    def _data_tangents(self, theta, directions, B, device):
        """The data tangents ``(∂D/∂θ) d`` of all ``directions`` in one vectorized pass (vmap
        of a jvp of ``data_values``), batched as ``(B, D, …)``."""
        stacked = tuple(torch.stack(ts) for ts in zip(*directions))
        tangents = torch.func.vmap(
            lambda *d: torch.func.jvp(self.form.data_values, theta, d)[1])(*stacked)
        return torch.func.vmap(lambda *t: self._batched(t, B, device), out_dims=1)(*tangents)

    def _memberwise_directions(self, call, directions, B, device):
        """``(dx, dμ, df)`` of shape ``(B, D, …)`` for the nonlinear backend: each member's
        stored factorization, one solve per direction."""
        n, m, D = self.form.n, self.form.m, len(directions)
        dx, dmu, df = (torch.zeros(*shape, dtype=_F64) for shape in ((B, D, n), (B, D, m), (B, D)))
        for b, solved in enumerate(call.solved):
            for d, direction in enumerate(directions if solved is not None else []):
                member = tuple(t[b] if t.dim() > p.ndim else t
                               for p, t in zip(self.form.parameters, direction))
                out = self.pipeline.forward(solved, member, [], [])
                dx[b, d], dmu[b, d], df[b, d] = (torch.as_tensor(o) for o in out)
        return dx.to(device), dmu.to(device), df.to(device)


__all__ = ["Layer"]
