"""The examples in examples/ run, in their short modes, and reach their goals."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

import optnet_layer  # noqa: E402
import pytest  # noqa: E402


def test_optnet_layer_learns():
    before, after = optnet_layer.run(steps=50, verbose=False)
    assert after < before / 10


import numpy as np  # noqa: E402
import torch  # noqa: E402

import inverse_kinematics as ik  # noqa: E402
import ridge_tuning  # noqa: E402


def test_inverse_kinematics_sensitivity_is_the_inverse_jacobian(tmp_path):
    m, theta, target = ik.ik_model()
    for point in ([1.2, 0.4], [-0.5, 0.9], [0.2, -1.3]):
        S = ik.sensitivity(m, theta, target, point)
        t1, t2 = m.value(theta)
        hand = (ik.L1 * np.cos(t1) + ik.L2 * np.cos(t1 + t2),
                ik.L1 * np.sin(t1) + ik.L2 * np.sin(t1 + t2))
        np.testing.assert_allclose(hand, point, atol=1e-10)
        J = np.array([[-ik.L1 * np.sin(t1) - ik.L2 * np.sin(t1 + t2), -ik.L2 * np.sin(t1 + t2)],
                      [ik.L1 * np.cos(t1) + ik.L2 * np.cos(t1 + t2), ik.L2 * np.cos(t1 + t2)]])
        np.testing.assert_allclose(S, np.linalg.inv(J), atol=1e-8)
    out = tmp_path / "ik.png"
    norms = ik.main(6, str(out))
    assert out.stat().st_size > 1000 and np.isfinite(norms[~np.isnan(norms)]).all()


def test_ridge_gradient_matches_closed_form_and_loss_falls():
    X, y, X_val, y_val = ridge_tuning.data()
    alpha = 3.0
    layer = ridge_tuning.ridge_layer(X, y)
    la = torch.tensor(np.log(alpha), dtype=torch.float64, requires_grad=True)
    w = layer(la)
    loss = 0.5 * ((torch.tensor(X_val) @ w - torch.tensor(y_val)) ** 2).mean()
    (g,) = torch.autograd.grad(loss, la)
    A = X.T @ X + alpha * np.eye(X.shape[1])
    w_star = np.linalg.solve(A, X.T @ y)
    np.testing.assert_allclose(w.detach().numpy(), w_star, atol=1e-9)
    dw_dalpha = -np.linalg.solve(A, w_star)
    residual = X_val @ w_star - y_val
    expected = (residual @ (X_val @ dw_dalpha)) / len(y_val) * alpha  # chain rule to log α
    assert float(g) == pytest.approx(expected, rel=1e-7)
    # the quadratic backend gives the same gradient
    (g_quad,) = torch.autograd.grad(
        0.5 * ((torch.tensor(X_val) @ ridge_tuning.ridge_layer(X, y, "quadratic")(la)
                - torch.tensor(y_val)) ** 2).mean(), la)
    assert float(g_quad) == pytest.approx(float(g), rel=1e-9)
    history = ridge_tuning.run(steps=6, verbose=False)
    assert history[-1][1] < 0.8 * history[0][1]


import portfolio  # noqa: E402


def test_portfolio_gradient_matches_finite_differences(tmp_path):
    out = tmp_path / "portfolio.png"
    res = portfolio.main(8, str(out))
    assert out.stat().st_size > 1000
    for k in (2, 5):
        fd = portfolio.finite_difference(float(res["sigma"][k]))
        assert res["grad"][k] == pytest.approx(fd, rel=1e-6, abs=1e-9)
    # on the training window the derivative is the risk constraint's shadow price
    h = 1e-5
    train, _ = portfolio.data()
    mu, L = portfolio.estimates(train)
    m, _, sigma_max, _ = portfolio.portfolio_model(mu, L)
    values = []
    for s in (res["sigma"][3] + h, res["sigma"][3] - h):
        m.set_parameter_value(sigma_max, s)
        m.optimize()
        values.append(m.objective_value)
    assert res["shadow_price"][3] == pytest.approx((values[0] - values[1]) / (2 * h), rel=1e-6)
    assert np.allclose(res["weights"].sum(axis=1), 1.0) and (res["weights"] > -1e-9).all()
