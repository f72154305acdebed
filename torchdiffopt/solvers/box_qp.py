"""Batched primal-dual active-set method for QPs with bounds only, in torch (CPU or CUDA).

Problem, for B members sharing their size and bounds::

    minimize    ½ xᵀ P_b x + q_bᵀ x
    subject to  lb ≤ x ≤ ub                      (lb, ub ∈ [−∞, ∞]ⁿ; lb_j = ub_j fixes x_j)

with ``P_b`` positive definite on the free variables of the solution. With the reduced
gradient ``z = P x + q``, the optimality conditions are ``z_j = 0`` where
``lb_j < x_j < ub_j``, ``z_j ≥ 0`` where ``x_j = lb_j`` and ``z_j ≤ 0`` where ``x_j = ub_j``.
Non-negative least squares (``P = AᵀA``, benchmark W5), box-constrained regression and the
long-only problems of layers without budget rows have this form.

Method: the primal-dual active-set method of Hintermüller, Ito and Kunisch (2002), a
semismooth Newton method on ``x = proj_[lb, ub](x − z)``. Each iteration fixes the variables
of the current active sets at their bounds and solves for the others, ``P_FF x_F =
−q_F − P_FA x_A``; then a free variable past a bound becomes active at it, and an active one
whose ``z_j`` has the wrong sign is freed. When the sets no longer change, every condition
above holds exactly (to the accuracy of the last solve): there is no tolerance to choose and
no interior-point path to follow. The first iteration holds every bounded variable at a
bound (its lower one where it has one); the sets usually settle in a few iterations (W5: 4,
with 241 of 500 variables at their bound), where DAQP, which adds one constraint per
iteration, takes hundreds. The method can cycle where ``P`` is far from an M-matrix: members
whose sets have not settled within :data:`MAX_ITERATIONS`, or whose free block is not safely
positive definite (LPs, a singular ``P`` on the free variables), are reported as not
converged for another solver to take.

Each iteration is one batched Cholesky factorization of the free blocks, gathered into
``k = max_b #free_b`` slots (free variables first; a member with fewer fills its last slots
with an identity), so its cost is ``k³/3`` per member rather than ``n³/3``. Members whose sets
have settled leave the batch.

No maintained library solves batches of bound-constrained QPs in torch (mpc.pytorch's
projected Newton solver is part of an MPC package, with a fixed iteration count and no
per-member status), hence this module.
"""

from __future__ import annotations

import numpy as np
import torch

from ..linalg.factorization import slots
from .ipm import NOT_CONVERGED, OPTIMAL, IPMResult

#: iterations after which a member whose active sets still change is given up (cycling)
MAX_ITERATIONS = 30
#: smallest accepted ratio ``min_i L_ii² / max_i L_ii²`` of a free block's Cholesky factor,
#: in units of the dtype's ε (float64: 2e-12, float32: 1e-3); below it the block is treated
#: as singular and the member given up
PIVOT_RTOL_EPS = 1e4


def solve_box_qp(P: torch.Tensor, q: torch.Tensor, lb, ub, *,
                 max_iter: int = MAX_ITERATIONS) -> IPMResult:
    """Solve a batch of bound-constrained QPs by the primal-dual active-set method.

    ``P (B, n, n)`` symmetric, ``q (B, n)``, on any device and in any float dtype;
    ``lb, ub (n,)`` (numpy, ±inf where absent) shared by the batch.

    Returns an :class:`~torchdiffopt.solvers.ipm.IPMResult` in the conventions of the
    interior point over the bound rows of :func:`~torchdiffopt.backends.quadratic.bound_rows`
    (fixed, lower, upper: the rows ``x_j − b_j ∈ S``, Lagrangian
    ``½xᵀPx + qᵀx + μᵀ(x_J − b)``): ``x``, ``mu`` (``μ_i = −z_j`` on the active row of
    ``x_j``, zero on the others), ``active`` (fixed rows and rows at which ``x_j`` is held),
    ``status`` (0 optimal; 3 not settled within ``max_iter`` iterations, free block not
    positive definite, non-finite data, ``lb > ub``, ``lb = +∞`` or ``ub = −∞``: ``x`` and
    ``mu`` are then NaN) and
    ``iterations`` (solves taken).
    """
    from ..backends.quadratic import bound_rows  # the backends import the solvers

    B, n = q.shape
    dev, dt = q.device, q.dtype
    lb = np.array(lb, dtype=np.float64)  # copies: torch keeps no view of read-only arrays
    ub = np.array(ub, dtype=np.float64)
    lb_t = torch.as_tensor(lb, dtype=dt, device=dev)
    ub_t = torch.as_tensor(ub, dtype=dt, device=dev)
    has_lb = torch.as_tensor(np.isfinite(lb), device=dev)
    has_ub = torch.as_tensor(np.isfinite(ub), device=dev)
    fixed = torch.as_tensor(np.isfinite(lb) & (lb == ub), device=dev)

    x = torch.full((B, n), torch.nan, dtype=dt, device=dev)
    z = torch.full((B, n), torch.nan, dtype=dt, device=dev)
    # start with every bounded variable held at a bound (its lower one where it has one):
    # the first solve is then over the unbounded variables only, so a singular P (an
    # underdetermined least-squares problem) is no obstacle unless its free block is
    at_lb = has_lb.expand(B, n).clone()
    at_ub = (has_ub & ~has_lb).expand(B, n).clone()
    status = torch.full((B,), NOT_CONVERGED, dtype=torch.int64, device=dev)
    iterations = torch.zeros(B, dtype=torch.int64, device=dev)

    finite = P.flatten(1).isfinite().all(-1) & q.isfinite().all(-1)
    # crossed bounds, and infinite ones that exclude every value (lb = +inf, ub = -inf):
    # nothing is feasible, and the fallback solver says so
    feasible = bool((lb <= ub).all() and not (lb == np.inf).any() and not (ub == -np.inf).any())
    todo = finite.nonzero().squeeze(-1) if feasible else finite.new_zeros(0).long()
    for _ in range(max_iter):
        if not len(todo):
            break
        Pt, qt, lo, up = P[todo], q[todo], at_lb[todo], at_ub[todo]
        free = ~(lo | up)
        x_held = torch.where(lo, lb_t, torch.where(up, ub_t, 0.0))
        rhs = -qt - (Pt @ x_held.unsqueeze(-1)).squeeze(-1)
        x_free, factored = _solve_free_block(Pt, rhs, free)
        xt = torch.where(free, x_free, x_held)
        zt = (Pt @ xt.unsqueeze(-1)).squeeze(-1) + qt
        new_lb = fixed | (lo & (zt > 0)) | (free & has_lb & (xt < lb_t))
        new_ub = (up & (zt < 0)) | (free & has_ub & (xt > ub_t))
        settled = ((new_lb == lo) & (new_ub == up)).all(-1) & factored
        iterations[todo] += 1
        x[todo], z[todo] = xt, zt
        status[todo[settled]] = OPTIMAL
        at_lb[todo], at_ub[todo] = new_lb, new_ub
        todo = todo[~settled & factored]

    optimal = (status == OPTIMAL).unsqueeze(-1)
    x = torch.where(optimal, x, torch.nan)
    b_cols, _, b_sense = bound_rows(lb, ub)
    cols = torch.as_tensor(b_cols, dtype=torch.long, device=dev)
    sense = torch.as_tensor(b_sense, device=dev)
    held = torch.where(sense == 0, True, torch.where(sense > 0, at_lb[:, cols], at_ub[:, cols]))
    active = held & optimal
    mu = torch.where(active, -z[:, cols], 0.0)
    mu = torch.where(optimal, mu, torch.nan)
    return IPMResult(x=x, mu=mu, active=active, status=status, iterations=iterations)


def _solve_free_block(P, rhs, free):
    """``y`` with ``P_FF y_F = rhs_F`` and ``y = 0`` off ``F``, per member (``F = free[b]``),
    and whether each member's block was factored with pivots above :data:`PIVOT_RTOL_EPS`.

    The free variables of each member are gathered first into ``k = max_b #free_b`` slots
    (:func:`~torchdiffopt.linalg.factorization.slots`); unused slots carry an identity, which
    decouples them."""
    B, n = rhs.shape
    order, used = slots(free)
    k = order.shape[-1]
    if k == 0:
        return torch.zeros_like(rhs), torch.ones(B, dtype=torch.bool, device=rhs.device)
    block = P.gather(1, order.unsqueeze(-1).expand(B, k, n)).gather(
        2, order.unsqueeze(1).expand(B, k, k))
    eye = torch.eye(k, dtype=P.dtype, device=P.device)
    block = torch.where(used.unsqueeze(-1) & used.unsqueeze(-2), block, eye)
    L, info = torch.linalg.cholesky_ex(block)
    d = L.diagonal(dim1=-2, dim2=-1)
    d_min = torch.where(used, d, torch.inf).amin(-1)
    d_max = torch.where(used, d, 0.0).amax(-1)
    rtol = PIVOT_RTOL_EPS * torch.finfo(P.dtype).eps
    factored = (info == 0) & (d_min ** 2 >= rtol * d_max ** 2) & d.isfinite().all(-1)
    y = torch.cholesky_solve((rhs.gather(1, order) * used).unsqueeze(-1), L).squeeze(-1)
    y = torch.where(factored.unsqueeze(-1) & used, y, 0.0)
    return torch.zeros_like(rhs).scatter(1, order, y), factored


__all__ = ["solve_box_qp"]
