"""Random LPs and QPs with a known, strictly complementary and nondegenerate solution.

The generator picks x*, an active set and multipliers of the right signs first, then sets
the data so that the KKT conditions hold there (the constructions of Rosen and Suzuki):
right-hand sides make the active rows tight and the inactive ones slack by at least 0.5, and
the linear cost ``c`` is solved from stationarity. Every piece of data is a parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

import torchdiffopt as tdo


@dataclass
class RandomQP:
    model: tdo.Model
    x: tdo.Variable
    x_star: np.ndarray
    params: list
    constraints: list
    values: dict = field(default_factory=dict)

    def outputs(self) -> np.ndarray:
        """Every output of the solution map, flattened: x, all duals, optimal value."""
        m = self.model
        parts = [np.atleast_1d(m.value(self.x))]
        parts += [np.atleast_1d(m.dual(c)) for c in self.constraints]
        parts.append(np.atleast_1d(m.objective_value))
        return np.concatenate(parts)

    def solve_at(self, values: dict) -> np.ndarray:
        for p, v in values.items():
            self.model.set_parameter_value(p, v)
        self.model.optimize()
        return self.outputs()


def random_qp(rng: np.random.Generator, kind: str = "qp", maximize: bool = False,
              solver: str = "highs") -> RandomQP:
    """``kind``: "lp" (P = 0, a unique vertex), "qp" (P ≻ 0) or "psd" (P ⪰ 0, rank deficient)."""
    n = int(rng.integers(3, 8))
    x_star = rng.normal(size=n)
    if kind == "lp":
        P = np.zeros((n, n))
        n_active = n
    elif kind == "qp":
        L = rng.normal(size=(n, n))
        P = L @ L.T + 0.5 * np.eye(n)
        n_active = int(rng.integers(0, n))
    else:
        r = int(rng.integers(1, n))
        L = rng.normal(size=(n, r))
        P = L @ L.T
        n_active = int(rng.integers(n - r, n + 1))
    # split the active constraints among  <=  rows, >= rows, == rows and variable bounds
    split = rng.multinomial(n_active, [0.3, 0.3, 0.2, 0.2])
    n_le, n_ge, n_eq, n_bd = (int(s) for s in split)
    m_le, m_ge = n_le + int(rng.integers(1, 3)), n_ge + int(rng.integers(1, 3))

    G_le, G_ge, A = (rng.normal(size=(k, n)) for k in (m_le, m_ge, n_eq))
    slack_le = np.r_[np.zeros(n_le), rng.uniform(0.5, 1.5, m_le - n_le)]
    slack_ge = np.r_[np.zeros(n_ge), rng.uniform(0.5, 1.5, m_ge - n_ge)]
    h_le = G_le @ x_star + slack_le
    h_ge = G_ge @ x_star - slack_ge
    b = A @ x_star

    # bounds: the first n_bd variables have an active bound (lower or upper at random)
    lb = np.full(n, -np.inf)
    ub = np.full(n, np.inf)
    at_lower = rng.random(n_bd) < 0.5
    bound_vars = rng.permutation(n)[:n_bd]
    lb[bound_vars[at_lower]] = x_star[bound_vars[at_lower]]
    ub[bound_vars[~at_lower]] = x_star[bound_vars[~at_lower]]
    loose = np.setdiff1d(np.arange(n), bound_vars)[: n // 2]
    lb[loose] = x_star[loose] - rng.uniform(0.5, 1.5, len(loose))

    # multipliers of  L = f + Σ μ_i (lhs - rhs)_i : μ ≥ 0 on <= rows, ≤ 0 on >= rows
    mu_le = np.r_[rng.uniform(0.5, 2.0, n_le), np.zeros(m_le - n_le)]
    mu_ge = -np.r_[rng.uniform(0.5, 2.0, n_ge), np.zeros(m_ge - n_ge)]
    nu = rng.normal(size=n_eq)
    mu_bound = np.zeros(n)
    mu_bound[bound_vars[at_lower]] = -rng.uniform(0.5, 2.0, at_lower.sum())
    mu_bound[bound_vars[~at_lower]] = rng.uniform(0.5, 2.0, (~at_lower).sum())
    c = -(P @ x_star + G_le.T @ mu_le + G_ge.T @ mu_ge + A.T @ nu + mu_bound)
    offset = rng.normal()

    model = tdo.Model(solver=solver)
    x = model.variable(n, lb=lb, ub=ub, name="x")
    values = {"P": P, "c": c, "k": offset, "G_le": G_le, "h_le": h_le, "G_ge": G_ge,
              "h_ge": h_ge}
    if n_eq:
        values.update(A=A, b=b)
    prm = {k: model.parameter(v, name=k) for k, v in values.items()}
    objective = 0.5 * (x @ prm["P"] @ x) + prm["c"] @ x + prm["k"]
    cons = [model.constraint(prm["G_le"] @ x <= prm["h_le"], name="le"),
            model.constraint(prm["G_ge"] @ x >= prm["h_ge"], name="ge")]
    if n_eq:
        cons.append(model.constraint(prm["A"] @ x == prm["b"], name="eq"))
    if maximize:
        model.maximize(-objective)
    else:
        model.minimize(objective)
    return RandomQP(model, x, x_star, list(prm.values()), cons,
                    {p: p.value.copy() for p in prm.values()})
