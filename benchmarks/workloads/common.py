"""Helpers shared by the workloads: qpth's random-QP generator, our methods, the reference."""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch

from harness import Method

F64 = torch.float64


def optnet_qp(n: int, n_ineq: int, batch: int, seed: int):
    """qpth's generator (``prof.py`` of locuslab/qpth): ``Q = LLᵀ + 1e-3·I`` with ``L``
    uniform on [0, 1), ``G ~ N(0, 1)``, ``h = G z₀ + s₀`` (so ``z₀`` is strictly feasible),
    ``p ~ N(0, 1)``. Returns ``L, p, G, h`` as float64 tensors with a batch dimension."""
    rng = np.random.default_rng(seed)
    L = rng.random((batch, n, n))
    G = rng.normal(size=(batch, n_ineq, n))
    z0 = rng.normal(size=(batch, n))
    s0 = rng.random((batch, n_ineq))
    p = rng.normal(size=(batch, n))
    h = np.einsum("bij,bj->bi", G, z0) + s0
    return [torch.tensor(a, dtype=F64) for a in (L, p, G, h)]


def q_of(L: torch.Tensor) -> torch.Tensor:
    """``Q = L Lᵀ + 1e-3·I`` (batched), a torch function of the leaf ``L``."""
    return L @ L.transpose(-1, -2) + 1e-3 * torch.eye(L.shape[-1], dtype=L.dtype)


def sqrt_factor(L: torch.Tensor) -> torch.Tensor:
    """``M = [L, √1e-3·I]`` with ``M Mᵀ = Q``: cvxpylayers takes ``½‖Mᵀx‖²`` (a quadratic
    form with a parameter matrix ``Q`` is not DPP)."""
    eye = (1e-3 ** 0.5) * torch.eye(L.shape[-1], dtype=L.dtype).expand_as(L)
    return torch.cat((L, eye), dim=-1)


def ours_methods(solvers, make, unsupported: dict | None = None) -> list[Method]:
    """One method per solver name: ``make(solver)`` returns the forward callable (it may
    raise ``ValueError('unknown solver …')``, e.g. a Layer built with a solver that does not
    exist yet). ``unsupported`` maps solver names to the reason they are skipped here."""
    methods = []
    for solver in solvers:
        name = f"torchdiffopt[{solver}]"
        reason = (unsupported or {}).get(solver, "")
        if reason:
            methods.append(Method(name, "ours", None, skip=reason))
            continue
        start = time.perf_counter()
        try:
            forward = make(solver)
        except ValueError as err:
            if "unknown solver" not in str(err):
                raise
            methods.append(Method(name, "ours", None, skip=f"solver not available: {err}"))
            continue
        methods.append(Method(name, "ours", forward, setup_s=time.perf_counter() - start))
    return methods


def certified_reference(solve, primary="scs", fallback="highs"):
    """The reference solution map: ``solve(solver, *leaves)`` (torchdiffopt, failed members
    NaN) with SCS (run to 1e-9, then polished by a Newton step on the KKT system), and HiGHS
    for the members SCS fails on; torchdiffopt certifies both by their KKT residual. SCS
    comes first because on the degenerate QPs of W3 its polished points were the closer to
    Clarabel run to 1e-11 (1e-8 against HiGHS's 2e-7); elsewhere the two agree to 1e-12."""

    def reference(*leaves):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = solve(primary, *leaves).clone()
            bad = ~torch.isfinite(x).reshape(x.shape[0], -1).all(-1)
            if bad.any():
                idx = torch.nonzero(bad).flatten()
                x[idx] = solve(fallback, *(t[idx] for t in leaves))
        return x

    return reference
