"""``python -m torchdiffopt``: solve the seed tutorial's model and print its sensitivities.

    min 2x - y   s.t.   q·x + y ≥ 3p,   y ≤ 5,     at p = 4, q = 2

Every number in the table is computed: the values by HiGHS, the columns ∂/∂p and ∂/∂q by
forward mode (one solve each with the stored KKT factorization), and the last line checks
them against reverse mode (one solve for both parameters).
"""

from __future__ import annotations

import torchdiffopt as tdo


def tutorial_model():
    m = tdo.quadratic_diff_model("highs")
    x, y = m.variable(name="x"), m.variable(name="y")
    p, q = m.parameter(4.0, name="p"), m.parameter(2.0, name="q")
    cons = m.constraint(q * x + y >= 3 * p, name="cons")
    m.constraint(y <= 5, name="ybnd")
    m.minimize(2 * x - y)
    return m, x, y, p, q, cons


def main() -> None:
    m, x, y, p, q, cons = tutorial_model()
    m.optimize()
    columns = {}
    for param in (p, q):
        m.empty_input_sensitivities()
        m.set_forward_parameter(param, 1.0)
        m.forward_differentiate()
        columns[param.name] = (m.get_forward_variable(x), m.get_forward_variable(y),
                               m.get_forward_objective(), m.get_forward_constraint_dual(cons))
    m.empty_input_sensitivities()
    m.set_reverse_variable(x, 1.0)
    m.reverse_differentiate()
    reverse = (m.get_reverse_parameter(p), m.get_reverse_parameter(q))

    print("torchdiffopt: sensitivities of the DiffOpt tutorial model")
    print("  min 2x - y  s.t.  q*x + y >= 3p,  y <= 5   at p = 4, q = 2")
    print(f"status: {m.status}")
    print(f"{'':<12}{'value':>10}{'d/dp':>10}{'d/dq':>10}")
    rows = [("x", m.value(x)), ("y", m.value(y)), ("objective", m.objective_value),
            ("dual(cons)", m.dual(cons))]
    for k, (label, value) in enumerate(rows):
        print(f"{label:<12}{value:>10.4f}{columns['p'][k]:>10.4f}{columns['q'][k]:>10.4f}")
    print(f"reverse mode, seed on x: dx/dp = {reverse[0]:.4f}, dx/dq = {reverse[1]:.4f}")
    print(f"reverse constraint function: {m.get_reverse_constraint_function(cons)}")


if __name__ == "__main__":
    main()
