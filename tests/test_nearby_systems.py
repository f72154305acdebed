"""NearbySystems: solves with the residual-map Jacobians at the refined points, on the
factors of those at the solvers' points (batched_conic.refine_dense)."""

import numpy as np
import pytest
import torch

import torchdiffopt as tdo
from torchdiffopt.backends import batched_conic
from torchdiffopt.backends.batched_conic import DenseSystems, NearbySystems

F64 = torch.float64
B, N, m = 4, 9, 5


def matrices(shift: float, seed: int = 0):
    """A batch of well-conditioned ``M₀`` and ``M₁ = M₀ + shift · E``."""
    g = torch.Generator().manual_seed(seed)
    M0 = torch.randn(B, N, N, generator=g, dtype=F64) + 4 * torch.eye(N, dtype=F64)
    E = torch.randn(B, N, N, generator=g, dtype=F64)
    return M0, M0 + shift * E


def systems(shift: float, valid=None):
    M0, M1 = matrices(shift)
    valid = torch.ones(B, dtype=torch.bool) if valid is None else valid
    D = torch.eye(m, dtype=F64).expand(B, m, m)
    return NearbySystems(M1, D, DenseSystems(M0, D, valid), valid), M1


def exact(M1, rhs, transpose):
    """``M₁⁻¹`` (``M₁⁻ᵀ``) on the rows of ``rhs (B, K, N)``, by a fresh solve."""
    A = M1.mT if transpose else M1
    return torch.linalg.solve(A, rhs.mT).mT


@pytest.mark.parametrize("transpose", [False, True])
def test_a_nearby_matrix_is_solved_on_the_old_factors(transpose):
    ns, M1 = systems(1e-7)
    rhs = torch.randn(B, 3, N, generator=torch.Generator().manual_seed(1), dtype=F64)
    torch.testing.assert_close(ns.solve(rhs, transpose), exact(M1, rhs, transpose),
                               atol=1e-13, rtol=1e-12)
    assert ns._own is None  # no factorization of M₁


@pytest.mark.parametrize("transpose", [False, True])
def test_a_distant_matrix_gets_its_own_factorization(transpose):
    ns, M1 = systems(0.5)
    rhs = torch.randn(B, 2, N, generator=torch.Generator().manual_seed(2), dtype=F64)
    torch.testing.assert_close(ns.solve(rhs, transpose), exact(M1, rhs, transpose),
                               atol=1e-12, rtol=1e-11)
    assert ns._own is not None


@pytest.mark.parametrize("shift", [1e-7, 0.5])
def test_under_vmap_the_sweeps_come_from_the_probe(shift):
    ns, M1 = systems(shift)
    rhs = torch.randn(6, B, 2, N, generator=torch.Generator().manual_seed(3), dtype=F64)
    for transpose in (False, True):
        out = torch.func.vmap(lambda r, t=transpose: ns.solve(r, t))(rhs)
        want = torch.stack([exact(M1, r, transpose) for r in rhs])
        torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-11)
    assert (ns._own is None) == (shift < 1e-3)


def test_failed_members_do_not_decide():
    """An invalid member (carrying the identity, far from anything) does not force a
    factorization; the valid members' solves are exact."""
    valid = torch.tensor([True, True, False, True])
    ns, M1 = systems(1e-7, valid)
    ns.M = ns.M.clone()
    ns.M[2] = 50 * torch.eye(N, dtype=F64)
    rhs = torch.randn(B, 1, N, generator=torch.Generator().manual_seed(4), dtype=F64)
    out = ns.solve(rhs)
    torch.testing.assert_close(out[valid], exact(M1, rhs, False)[valid], atol=1e-13,
                               rtol=1e-12)
    assert ns._own is None


def test_the_layer_factorizes_once_and_matches_finite_differences(monkeypatch):
    """An SOCP through SCS, whose points the refinement moves: one batched LU per call,
    and gradients that agree with central differences of re-solved layers."""
    factorizations = []
    original = batched_conic.DenseSystems.__init__

    def counting(self, *args, **kwargs):
        factorizations.append(1)
        original(self, *args, **kwargs)
    monkeypatch.setattr(batched_conic.DenseSystems, "__init__", counting)
    nearby = []
    original_nearby = batched_conic.NearbySystems.__init__

    def recording(self, *args, **kwargs):
        nearby.append(self)
        original_nearby(self, *args, **kwargs)
    monkeypatch.setattr(batched_conic.NearbySystems, "__init__", recording)

    rng = np.random.default_rng(0)
    n = 6
    S = rng.normal(scale=0.3, size=(n, n)) + np.eye(n)
    m = tdo.conic_diff_model(solver="scs")
    w = m.variable(n, lb=0.0, name="w")
    mu = m.parameter(np.zeros(n), name="mu")
    m.constraint(tdo.norm2(S @ w) <= 0.5)
    m.constraint(w.sum() == 1)
    m.maximize(mu @ w)
    layer = tdo.Layer(m, parameters=[mu], outputs=w)
    value = torch.tensor(rng.normal(0.05, 0.1, size=(3, n)), requires_grad=True)
    weights = torch.tensor(rng.normal(size=(3, n)))
    (layer(value) * weights).sum().backward()
    assert len(factorizations) == 1 and len(nearby) == 1 and nearby[0]._own is None
    direction = torch.tensor(rng.normal(size=(3, n)))
    step = 1e-6
    with torch.no_grad():
        plus = (layer(value + step * direction) * weights).sum()
        minus = (layer(value - step * direction) * weights).sum()
    central = float(plus - minus) / (2 * step)
    assert abs(float((value.grad * direction).sum()) - central) <= 1e-6 * max(1, abs(central))
