"""W4: an SOCP portfolio, through torchdiffopt's conic backend and cvxpylayers.

``max μᵀw  s.t.  ‖S w‖₂ ≤ σ, 1ᵀw = 1, w ≥ 0`` with 50 assets, a factor-model risk
``S = [Fᵀ; diag(d)]`` and the expected returns ``μ`` a batched parameter (batch 64). Ours is
a :class:`~torchdiffopt.Layer` over the model with ``backend="conic"``, one method per conic
solver (the default ``"auto"``, which is Clarabel, and SCS, Clarabel and the batched interior
point by name). The reference is the same layer with SCS, whose
points the conic backend refines by Newton steps on the residual map to ~1e-15 and checks by
their residuals; finite differences are differences of that reference. Because that is our
own code, the reference is checked against an independent solve where cvxpy is installed
(cvxpy + Clarabel at 1e-10, no torchdiffopt involved) and the largest distance goes into the
case's notes.
"""

from __future__ import annotations

import numpy as np
import torch

import torchdiffopt as tdo
from harness import Case
from peers import cp, cvxpylayers_methods
from workloads.common import ours_methods

ASSETS, FACTORS, SIGMA = 50, 5, 0.1
FULL_BATCH, QUICK_BATCH = 64, 4
CONIC_SOLVERS = ("auto", "scs", "clarabel", "ipm")  # "auto": the default, Clarabel


def _layer(S: np.ndarray, solver: str) -> tdo.Layer:
    m = tdo.Model(solver=solver, backend="conic")
    w = m.variable(ASSETS, lb=0.0, name="w")
    returns = m.parameter(np.zeros(ASSETS), name="mu")
    m.constraint(tdo.norm2(S @ w) <= SIGMA)
    m.constraint(w.sum() == 1)
    m.maximize(returns @ w)
    return tdo.Layer(m, parameters=[returns], outputs=w, on_failure="nan")


def case(batch: int, seed: int = 0) -> Case:
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

    methods = ours_methods(CONIC_SOLVERS, lambda s: _layer(S, s))
    reference_layer = _layer(S, "scs")
    notes = []
    if cp is not None:
        methods += cvxpylayers_methods(cvxpy_problem, lambda mu: (mu,))
        with torch.no_grad():
            ours = reference_layer(mu)
        independent = _cvxpy_clarabel(cvxpy_problem, mu.detach())
        gap = ((ours - independent).abs().amax(-1) / (1 + independent.abs().amax(-1))).max()
        notes.append(f"reference vs cvxpy + Clarabel (1e-10, independent of torchdiffopt): "
                     f"largest relative distance {float(gap):.1e} over {batch} members")
    return Case("W4", f"assets={ASSETS} B={batch}", {"assets": ASSETS, "batch": batch}, [mu],
                weights, methods, lambda mu: reference_layer(mu), notes=notes)


def _cvxpy_clarabel(cvxpy_problem, mu: torch.Tensor) -> torch.Tensor:
    """Each member solved by cvxpy with Clarabel at tolerances 1e-10."""
    problem, (returns,), w = cvxpy_problem()
    out = []
    for row in mu.numpy():
        returns.value = row
        problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
        out.append(w.value)
    return torch.tensor(np.array(out))


def cases(quick: bool, solvers) -> list[Case]:
    return [case(QUICK_BATCH if quick else FULL_BATCH)]
