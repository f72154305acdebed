"""W6: Sobolev training needs Jacobian-vector products along k directions at once.

On W1's problem (n = 50, batch 32; quick: n = 10, batch 4) this times
``torch.func.vmap(lambda v: torch.func.jvp(qp, θ, v)[1])`` over k stacked random tangents of
all of ``(Q, p, G, h)`` (``Q``'s tangents symmetric), for k ∈ {1, 10, 50}. The call solves
the QPs once and, through QPSolve's vmap rule, pushes all k tangents through one
factorization. The forward-only solve and the calls for every k are timed in interleaved
rounds (so that a change in the machine's load hits all alike); the solve's median is
subtracted to show the derivative part, and the figure of merit is
time(k = 50) / time(k = 1).

qpth and cvxpylayers have no forward mode; for scale, qpth's column times one forward plus
k reverse passes (k vector-Jacobian products, what a user without forward mode would run).
Each our solver is checked by the adjoint identity ⟨w, J v⟩ = ⟨Jᵀw, v⟩ against reverse mode.
"""

from __future__ import annotations

import statistics
import time
import warnings

import torch

import torchdiffopt as tdo
from peers import QPFunction, qpth_solve
from workloads.common import optnet_qp, q_of

FULL = (50, 32, (1, 10, 50))
QUICK = (10, 4, (1, 5))


def _interleaved_medians(fns: dict, reps: int) -> dict:
    """Median time of each callable, over ``reps`` rounds that call each once, after one
    warm-up round."""
    times = {key: [] for key in fns}
    for rep in range(reps + 1):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            if rep:
                times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) for key, t in times.items()}


def _tangents(data, k, gen):
    out = [torch.randn(k, *t.shape, dtype=t.dtype, generator=gen) for t in data]
    out[0] = out[0] + out[0].transpose(-1, -2)
    return out


def _adjoint_error(f, data, gen):
    """Relative gap between ⟨w, J v⟩ (forward mode) and ⟨Jᵀw, v⟩ (reverse mode)."""
    v = [t[0] for t in _tangents(data, 1, gen)]
    _, jv = torch.func.jvp(f, tuple(data), tuple(v))
    w = torch.randn(jv.shape, dtype=jv.dtype, generator=gen)
    leaves = [t.clone().requires_grad_() for t in data]
    grads = torch.autograd.grad((f(*leaves) * w).sum(), leaves)
    forward = float((w * jv).sum())
    reverse = sum(float((g * t).sum()) for g, t in zip(grads, v))
    return abs(forward - reverse) / max(1.0, abs(reverse))


def _ours(solver, data, ks, reps, gen):
    def f(Q, p, G, h):
        return tdo.functional.qp(Q, p, G=G, h=h, solver=solver)

    def solve():
        with torch.no_grad():
            f(*data)

    def jvps(tangents):
        return lambda: torch.func.vmap(lambda *v: torch.func.jvp(f, tuple(data), v)[1])(
            *tangents)

    try:
        adjoint = _adjoint_error(f, data, gen)
        fns = {"solve": solve} | {k: jvps(_tangents(data, k, gen)) for k in ks}
        times = _interleaved_medians(fns, reps)
    except ValueError as err:
        if "unknown solver" not in str(err):
            raise
        return [], f"torchdiffopt[{solver}]: solver not available"
    except Exception as err:  # noqa: BLE001 - a failure is reported, the run goes on
        return [], f"torchdiffopt[{solver}]: failed: {type(err).__name__}: {err}"
    rows = [{"method": f"torchdiffopt[{solver}]", "mode": "vmap(jvp)", "k": k,
             "time_s": times[k], "solve_s": times["solve"],
             "derivative_s": times[k] - times["solve"], "adjoint_error": adjoint}
            for k in ks]
    return rows, ""


def _qpth(data, ks, reps, gen):
    def reverse_passes(k):
        cotangents = torch.randn(k, *data[1].shape, dtype=torch.float64, generator=gen)

        def once():
            leaves = [t.clone().requires_grad_() for t in data]
            x = qpth_solve(*leaves)
            for j in range(k):
                torch.autograd.grad(x, leaves, cotangents[j], retain_graph=True)
        return once

    times = _interleaved_medians({k: reverse_passes(k) for k in ks}, reps)
    return [{"method": "qpth", "mode": "forward + k reverse passes", "k": k,
             "time_s": times[k]} for k in ks]


def run(quick: bool, solvers, reps: int, seed: int = 0):
    """Return ``(rows, notes)``; each row one (method, k)."""
    n, batch, ks = QUICK if quick else FULL
    L, p, G, h = optnet_qp(n, n, batch, seed)
    data = [q_of(L), p, G, h]
    gen = torch.Generator().manual_seed(seed + 2)
    rows, notes = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for solver in solvers:
            found, note = _ours(solver, data, ks, reps, gen)
            rows += found
            if note:
                notes.append(note)
        if QPFunction is not None:
            rows += _qpth(data, ks, reps, gen)
    first = {}  # each method's time for its smallest k (rows come in increasing k)
    for r in rows:
        first.setdefault(r["method"], r["time_s"])
        r["ratio_to_k1"] = r["time_s"] / first[r["method"]]
    return rows, notes
