"""W4: an SOCP portfolio, cvxpylayers only (torchdiffopt has no conic backend yet).

``max μᵀw  s.t.  ‖S w‖₂ ≤ σ, 1ᵀw = 1, w ≥ 0`` with 50 assets, a factor-model risk
``S = [Fᵀ; diag(d)]`` and the expected returns ``μ`` a batched parameter (batch 32). The
reference is cvxpy + Clarabel run to 1e-10 per member; finite differences are not taken (the
reference is not certified to the accuracy they need), so this workload reports the peers'
times and how far their solutions and gradients are from each other.
"""

from __future__ import annotations

import numpy as np
import torch

from harness import Case
from peers import cp, cvxpylayers_methods

ASSETS, FACTORS, SIGMA = 50, 5, 0.1
FULL_BATCH, QUICK_BATCH = 32, 4
NOTE = "torchdiffopt: no conic backend yet"


def case(batch: int, seed: int = 0) -> Case | None:
    if cp is None:
        return None
    rng = np.random.default_rng(seed)
    S = np.vstack((rng.normal(scale=0.1, size=(FACTORS, ASSETS)),
                   np.diag(rng.uniform(0.05, 0.2, ASSETS))))
    mu = torch.tensor(rng.normal(0.05, 0.1, size=(batch, ASSETS))).requires_grad_()
    weights = torch.tensor(rng.normal(size=(batch, ASSETS)))

    def cvxpy_problem():
        w = cp.Variable(ASSETS)
        returns = cp.Parameter(ASSETS)
        constraints = [cp.norm(S @ w, 2) <= SIGMA, cp.sum(w) == 1, w >= 0]
        return cp.Problem(cp.Minimize(-returns @ w), constraints), [returns], w

    problem, (returns,), w = cvxpy_problem()

    def reference(mu):
        out = []
        for row in mu.numpy():
            returns.value = row
            problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10,
                          tol_feas=1e-10)
            out.append(w.value)
        return torch.tensor(np.array(out))

    methods = cvxpylayers_methods(cvxpy_problem, lambda mu: (mu,))
    return Case("W4", f"assets={ASSETS} B={batch}", {"assets": ASSETS, "batch": batch}, [mu],
                weights, methods, reference, fd_count=0, notes=[NOTE])


def cases(quick: bool, solvers) -> list[Case]:
    found = case(QUICK_BATCH if quick else FULL_BATCH)
    return [found] if found is not None else []
