"""Reverse mode on an NLP with 3,000 parameters costs about one factorization.

    python benchmarks/nonlinear_reverse.py

Problem: min Σ exp(0.1 x) + ½‖x - c‖²  s.t.  A x ≤ b, with A (60 × 50) a parameter: 3,000
parameters in A, plus c and b. Reverse mode is one adjoint solve with the stored KKT
factorization plus one reverse pass through the model's torch functions; forming the Jacobian
∂F/∂θ instead (what DiffOpt.jl's NLP backend does) would cost one column per parameter.
Prints the median of 5 runs of: solve (SLSQP + Newton polish + factorization), one reverse
pass, one forward direction, and the forward-mode cost of all 3,000 directions (estimated as
3,000 × one direction).
"""

import statistics
import time

import numpy as np

import torchdiffopt as tdo


def build(seed=0, n=50, k=60):
    rng = np.random.default_rng(seed)
    m = tdo.nonlinear_diff_model()
    x = m.variable(n, name="x")
    A = m.parameter(rng.normal(size=(k, n)), name="A")
    b = m.parameter(rng.uniform(0.5, 1.5, k), name="b")
    c = m.parameter(3 * rng.normal(size=n), name="c")
    m.constraint(A @ x <= b)
    m.minimize(tdo.sum(tdo.exp(0.1 * x)) + 0.5 * tdo.sum_squares(x - c))
    return m, x, A, b, c


def timed(fn, repeat=5):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    m, x, A, b, c = build()
    m.optimize()
    n_params = A.size + b.size + c.size
    active = int(m._sensitivity.solved().kkt.active.sum())
    t_solve = timed(m.optimize)
    m.set_reverse_variable(x, np.ones(x.shape))
    t_reverse = timed(m.reverse_differentiate)
    m.empty_input_sensitivities()
    m.set_forward_parameter(A, np.ones(A.shape))
    t_forward = timed(m.forward_differentiate)
    print(f"parameters: {n_params} ({A.size} in A); active constraints: {active}")
    print(f"solve + polish + factorization : {t_solve * 1e3:8.1f} ms")
    print(f"reverse mode (all parameters)  : {t_reverse * 1e3:8.1f} ms")
    print(f"forward mode, one direction    : {t_forward * 1e3:8.1f} ms")
    print(f"forward mode, all {n_params} directions ≈ {n_params * t_forward:8.1f} s "
          f"({n_params * t_forward / t_reverse:.0f}x the reverse pass)")


if __name__ == "__main__":
    main()
