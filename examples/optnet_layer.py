"""An OptNet-style network: a linear predictor feeding a QP layer learns to reproduce the
decisions of an unknown QP policy.

The hidden teacher maps features z to the cost c*(z) = W* z of

    x*(z) = argmin ½‖x‖² + c*(z)ᵀx   s.t.   G x ≤ h*

The student predicts c(z) = W z + w₀ and also learns the right-hand side h (one vector shared
by the whole batch, so its gradient is summed over the batch). Training differentiates through
the QP layer; the held-out loss must fall by more than 10×.

    python examples/optnet_layer.py            # full run
    python examples/optnet_layer.py --short    # the quick run the tests use
"""

import argparse

import numpy as np
import torch

import torchdiffopt as tdo

N_FEATURES, N_VARS, N_CONS = 5, 6, 8


def qp_layer(G: np.ndarray) -> tuple[tdo.Layer, tdo.Parameter, tdo.Parameter]:
    m = tdo.Model()
    x = m.variable(N_VARS, name="x")
    c = m.parameter(np.zeros(N_VARS), name="c")
    h = m.parameter(np.ones(N_CONS), name="h")
    m.constraint(G @ x <= h)
    m.minimize(0.5 * tdo.sum_squares(x) + c @ x)
    return tdo.Layer(m, parameters=[c, h], outputs=x), c, h


class Student(torch.nn.Module):
    def __init__(self, layer: tdo.Layer):
        super().__init__()
        self.predict_cost = torch.nn.Linear(N_FEATURES, N_VARS, dtype=torch.float64)
        self.h = torch.nn.Parameter(torch.full((N_CONS,), 2.0, dtype=torch.float64))
        self.layer = layer

    def forward(self, z):
        return self.layer(self.predict_cost(z), self.h)


def run(steps: int, seed: int = 0, verbose: bool = True) -> tuple[float, float]:
    """Train; return the held-out loss before and after."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(N_CONS, N_VARS))
    layer, _, _ = qp_layer(G)
    W_true = torch.tensor(rng.normal(size=(N_VARS, N_FEATURES)))
    h_true = torch.tensor(rng.uniform(0.5, 1.5, N_CONS))

    def teacher(z):
        with torch.no_grad():
            return layer(z @ W_true.T, h_true)

    z_train = torch.randn(256, N_FEATURES, dtype=torch.float64)
    z_test = torch.randn(128, N_FEATURES, dtype=torch.float64)
    x_train, x_test = teacher(z_train), teacher(z_test)

    student = Student(layer)
    opt = torch.optim.Adam(student.parameters(), lr=0.05)

    def test_loss():
        with torch.no_grad():
            return float(((student(z_test) - x_test) ** 2).mean())

    before = test_loss()
    for step in range(steps):
        idx = torch.randint(0, len(z_train), (64,))
        loss = ((student(z_train[idx]) - x_train[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if verbose and step % 25 == 0:
            print(f"step {step:4d}  train loss {loss.item():.3e}  held-out {test_loss():.3e}")
    after = test_loss()
    if verbose:
        print(f"held-out loss: {before:.3e} -> {after:.3e} ({before / after:.0f}x lower)")
    return before, after


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--short", action="store_true", help="a quick run (tests)")
    args = parser.parse_args()
    run(steps=50 if args.short else 400)
