"""W7: the floor under a backward pass.

Differentiating a QP layer needs, per member, one factorization of the KKT system and one
solve with it. This times, for the batch and order ``N = n + rows`` (variables plus
constraint rows) of each W1 and W2 case, one batched ``torch.linalg.lu_factor_ex`` +
``lu_solve`` (one right-hand side) and the ``lu_solve`` alone, and reports our measured
backward time over each. torchdiffopt factorizes during the forward pass (the solution is
polished with the same factorization), so its backward is to be compared with the solve
alone; the factorization + solve is the floor for a backward that factorizes itself.

Every method's backward time is ``torch.autograd.grad`` over the workload's leaves, so W1's
includes the backward of the workload's own graph before the layer, ``Q = LLᵀ + 1e-3·I``
(W2's cost is the leaf itself). That part is timed alone too (``graph_backward_s``): the
same ``grad`` with ``Q``'s cotangent given, less a ``grad`` through ``Q = L`` (the fixed
cost of a call, which the real backward pays once). It is no part of the floor, and at
small sizes it alone comes near twice the floor.

The batched LU is the package's (``linalg.factorization._lu_factor``): torch 2.13's MKL
build factors batches of order ≥ about 150 wrongly or hangs once the thread count has been
set (W1 at n = 100: order 200), and that function factors such batches one matrix at a
time, as the backends do.
"""

from __future__ import annotations

import statistics
import time

import torch

from torchdiffopt.linalg.factorization import _lu_factor
from workloads.common import q_of


def _median_time(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def floor_times(batch: int, order: int, reps: int, seed: int = 0):
    """``(factorize + solve, solve)`` seconds for a batch of ``order × order`` systems."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(batch, order, order, dtype=torch.float64, generator=gen)
    K = A + A.transpose(-1, -2) + 2 * order * torch.eye(order, dtype=torch.float64)
    rhs = torch.randn(batch, order, 1, dtype=torch.float64, generator=gen)
    LU, pivots, _ = _lu_factor(K)

    def factor_solve():
        lu, piv, _ = _lu_factor(K)
        return torch.linalg.lu_solve(lu, piv, rhs)

    return (_median_time(factor_solve, reps),
            _median_time(lambda: torch.linalg.lu_solve(LU, pivots, rhs), reps))


def graph_backward_time(batch: int, n: int, reps: int, seed: int = 0) -> float:
    """Seconds that the backward of W1's ``Q = LLᵀ + 1e-3·I``, for ``L (batch, n, n)``, adds
    to a backward pass: its ``grad`` less that of the identity ``Q = L`` (at least 0)."""
    gen = torch.Generator().manual_seed(seed)
    L = torch.rand(batch, n, n, dtype=torch.float64, generator=gen).requires_grad_()
    Q_bar = torch.randn(batch, n, n, dtype=torch.float64, generator=gen)
    Q, identity = q_of(L), L.view_as(L)
    graph, call = (_median_time(lambda out=out: torch.autograd.grad(out, L, Q_bar,
                                                                    retain_graph=True), reps)
                   for out in (Q, identity))
    return max(graph - call, 0.0)


def kkt_order(result) -> int | None:
    p = result.params
    if result.workload == "W1":
        return 2 * p["n"]
    if result.workload == "W2":
        return p["n"] + p["m"]
    return None


def run(results, reps: int):
    """One row per (our method, W1/W2 case) with its backward time and the floors."""
    rows, cache = [], {}
    for r in results:
        order = kkt_order(r)
        if r.kind != "ours" or r.status != "ok" or order is None:
            continue
        key = (r.params["batch"], order)
        if key not in cache:
            cache[key] = floor_times(*key, reps)
        factor_solve, solve = cache[key]
        graph = None  # (W2 has no graph of its own before the layer)
        if r.workload == "W1":
            graph_key = ("graph", r.params["batch"], r.params["n"])
            if graph_key not in cache:
                cache[graph_key] = graph_backward_time(*graph_key[1:], reps)
            graph = cache[graph_key]
        rows.append({"workload": r.workload, "case": r.case, "method": r.method,
                     "batch": key[0], "kkt_order": order, "backward_s": r.backward_s,
                     "graph_backward_s": graph,
                     "factor_solve_s": factor_solve, "solve_s": solve,
                     "ratio_factor_solve": r.backward_s / factor_solve,
                     "ratio_solve": r.backward_s / solve})
    return rows
