"""W5: non-negative least squares ``min ½‖Ax - b‖²  s.t.  x ≥ 0``, one instance,
``A`` 2000×500 (quick: 60×20), ``b`` the parameter.

torchdiffopt and qpth take it as the QP ``P = AᵀA``, ``q = -Aᵀb`` (a torch function of
``b``), with the bounds ``x ≥ 0`` (ours as variable bounds, qpth as ``G = -I, h = 0``);
cvxpylayers takes the least-squares form as written.
"""

from __future__ import annotations

import numpy as np
import torch

import torchdiffopt as tdo
from harness import Case
from peers import cp, cvxpylayers_methods, qpth_method, qpth_solve
from workloads.common import certified_reference, ours_methods

FULL, QUICK = (2000, 500), (60, 20)


def case(rows: int, cols: int, solvers, seed: int = 0) -> Case:
    rng = np.random.default_rng(seed)
    A_np = rng.normal(size=(rows, cols))
    A = torch.tensor(A_np)
    b = torch.tensor(A_np @ rng.normal(size=cols) + rng.normal(size=rows))
    b = b.reshape(1, rows).requires_grad_()
    weights = torch.tensor(rng.normal(size=(1, cols)))
    P = A.T @ A
    zeros = np.zeros(cols)

    def ours(solver):
        return lambda b: tdo.functional.qp(P, -b @ A, lb=zeros, solver=solver,
                                           on_failure="nan")

    def qpth_forward(b):
        eye = torch.eye(cols, dtype=torch.float64)
        return qpth_solve(P.expand(1, cols, cols), -b @ A, -eye.expand(1, cols, cols),
                          torch.zeros(1, cols, dtype=torch.float64))

    def cvxpy_problem():
        x = cp.Variable(cols)
        rhs = cp.Parameter(rows)
        problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(A_np @ x - rhs)), [x >= 0])
        return problem, [rhs], x

    methods = ours_methods(solvers, ours)
    methods += qpth_method(qpth_forward)
    methods += cvxpylayers_methods(cvxpy_problem, lambda b: (b,))
    reference = certified_reference(lambda s, b: ours(s)(b))
    return Case("W5", f"A {rows}x{cols}", {"rows": rows, "cols": cols}, [b], weights,
                methods, reference)


def cases(quick: bool, solvers) -> list[Case]:
    return [case(*(QUICK if quick else FULL), solvers)]
