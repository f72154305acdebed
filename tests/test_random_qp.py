"""Forward and reverse derivatives of random LPs and QPs against central finite differences
(re-solving the problem) and against each other (the adjoint identity ⟨w, J v⟩ = ⟨Jᵀw, v⟩).

Outputs checked: the primal x, the duals of every constraint (shadow prices) and the optimal
value. Inputs: every piece of data is a parameter (cost, quadratic matrix, constraint matrices
and right-hand sides, objective constant).
"""

import numpy as np
import pytest

from problems import random_qp

CASES = [(kind, maximize, seed) for seed in range(4) for kind in ("lp", "qp", "psd")
         for maximize in (False, True)]  # 24 problems per solver (HiGHS, SCS, DAQP)


def direction(problem, rng, kind):
    v = {p: rng.normal(size=p.shape) for p in problem.params}
    if kind != "qp":
        # P = 0 or singular: a two-sided perturbation of P could make it indefinite
        (P,) = [p for p in problem.params if p.name == "P"]
        v[P] = np.zeros(P.shape)
    return v


def forward(problem, v):
    m = problem.model
    m.empty_input_sensitivities()
    for p, d in v.items():
        m.set_forward_parameter(p, d)
    m.forward_differentiate()
    parts = [np.atleast_1d(m.get_forward_variable(problem.x))]
    parts += [np.atleast_1d(m.get_forward_constraint_dual(c)) for c in problem.constraints]
    parts.append(np.atleast_1d(m.get_forward_objective()))
    return np.concatenate(parts)


def reverse(problem, w):
    m = problem.model
    m.empty_input_sensitivities()
    n = problem.x.size
    m.set_reverse_variable(problem.x, w[:n].reshape(problem.x.shape))
    k = n
    for c in problem.constraints:
        m.set_reverse_constraint_dual(c, w[k:k + c.shape[0]])
        k += c.shape[0]
    m.set_reverse_objective(w[k])
    m.reverse_differentiate()
    return {p: np.asarray(m.get_reverse_parameter(p)) for p in problem.params}


@pytest.mark.parametrize("solver", ["highs", "scs", "daqp"])
@pytest.mark.parametrize("kind,maximize,seed", CASES)
def test_derivatives_match_finite_differences_and_adjoint(kind, maximize, seed, solver):
    rng = np.random.default_rng(100 + seed)
    problem = random_qp(rng, kind, maximize, solver)
    base = problem.solve_at(problem.values)
    np.testing.assert_allclose(base[: problem.x.size], problem.x_star, atol=1e-8)

    v = direction(problem, rng, kind)
    jv = forward(problem, v)

    eps = 1e-6
    plus = problem.solve_at({p: val + eps * v[p] for p, val in problem.values.items()})
    minus = problem.solve_at({p: val - eps * v[p] for p, val in problem.values.items()})
    problem.solve_at(problem.values)
    fd = (plus - minus) / (2 * eps)
    np.testing.assert_allclose(jv, fd, rtol=1e-5, atol=1e-5 * (1 + np.abs(fd).max()))

    w = rng.normal(size=jv.shape)
    grads = reverse(problem, w)
    lhs = w @ jv
    rhs = sum(float(np.sum(grads[p] * v[p])) for p in problem.params)
    assert lhs == pytest.approx(rhs, rel=1e-9, abs=1e-9)
