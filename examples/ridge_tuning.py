"""Tune the ridge penalty α by gradient descent on the validation loss, differentiating the
training problem's solution with respect to α.

Inner problem (parameters: log α, so α stays positive):

    w*(α) = argmin_w ½ ‖X w - y‖² + ½ α ‖w‖²

Outer loss: the validation error ½‖X_val w*(α) - y_val‖² / n_val, minimized over log α by
gradient descent through a torchdiffopt layer. Closed form for checking:
w*(α) = (XᵀX + αI)⁻¹ Xᵀy and dw*/dα = -(XᵀX + αI)⁻¹ w*.

    python examples/ridge_tuning.py          # full run
    python examples/ridge_tuning.py --short  # the quick run the tests use
"""

import argparse

import numpy as np
import torch

import torchdiffopt as tdo


def data(seed=0, n_train=30, n_val=200, d=12, noise=1.0):
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=d) * (rng.random(d) < 0.5)
    X, X_val = rng.normal(size=(n_train, d)), rng.normal(size=(n_val, d))
    y = X @ w_true + noise * rng.normal(size=n_train)
    y_val = X_val @ w_true + noise * rng.normal(size=n_val)
    return X, y, X_val, y_val


def ridge_layer(X, y, backend="nonlinear"):
    m = tdo.Model(backend=backend)
    w = m.variable(X.shape[1], name="w")
    log_alpha = m.parameter(0.0, name="log_alpha")
    m.minimize(0.5 * tdo.sum_squares(X @ w - y) + 0.5 * tdo.exp(log_alpha) * tdo.sum_squares(w))
    return tdo.Layer(m, parameters=[log_alpha], outputs=w)


def run(steps: int, lr: float = 0.5, start: float = 4.0, verbose: bool = True):
    """Gradient descent on log α from α = e^start; returns the (log α, loss) history."""
    X, y, X_val, y_val = data()
    layer = ridge_layer(X, y)
    Xv, yv = torch.tensor(X_val), torch.tensor(y_val)
    log_alpha = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    history = []
    for step in range(steps):
        w = layer(log_alpha)
        loss = 0.5 * ((Xv @ w - yv) ** 2).mean()
        (g,) = torch.autograd.grad(loss, log_alpha)
        history.append((log_alpha.item(), loss.item()))
        if verbose:
            print(f"step {step:3d}  alpha {np.exp(log_alpha.item()):9.4f}  "
                  f"validation loss {loss.item():.4f}")
        with torch.no_grad():
            log_alpha -= lr * g
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--short", action="store_true")
    args = parser.parse_args()
    run(steps=8 if args.short else 40)
