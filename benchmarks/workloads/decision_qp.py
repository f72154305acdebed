"""W2: a decision-focused QP: 20 variables, 40 inequalities, batch 1024, only the linear
cost is a parameter (a predicted cost per sample; ``Q``, ``G``, ``h`` are shared constants).

torchdiffopt receives the shared data without a batch dimension (it broadcasts), qpth with an
expanded batch dimension (it would average gradients of unbatched inputs; here they need
none, but its documented usage is batched), cvxpylayers as constants of the problem.
"""

from __future__ import annotations

import torch

import torchdiffopt as tdo
from harness import Case
from peers import cp, cvxpylayers_methods, qpth_method, qpth_solve
from workloads.common import certified_reference, optnet_qp, ours_methods, q_of

N, N_INEQ = 20, 40
FULL_BATCH, QUICK_BATCH = 1024, 8


def case(batch: int, solvers, seed: int = 0) -> Case:
    L, _, G, h = (t[0] for t in optnet_qp(N, N_INEQ, 1, seed))
    Q = q_of(L)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(batch, N, dtype=torch.float64, generator=gen).requires_grad_()
    weights = torch.randn(batch, N, dtype=torch.float64, generator=gen)

    def ours(solver):
        return lambda q: tdo.functional.qp(Q, q, G=G, h=h, solver=solver, on_failure="nan")

    def qpth_forward(q):
        B = q.shape[0]
        return qpth_solve(Q.expand(B, N, N), q, G.expand(B, N_INEQ, N), h.expand(B, N_INEQ))

    def cvxpy_problem():
        x = cp.Variable(N)
        c = cp.Parameter(N)
        objective = 0.5 * cp.quad_form(x, Q.numpy()) + c @ x
        return cp.Problem(cp.Minimize(objective), [G.numpy() @ x <= h.numpy()]), [c], x

    methods = ours_methods(solvers, ours)
    methods += qpth_method(qpth_forward)
    methods += cvxpylayers_methods(cvxpy_problem, lambda q: (q,))
    reference = certified_reference(lambda s, q: ours(s)(q))
    return Case("W2", f"n={N} m={N_INEQ} B={batch}", {"n": N, "m": N_INEQ, "batch": batch},
                [q], weights, methods, reference)


def cases(quick: bool, solvers) -> list[Case]:
    return [case(QUICK_BATCH if quick else FULL_BATCH, solvers)]
