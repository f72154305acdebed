"""NearbySystems: solves with the residual-map Jacobians at the refined points, on the
factors of those at the solvers' points (batched_conic.refine_dense)."""

import warnings

import numpy as np
import pytest
import torch

import torchdiffopt as tdo
from torchdiffopt.backends import batched_conic
from torchdiffopt.backends.batched_conic import (BlockDiagonalD, ConicPattern, DenseSystems,
                                                 NearbySystems, ResidualJacobians)
from torchdiffopt.backends.cones import ConeDims, projection_derivative

F64 = torch.float64
B, n = 4, 6
CONES = {"z": 1, "l": 2, "q": [3]}
m = ConeDims.from_dict(CONES).size
N = n + m


def jacobians(V, valid, seed: int = 0) -> ResidualJacobians:
    """Residual-map Jacobians of ``B`` random programs (``P`` positive definite, ``A``
    square) with ``D = DΠ_{K*}`` at the rows of ``V (B, m)``."""
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(B, n, n, generator=g, dtype=F64)
    P = L @ L.mT + torch.eye(n, dtype=F64)
    A = torch.randn(B, m, n, generator=g, dtype=F64) + 3 * torch.eye(m, n, dtype=F64)
    rows, cols = np.divmod(np.arange(n * n), n)
    a_rows, a_cols = np.divmod(np.arange(m * n), n)
    pattern = ConicPattern(n, m, a_rows, a_cols, rows, cols)
    return ResidualJacobians.of_entries(pattern, P.reshape(B, -1), A.reshape(B, -1),
                                        BlockDiagonalD.at(V, CONES, "cpu"), valid)


def systems(shift: float, valid=None):
    """``NearbySystems`` for ``D`` at points ``V₀`` and ``V₁ = V₀ + shift · E``."""
    rng = np.random.default_rng(0)
    V0 = rng.normal(size=(B, m))
    V1 = V0 + shift * rng.normal(size=(B, m))
    valid = torch.ones(B, dtype=torch.bool) if valid is None else valid
    base = DenseSystems(jacobians(V0, valid))
    assert not base.singular.any()
    J1 = jacobians(V1, valid)
    return NearbySystems(J1, base), J1


def exact(J1, rhs, transpose):
    """``M₁⁻¹`` (``M₁⁻ᵀ``) on the rows of ``rhs (B, K, N)``, by a fresh solve."""
    M1 = J1.dense()
    return torch.linalg.solve(M1.mT if transpose else M1, rhs.mT).mT


def test_block_diagonal_d_and_products_match_the_dense_matrices():
    """``BlockDiagonalD`` against :func:`projection_derivative` member by member, and
    ``ResidualJacobians.times`` against products with its dense ``M`` (the identity for a
    failed member)."""
    V = np.random.default_rng(1).normal(size=(B, m))
    valid = torch.tensor([True, False, True, True])
    J = jacobians(V, valid)
    D = torch.eye(m, dtype=F64) - J.D.identity_minus(out=torch.empty(B, m, m, dtype=F64))
    for j in range(B):
        np.testing.assert_array_equal(D[j].numpy(),
                                      projection_derivative(V[j], CONES, dual=True).to_dense())
    X = torch.randn(B, 3, m, dtype=F64)
    torch.testing.assert_close(J.D.right_of(X), X @ D, atol=1e-14, rtol=0)
    torch.testing.assert_close(J.D.right_of(X, transpose=True), X @ D.mT, atol=1e-14, rtol=0)
    M = J.dense()
    torch.testing.assert_close(M[1], torch.eye(N, dtype=F64))
    z = torch.randn(B, 2, N, dtype=F64)
    torch.testing.assert_close(J.times(z), z @ M.mT, atol=1e-13, rtol=0)
    torch.testing.assert_close(J.times(z, transpose=True), z @ M, atol=1e-13, rtol=0)


@pytest.mark.parametrize("transpose", [False, True])
def test_a_nearby_matrix_is_solved_on_the_old_factors(transpose):
    ns, J1 = systems(1e-7)
    rhs = torch.randn(B, 3, N, generator=torch.Generator().manual_seed(1), dtype=F64)
    torch.testing.assert_close(ns.solve(rhs, transpose), exact(J1, rhs, transpose),
                               atol=1e-13, rtol=1e-12)
    assert ns._own is None  # no factorization of M₁


@pytest.mark.parametrize("transpose", [False, True])
def test_a_distant_matrix_gets_its_own_factorization(transpose):
    ns, J1 = systems(2.0)
    rhs = torch.randn(B, 2, N, generator=torch.Generator().manual_seed(2), dtype=F64)
    torch.testing.assert_close(ns.solve(rhs, transpose), exact(J1, rhs, transpose),
                               atol=1e-12, rtol=1e-11)
    assert ns._own is not None


@pytest.mark.parametrize("shift", [1e-7, 2.0])
def test_under_vmap_the_sweeps_come_from_the_probe(shift):
    ns, J1 = systems(shift)
    rhs = torch.randn(6, B, 2, N, generator=torch.Generator().manual_seed(3), dtype=F64)
    for transpose in (False, True):
        out = torch.func.vmap(lambda r, t=transpose: ns.solve(r, t))(rhs)
        want = torch.stack([exact(J1, r, transpose) for r in rhs])
        torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-11)
    assert (ns._own is None) == (shift < 1e-3)


def test_failed_members_do_not_decide():
    """An invalid member (its data far from anything) does not force a factorization; the
    valid members' solves are exact."""
    valid = torch.tensor([True, True, False, True])
    ns, J1 = systems(1e-7, valid)
    ns.jacobians.A = ns.jacobians.A.clone()
    ns.jacobians.A[2] *= 50
    rhs = torch.randn(B, 1, N, generator=torch.Generator().manual_seed(4), dtype=F64)
    out = ns.solve(rhs)
    torch.testing.assert_close(out[valid], exact(J1, rhs, False)[valid], atol=1e-13,
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


def test_a_singular_matrix_at_the_refined_point_is_reported():
    """M₀ at SCS's point is regular, M₁ at the refined point (two active constraints meeting
    at a kink) is singular: the refinement does not converge, M₁ gets its own
    factorization, and its singular member the warning, when the backward finds it (it
    used to be judged by M₀ alone)."""
    m = tdo.conic_diff_model(solver="scs")
    x = m.variable(2)
    p = m.parameter(np.zeros(2))
    m.constraint(x[1] >= 0)
    m.constraint(x[0] + x[1] >= 0)
    m.constraint(x[0] >= 0)
    m.minimize(0.5 * tdo.sum_squares(x) - p @ x)
    layer = tdo.Layer(m, parameters=[p], outputs=x)
    value = torch.tensor([[-(0.5 + 1.5 * 25 / 63), 0.0]], dtype=F64, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(value).sum().backward()
    messages = [str(w.message) for w in caught]
    assert any(msg.startswith("batch members [0]: the cone program's derivative matrix M is "
                              "singular") for msg in messages), messages
