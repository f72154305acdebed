"""Mean-variance portfolio with a risk limit: how the out-of-sample return responds to the
risk budget σ_max, differentiated through a second-order cone program.

From a training window of asset returns we estimate the mean μ and the covariance Σ = LLᵀ
(Cholesky), and pick the weights

    w*(σ_max) = argmax_w  μᵀw   s.t.   ‖Lᵀw‖₂ ≤ σ_max,   Σᵢ wᵢ = 1,   w ≥ 0

(a long-only portfolio with volatility at most σ_max). The conic backend differentiates w*
with respect to the parameter σ_max through the cone program's optimality conditions, so the
test-window return μ_testᵀw*(σ_max) and its derivative come from one layer call over a batch
of σ_max values. On the training window the derivative is the risk constraint's dual (the
shadow price of the risk budget); on the test window it says whether more risk still pays.
The derivative is piecewise smooth: it jumps where an asset enters or leaves the portfolio.

    python examples/portfolio.py            # 40 values of σ_max, writes portfolio.png
    python examples/portfolio.py --short    # 8 values (the tests)
"""

import argparse

import numpy as np
import torch

import torchdiffopt as tdo


def data(seed=3, n_assets=8, n_train=120, n_test=120):
    """Daily returns (in %) from a two-factor model: training and test windows."""
    rng = np.random.default_rng(seed)
    mean = rng.uniform(0.02, 0.12, n_assets)
    loadings = rng.normal(scale=0.8, size=(n_assets, 2))
    noise = rng.uniform(0.5, 1.5, n_assets)

    def window(n):
        return mean + rng.normal(size=(n, 2)) @ loadings.T + noise * rng.normal(size=(n, n_assets))
    return window(n_train), window(n_test)


def estimates(train):
    """Sample mean and the Cholesky factor of the sample covariance."""
    return train.mean(axis=0), np.linalg.cholesky(np.cov(train, rowvar=False))


def portfolio_model(mu, L):
    """The risk-limited portfolio problem, with σ_max a parameter."""
    m = tdo.conic_diff_model()
    w = m.variable(len(mu), lb=0.0, name="w")
    sigma_max = m.parameter(1.0, name="sigma_max")
    m.constraint(w.sum() == 1, name="budget")
    risk = m.constraint(tdo.norm2(L.T @ w) <= sigma_max, name="risk")
    m.maximize(mu @ w)
    return m, w, sigma_max, risk


def risk_range(mu, L):
    """σ_max between the minimum-variance portfolio's volatility (below: infeasible) and the
    best single asset's (above: the risk limit no longer binds), 5% inside at both ends."""
    m = tdo.conic_diff_model()
    w = m.variable(len(mu), lb=0.0)
    m.constraint(w.sum() == 1)
    m.minimize(tdo.norm2(L.T @ w))
    m.optimize()
    best = np.linalg.norm(L[np.argmax(mu)])  # ‖Lᵀe_i‖ = ‖row i of L‖
    return 1.05 * m.objective_value, 0.95 * best


def sweep(n_points: int):
    """Test-window return, its derivative in σ_max (through the layer) and the training
    return's shadow price, over a grid of σ_max."""
    train, test = data()
    mu, L = estimates(train)
    m, w, sigma_max, risk = portfolio_model(mu, L)
    layer = tdo.Layer(m, parameters=[sigma_max], outputs=[w, risk])
    sigmas = torch.linspace(*risk_range(mu, L), n_points, dtype=torch.float64,
                            requires_grad=True)
    weights, price = layer(sigmas)  # one member per σ_max
    test_return = weights @ torch.tensor(test.mean(axis=0))
    (grad,) = torch.autograd.grad(test_return.sum(), sigmas)  # member j depends on σ_j only
    return {"sigma": sigmas.detach().numpy(), "test_return": test_return.detach().numpy(),
            "train_return": (weights @ torch.tensor(mu)).detach().numpy(),
            "grad": grad.numpy(), "shadow_price": price.detach().numpy(),
            "weights": weights.detach().numpy()}


def finite_difference(sigma: float, h: float = 1e-5) -> float:
    """Central difference of the test-window return in σ_max, by re-solving."""
    train, test = data()
    mu, L = estimates(train)
    m, w, sigma_max, _ = portfolio_model(mu, L)
    values = []
    for s in (sigma + h, sigma - h):
        m.set_parameter_value(sigma_max, s)
        m.optimize()
        values.append(test.mean(axis=0) @ m.value(w))
    return (values[0] - values[1]) / (2 * h)


def main(n_points: int, out: str):
    res = sweep(n_points)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6), sharex=True)
    top.plot(res["sigma"], res["train_return"], label="training window")
    top.plot(res["sigma"], res["test_return"], label="test window")
    top.set_ylabel("mean daily return (%)")
    top.legend()
    bottom.plot(res["sigma"], res["grad"], "o-", ms=3, label="d(test return)/dσ_max")
    bottom.plot(res["sigma"], res["shadow_price"], "--", label="d(training return)/dσ_max (dual)")
    bottom.axhline(0.0, color="gray", lw=0.5)
    bottom.set_xlabel("risk limit σ_max (daily volatility, %)")
    bottom.set_ylabel("derivative")
    bottom.legend()
    top.set_title("Risk-limited portfolio: return and its sensitivity to σ_max")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    best = int(np.argmax(res["test_return"]))
    print(f"saved {out}; best test return {res['test_return'][best]:.4f}% at "
          f"σ_max = {res['sigma'][best]:.3f}")
    return res


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--short", action="store_true")
    parser.add_argument("--out", default="portfolio.png")
    args = parser.parse_args()
    res = main(8 if args.short else 40, args.out)
    if args.short:
        for k in (2, 5):
            fd = finite_difference(float(res["sigma"][k]))
            print(f"σ_max = {res['sigma'][k]:.3f}: layer {res['grad'][k]:.8f}, "
                  f"finite differences {fd:.8f}")
