"""W3: shortest path on a 5×5 grid, the decision-focused learning benchmark.

40 directed edges (right and down), flow conservation (one unit from the top-left to the
bottom-right node; the sink's row, implied by the others, is left out so that the equality
rows are independent), ``0 ≤ x ≤ 1``, the edge costs ``c`` a batched parameter (batch 256).
Two variants:

* exact LP ``min cᵀx``: its solution is a vertex, so ``x*(c)`` is piecewise constant and its
  exact gradient is zero almost everywhere (central differences agree); qpth cannot take it
  (it needs ``Q ≻ 0``) and the peers' "gradients" at a degenerate vertex are not unique, so
  differences to peers are reported, not asserted;
* QPTL smoothing ``min cᵀx + γ‖x‖²`` with ``γ = 0.1``: a strictly convex QP that all take.

Ours is a ``tdo.Model`` compiled once into a ``tdo.Layer``.
"""

from __future__ import annotations

import numpy as np
import torch

import torchdiffopt as tdo
from harness import Case
from peers import cp, cvxpylayers_methods, qpth_method, qpth_solve
from workloads.common import certified_reference, ours_methods

GRID = 5
GAMMA = 0.1
FULL_BATCH, QUICK_BATCH = 256, 4


def grid_flow(k: int = GRID):
    """Node-edge incidence (sink row dropped) and right-hand side of a k×k grid graph."""
    edges = [(i * k + j, i * k + j + 1) for i in range(k) for j in range(k - 1)]
    edges += [(i * k + j, (i + 1) * k + j) for i in range(k - 1) for j in range(k)]
    A = np.zeros((k * k, len(edges)))
    for e, (u, v) in enumerate(edges):
        A[u, e], A[v, e] = 1.0, -1.0
    b = np.zeros(k * k)
    b[0], b[-1] = 1.0, -1.0
    return A[:-1], b[:-1]


def _layer(A, b, gamma, solver):
    m = tdo.Model()
    x = m.variable(A.shape[1], lb=0.0, ub=1.0, name="x")
    c = m.parameter(np.ones(A.shape[1]), name="c")
    m.constraint(A @ x == b, name="flow")
    m.minimize(c @ x + gamma * tdo.sum_squares(x) if gamma else c @ x)
    return tdo.Layer(m, parameters=[c], outputs=x, solver=solver, on_failure="nan")


def case(batch: int, gamma: float, solvers, seed: int = 0) -> Case:
    A, b = grid_flow()
    n = A.shape[1]
    gen = torch.Generator().manual_seed(seed)
    c = (0.1 + 0.9 * torch.rand(batch, n, dtype=torch.float64, generator=gen)).requires_grad_()
    weights = torch.randn(batch, n, dtype=torch.float64, generator=gen)
    At, bt = torch.tensor(A), torch.tensor(b)
    eye = torch.eye(n, dtype=torch.float64)

    def qpth_forward(c):
        B = c.shape[0]
        G = torch.cat((-eye, eye)).expand(B, 2 * n, n)
        h = torch.cat((torch.zeros(n), torch.ones(n))).to(torch.float64).expand(B, 2 * n)
        return qpth_solve((2 * gamma * eye).expand(B, n, n), c, G, h,
                          At.expand(B, *A.shape), bt.expand(B, len(b)))

    def cvxpy_problem():
        x = cp.Variable(n)
        cost = cp.Parameter(n)
        objective = cost @ x + gamma * cp.sum_squares(x) if gamma else cost @ x
        return cp.Problem(cp.Minimize(objective), [A @ x == b, x >= 0, x <= 1]), [cost], x

    lp = not gamma
    no_lp = "qpth needs a strictly convex objective (Q ≻ 0): no LPs"
    methods = ours_methods(solvers, lambda s: _layer(A, b, gamma, s),
                           {"qpth": no_lp} if lp else None)
    methods += qpth_method(qpth_forward, skip=no_lp if lp else "")
    methods += cvxpylayers_methods(cvxpy_problem, lambda c: (c,))
    layers = {s: _layer(A, b, gamma, s) for s in ("highs", "scs")}
    reference = certified_reference(lambda s, c: layers[s](c))
    label = f"{'LP exact' if lp else f'QPTL γ={gamma}'} B={batch}"
    return Case("W3", label, {"variant": "lp" if lp else "qptl", "batch": batch}, [c],
                weights, methods, reference, compare_peer_gradients=not lp)


def cases(quick: bool, solvers) -> list[Case]:
    batch = QUICK_BATCH if quick else FULL_BATCH
    return [case(batch, 0.0, solvers), case(batch, GAMMA, solvers)]
