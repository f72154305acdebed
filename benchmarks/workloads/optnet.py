"""W1: OptNet's random QP, qpth's own benchmark problem.

``min ½ xᵀQx + pᵀx  s.t.  G x ≤ h`` with qpth's generator (:func:`common.optnet_qp`),
n variables and n inequalities, no equalities. Every member has its own data and all four
of ``L`` (with ``Q = LLᵀ + 1e-3·I``), ``p``, ``G``, ``h`` are leaves: torchdiffopt and qpth
receive ``Q`` built from ``L`` by torch, cvxpylayers ``M = [L, √1e-3·I]`` with
``MMᵀ = Q``, so every method's gradient is taken with respect to the same tensors.
"""

from __future__ import annotations

import torch

import torchdiffopt as tdo
from harness import Case
from peers import cp, cvxpylayers_methods, qpth_method, qpth_solve
from workloads.common import certified_reference, optnet_qp, ours_methods, q_of, sqrt_factor

FULL = [(n, b) for n in (10, 50, 100) for b in (1, 32, 128)]
QUICK = [(10, 4)]


def _ours(solver, on_failure="nan"):
    def forward(L, p, G, h):
        return tdo.functional.qp(q_of(L), p, G=G, h=h, solver=solver, on_failure=on_failure)
    return forward


def _cvxpy_problem(n):
    M = cp.Parameter((n, 2 * n))
    p = cp.Parameter(n)
    G = cp.Parameter((n, n))
    h = cp.Parameter(n)
    x = cp.Variable(n)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(M.T @ x) + p @ x), [G @ x <= h])
    return problem, [M, p, G, h], x


def case(n: int, batch: int, solvers, seed: int = 0) -> Case:
    leaves = [t.requires_grad_() for t in optnet_qp(n, n, batch, seed)]
    weights = torch.randn(batch, n, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(seed + 1))
    methods = ours_methods(solvers, _ours)
    methods += qpth_method(lambda L, p, G, h: qpth_solve(q_of(L), p, G, h))
    methods += cvxpylayers_methods(lambda: _cvxpy_problem(n),
                                   lambda L, p, G, h: (sqrt_factor(L), p, G, h))
    reference = certified_reference(lambda s, *leaves: _ours(s)(*leaves))
    return Case("W1", f"n={n} B={batch}", {"n": n, "batch": batch}, leaves, weights,
                methods, reference)


def cases(quick: bool, solvers) -> list[Case]:
    return [case(n, b, solvers) for n, b in (QUICK if quick else FULL)]
