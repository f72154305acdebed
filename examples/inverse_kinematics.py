"""Inverse kinematics of a planar two-link arm, and how sensitive the joint angles are to
the target: a heat map of ‖∂θ/∂(x, y)‖ over the workspace.

The arm has links l₁, l₂ and joint angles θ = (θ₁, θ₂); its hand is at

    fk(θ) = (l₁ cos θ₁ + l₂ cos(θ₁ + θ₂),  l₁ sin θ₁ + l₂ sin(θ₁ + θ₂)).

For a target (x, y) (the parameters) we solve the nonconvex NLP

    min ½ ‖θ - θ_ref‖²   s.t.   fk(θ) = (x, y)

and read ∂θ/∂(x, y) by forward mode through its KKT conditions (one solve per direction).
Where the constraints fix θ locally, ∂θ/∂(x, y) = J(θ)⁻¹ (J the Jacobian of fk); it blows up
near the workspace's edges (|l₁ - l₂| and l₁ + l₂), where the arm is singular.

    python examples/inverse_kinematics.py            # 30×30 grid, writes ik_sensitivity.png
    python examples/inverse_kinematics.py --short    # 8×8 grid (tests)
"""

import argparse

import numpy as np

import torchdiffopt as tdo

L1, L2 = 1.0, 0.7
THETA_REF = np.array([0.3, 1.2])  # prefers the elbow-up branch


def ik_model():
    m = tdo.nonlinear_diff_model()
    theta = m.variable(2, name="theta", start=THETA_REF)
    target = m.parameter(np.array([1.0, 0.5]), name="target")
    hand_x = L1 * tdo.cos(theta[0]) + L2 * tdo.cos(theta[0] + theta[1])
    hand_y = L1 * tdo.sin(theta[0]) + L2 * tdo.sin(theta[0] + theta[1])
    m.constraint(hand_x == target[0], name="reach_x")
    m.constraint(hand_y == target[1], name="reach_y")
    m.minimize(0.5 * tdo.sum_squares(theta - THETA_REF))
    return m, theta, target


def sensitivity(m, theta, target, point) -> np.ndarray:
    """Solve for one target; return ∂θ/∂(x, y) as a 2×2 matrix (columns: x, y)."""
    m.set_parameter_value(target, point)
    m.set_start_value(theta, THETA_REF)
    m.optimize()
    columns = []
    for direction in np.eye(2):
        m.empty_input_sensitivities()
        m.set_forward_parameter(target, direction)
        m.forward_differentiate()
        columns.append(m.get_forward_variable(theta))
    return np.column_stack(columns)


def heat_map(grid: int):
    """‖∂θ/∂(x, y)‖ (Frobenius) on a grid over the annulus the hand can reach."""
    m, theta, target = ik_model()
    r_in, r_out = abs(L1 - L2) + 0.05, L1 + L2 - 0.05
    xs = np.linspace(-r_out, r_out, grid)
    norms = np.full((grid, grid), np.nan)
    for i, y in enumerate(xs):
        for j, x in enumerate(xs):
            if r_in <= np.hypot(x, y) <= r_out:
                try:
                    norms[i, j] = np.linalg.norm(sensitivity(m, theta, target, [x, y]))
                except tdo.SolverError as err:  # left blank on the map, and said
                    print(f"target ({x:.2f}, {y:.2f}): {err}")
    return xs, norms


def main(grid: int, out: str):
    xs, norms = heat_map(grid)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    image = ax.pcolormesh(xs, xs, np.log10(norms), shading="nearest", cmap="viridis")
    fig.colorbar(image, label="log10 ‖∂θ/∂(x, y)‖")
    ax.set_aspect("equal")
    ax.set_xlabel("target x")
    ax.set_ylabel("target y")
    ax.set_title("Two-link arm: sensitivity of the joint angles")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"saved {out}; ‖∂θ/∂(x, y)‖ from {np.nanmin(norms):.2f} to {np.nanmax(norms):.2f}")
    return norms


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--short", action="store_true")
    parser.add_argument("--out", default="ik_sensitivity.png")
    args = parser.parse_args()
    main(8 if args.short else 30, args.out)
