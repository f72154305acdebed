"""HiGHS adapter: LP and convex QP through highspy.

Shadow-price convention: HiGHS's row dual is ``∂(optimal objective)/∂(row bound)`` and its
column dual (reduced cost) is ``∂(optimal objective)/∂(active variable bound)`` for a
minimization; this adapter returns them under those meanings for the internal
(minimization) problem of :mod:`torchdiffopt.compile.quadratic`.
"""

from __future__ import annotations

import ctypes
import os
import threading

import highspy
import numpy as np
import scipy.sparse as sp

from ..errors import InfeasibleError, SolverError, UnboundedError
from .solution import NumericQP, Solution

_STATUS = highspy.HighsModelStatus
_banner_lock = threading.Lock()
_banner_shown = False


def _new_highs() -> highspy.Highs:
    """A silent HiGHS instance. HiGHS writes a copyright banner to the C-level stdout when
    the first instance of a process is built, before any option can silence it; that one
    construction runs with file descriptor 1 pointed at /dev/null."""
    global _banner_shown
    with _banner_lock:
        if not _banner_shown:
            saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, 1)
                h = highspy.Highs()
                ctypes.CDLL(None).fflush(None)
            finally:
                os.dup2(saved, 1)
                os.close(saved)
                os.close(devnull)
            _banner_shown = True
        else:
            h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    return h


def _build(problem: NumericQP) -> highspy.HighsModel:
    lp = highspy.HighsLp()
    lp.num_col_ = problem.n
    lp.num_row_ = problem.m
    lp.col_cost_ = problem.q
    lp.col_lower_ = problem.lb
    lp.col_upper_ = problem.ub
    lp.offset_ = float(problem.r)
    rhs = -problem.c0
    lp.row_lower_ = np.where(problem.sense >= 0, rhs, -np.inf)
    lp.row_upper_ = np.where(problem.sense <= 0, rhs, np.inf)
    A = sp.csc_matrix(problem.C)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = A.indptr
    lp.a_matrix_.index_ = A.indices
    lp.a_matrix_.value_ = A.data
    model = highspy.HighsModel()
    model.lp_ = lp
    if problem.P.nnz:
        lower = sp.tril(problem.P).tocsc()
        lower.eliminate_zeros()
        hessian = highspy.HighsHessian()
        hessian.dim_ = problem.n
        hessian.format_ = highspy.HessianFormat.kTriangular
        hessian.start_ = lower.indptr
        hessian.index_ = lower.indices
        hessian.value_ = lower.data
        model.hessian_ = hessian
    return model


def _run(problem: NumericQP, presolve: bool, options: dict):
    h = _new_highs()
    h.setOptionValue("presolve", "on" if presolve else "off")
    for key, value in options.items():
        h.setOptionValue(key, value)
    h.passModel(_build(problem))
    h.run()
    return h, h.getModelStatus()


def solve_highs(problem: NumericQP, **options) -> Solution:
    """Solve the internal QP with HiGHS; raise a named error unless it is optimal."""
    h, status = _run(problem, presolve=True, options=options)
    if status == _STATUS.kUnboundedOrInfeasible:
        # presolve could not tell which; the solver proper can
        h, status = _run(problem, presolve=False, options=options)
    if status == _STATUS.kInfeasible:
        raise InfeasibleError("infeasible: HiGHS proved that no point satisfies the constraints")
    if status in (_STATUS.kUnbounded, _STATUS.kUnboundedOrInfeasible):
        raise UnboundedError(
            "unbounded: HiGHS reports that the objective can be improved without limit"
            if status == _STATUS.kUnbounded
            else "infeasible or unbounded: HiGHS could not tell which"
        )
    if status != _STATUS.kOptimal:
        raise SolverError(f"HiGHS stopped without an optimal solution (status {status.name})")
    sol = h.getSolution()
    return Solution(
        x=np.array(sol.col_value, dtype=np.float64),
        row_shadow=np.array(sol.row_dual, dtype=np.float64),
        bound_shadow=np.array(sol.col_dual, dtype=np.float64),
    )
