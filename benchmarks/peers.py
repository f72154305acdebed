"""The peers, each optional: qpth and cvxpylayers (with its default solver and with Clarabel).

An absent peer is skipped with a printed note (see :func:`availability_notes`). Peers are
called the way their own documentation calls them, with two precautions:

* qpth averages the gradient of a parameter passed without a batch dimension, so every
  tensor handed to it carries the batch dimension;
* cvxpylayers' default path (diffcp + SCS) can return inaccurate solutions without a
  warning; the harness compares every peer's solutions with a KKT-certified reference.

cvxpylayers 1.2 runs diffcp for the conic form; diffcp's ``solve_method`` picks SCS (the
default) or Clarabel, passed here through ``solver_args``.
"""

from __future__ import annotations

import time

import torch

from harness import Method

try:
    from qpth.qp import QPFunction
except ImportError:
    QPFunction = None

try:
    import cvxpy as cp
    from cvxpylayers.torch import CvxpyLayer
except ImportError:
    cp = CvxpyLayer = None

#: cvxpylayers configurations: name -> solver_args
CVXPYLAYERS_SOLVERS = {"cvxpylayers[SCS]": {},
                       "cvxpylayers[Clarabel]": {"solve_method": "Clarabel"}}


def availability_notes() -> list[str]:
    notes = []
    if QPFunction is None:
        notes.append("qpth not installed: its columns are skipped")
    if CvxpyLayer is None:
        notes.append("cvxpylayers not installed: its columns are skipped "
                     "(pip install cvxpylayers clarabel)")
    return notes


def qpth_solve(Q, p, G, h, A=None, b=None):
    """``QPFunction()(Q, p, G, h, A, b)`` on batched tensors (qpth's default settings;
    ``verbose=-1`` only silences its 'inferior solution' messages)."""
    if A is None:
        A = b = torch.empty(0, dtype=p.dtype)
    return QPFunction(verbose=-1)(Q, p, G, h, A, b)


def qpth_method(forward, skip: str = "") -> list[Method]:
    """The qpth method for a case, or nothing if qpth is absent."""
    if QPFunction is None:
        return []
    return [Method("qpth", "peer", forward, skip=skip)]


def cvxpylayers_methods(build, to_parameters) -> list[Method]:
    """One method per cvxpylayers configuration. ``build()`` returns
    ``(problem, parameters, variable)`` in cvxpy; ``to_parameters(*leaves)`` maps the case's
    leaves to the layer's parameter tensors (batch first). The layer is built once (its
    build time is reported as set-up) and shared by the configurations."""
    if CvxpyLayer is None:
        return []
    start = time.perf_counter()
    problem, parameters, variable = build()
    layer = CvxpyLayer(problem, parameters=parameters, variables=[variable])
    setup = time.perf_counter() - start

    def method(name, solver_args):
        def forward(*leaves):
            return layer(*to_parameters(*leaves), solver_args=solver_args)[0]
        return Method(name, "peer", forward, setup_s=setup)

    return [method(name, args) for name, args in CVXPYLAYERS_SOLVERS.items()]
