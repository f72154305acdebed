"""Build and compile time of a model with n variables and n sparse vector rows.

    python benchmarks/build_scale.py [n ...]

Prints the median of 5 runs of: building the model (variables, parameters, one vector
constraint `A @ x <= b`, a quadratic objective) and evaluating its data D(θ).
"""

import statistics
import sys
import time

import numpy as np
import scipy.sparse as sp

import torchdiffopt as tdo


def build(n: int, A: sp.csr_matrix) -> float:
    start = time.perf_counter()
    m = tdo.Model()
    x = m.variable(n, lb=0.0, ub=1.0, name="x")
    b = m.parameter(np.ones(n), name="b")
    c = m.parameter(np.ones(n), name="c")
    m.constraint(A @ x <= b)
    m.minimize(c @ x + 0.5 * tdo.sum_squares(x))
    m._sensitivity.pipeline().form.data(m._sensitivity.parameter_tensors())
    return time.perf_counter() - start


def main(sizes):
    print(f"{'n':>8} {'nnz(A)':>10} {'build+compile (s)':>18}")
    for n in sizes:
        rng = np.random.default_rng(0)
        A = sp.csr_matrix((rng.normal(size=5 * n), (rng.integers(0, n, 5 * n),
                                                   rng.integers(0, n, 5 * n))), shape=(n, n))
        build(n, A)  # warm-up
        t = statistics.median(build(n, A) for _ in range(5))
        print(f"{n:>8} {A.nnz:>10} {t:>18.4f}")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1_000, 10_000, 100_000])
