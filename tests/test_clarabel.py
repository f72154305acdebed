"""The Clarabel adapter (optional dependency; these tests skip without it).

Clarabel's answer is translated to SCS's conventions (PSD rows permuted from its upper
triangle, dual exponential and dual power cones mapped onto its primal cones). Checked on
programs whose answers are derived by hand, on the random known-solution programs of
test_conic.py (against the known solution, against SCS, derivatives against finite
differences) and through the model, the layer and ``functional.conic``. Clarabel's raw point
is an interior point near the central path, off the solution by about the square root of its
tolerance (up to ~1e-5 here); the conic backend's Newton refinement takes it to round-off.
"""

import math

import numpy as np
import pytest
import torch

import torchdiffopt as tdo
from test_conic import RANDOM, direction, finite_difference, random_program, solve
from torchdiffopt.backends import cones as C
from torchdiffopt.backends.batched_conic import ConicPattern
from torchdiffopt.errors import InfeasibleError, NonconvexError, SolverError, UnboundedError
from torchdiffopt.pipelines import ConicPipeline, pipeline_for
from torchdiffopt.solvers.clarabel_conic import _SOLVED, ClarabelSequence, solve_clarabel_conic

pytest.importorskip("clarabel")

T64 = torch.float64
#: how far Clarabel's raw (interior) point may lie from the solution
RAW_ATOL = 1e-4


def check(A, b, c, cones, P=None, x=None, y=None, s=None):
    """Clarabel's raw point (to :data:`RAW_ATOL`) and the refined one (to 1e-12) against
    the known ``x``, ``y``, ``s`` (those given)."""
    raw = solve_clarabel_conic(A, b, c, cones, P)
    D = solve(A, b, c, cones, P, solver=solve_clarabel_conic)
    for name, want in (("x", x), ("y", y), ("s", s)):
        if want is not None:
            np.testing.assert_allclose(getattr(raw, name), want, atol=RAW_ATOL)
            np.testing.assert_allclose(getattr(D, name), want, atol=1e-12)
    return D


# ---------------------------------------------------------------- answers by hand

def test_lp_signs_match_scs():
    """test_conic.test_lp_closed_form: x = (8/5, 6/5), SCS's dual y = (2/5, 1/5, 0, 0)."""
    A = np.array([[1.0, 2], [3, 1], [-1, 0], [0, -1]])
    b, c = np.array([4.0, 6, 0, 0]), np.array([-1.0, -1])
    x = np.array([8 / 5, 6 / 5])
    check(A, b, c, {"l": 4}, x=x, y=[0.4, 0.2, 0, 0], s=b - A @ x)


def test_psd_rows_in_scs_order():
    """min ⟨C, X⟩ s.t. tr X = 1, X ⪰ 0 (x = svec X): X = vvᵀ for the eigenvector v of
    λ_min(C). Stationarity svec C + y₀ svec I - y_K = 0 with y_K ⊥ X gives y₀ = -λ_min and
    y_K = svec(C - λ_min I). C has distinct off-diagonal entries, so a wrong order of the
    triangle's entries (Clarabel's upper vs SCS's lower triangle) would show."""
    Cm = np.array([[1.0, 0.5, -0.3], [0.5, 2.0, 0.8], [-0.3, 0.8, -1.0]])
    lam, V = np.linalg.eigh(Cm)
    A = np.vstack((C.svec(np.eye(3)), -np.eye(6)))
    b = np.r_[1.0, np.zeros(6)]
    X = np.outer(V[:, 0], V[:, 0])
    check(A, b, C.svec(Cm), {"z": 1, "s": [3]}, x=C.svec(X),
          y=np.r_[-lam[0], C.svec(Cm - lam[0] * np.eye(3))], s=np.r_[0.0, C.svec(X)])


def test_exponential_and_dual_exponential_cones():
    """min z s.t. (p, 1, z) ∈ K_exp: z = e^p. min w s.t. (-1, q, w) ∈ K_exp* (SCS's
    cl{(u, v, w): u < 0, -u·exp(v/u) ≤ e·w}): e^(-q) ≤ e·w, so w = e^(-q-1)."""
    A, c = np.array([[0.0], [0.0], [-1.0]]), np.ones(1)
    check(A, np.array([0.3, 1.0, 0.0]), c, {"ep": 1}, x=[math.exp(0.3)])
    check(A, np.array([-1.0, 0.7, 0.0]), c, {"ed": 1}, x=[math.exp(-1.7)])


@pytest.mark.parametrize("alpha", [0.3, 0.75])
def test_power_and_dual_power_cones(alpha):
    """max z s.t. (2, 3, z) ∈ K_α: z = 2^α 3^(1-α); for SCS's -α (the dual cone,
    (u/α)^α (v/(1-α))^(1-α) ≥ |w|): z = (2/α)^α (3/(1-α))^(1-α)."""
    A, b, c = np.array([[0.0], [0.0], [-1.0]]), np.array([2.0, 3.0, 0.0]), -np.ones(1)
    check(A, b, c, {"p": [alpha]}, x=[2 ** alpha * 3 ** (1 - alpha)])
    check(A, b, c, {"p": [-alpha]}, x=[(2 / alpha) ** alpha * (3 / (1 - alpha)) ** (1 - alpha)])


def test_quadratic_objective():
    """test_conic.test_qp_closed_form_simplex_projection: x = max(a - τ, 0), y₀ = τ."""
    a = np.array([0.5, 0.3, -0.4, 0.9])
    A, b = np.vstack((np.ones((1, 4)), -np.eye(4))), np.r_[1.0, np.zeros(4)]
    tau = 0.7 / 3
    D = check(A, b, -a, {"z": 1, "l": 4}, P=np.eye(4), x=np.maximum(a - tau, 0))
    assert abs(D.y[0] - tau) < 1e-12


def test_errors_name_the_cause():
    with pytest.raises(InfeasibleError, match="infeasible: Clarabel"):
        solve_clarabel_conic(np.array([[-1.0], [1.0]]), np.array([-1.0, 0.0]), np.ones(1),
                             {"l": 2})
    with pytest.raises(UnboundedError, match="unbounded"):
        solve_clarabel_conic(np.ones((1, 1)), np.ones(1), np.ones(1), {"l": 1})
    with pytest.raises(NonconvexError):
        solve_clarabel_conic(np.ones((1, 1)), np.ones(1), np.ones(1), {"l": 1}, P=-np.eye(1))
    with pytest.raises(ValueError, match="inconsistent sizes"):
        solve_clarabel_conic(np.ones((2, 1)), np.ones(2), np.ones(1), {"l": 3})
    pr = random_program(np.random.default_rng(1), {"l": 2, "q": [3], "ep": 1})
    with pytest.raises(SolverError, match="Clarabel stopped without a solution.*MaxIterations"):
        solve_clarabel_conic(pr["A"], pr["b"], pr["c"], pr["cones"], max_iter=1)
    with pytest.raises(ValueError, match="unknown Clarabel setting 'eps_abs'"):
        solve_clarabel_conic(pr["A"], pr["b"], pr["c"], pr["cones"], eps_abs=1e-9)


# ---------------------------------------------------------------- random programs

CLARABEL_RANDOM = RANDOM + [({"l": 1, "ed": 2}, False), ({"p": [-0.3, 0.7, -0.5]}, True)]


@pytest.mark.parametrize("cones, quadratic", CLARABEL_RANDOM, ids=str)
def test_random_programs_agree_with_scs_and_finite_differences(cones, quadratic):
    rng = np.random.default_rng(7)
    pr = random_program(rng, cones, quadratic)
    args = (pr["A"], pr["b"], pr["c"], cones, pr["P"])
    raw = solve_clarabel_conic(*args)
    # any label the adapter takes for a solution (_SOLVED): Clarabel's depends on the CPU's
    # rounding (an AMD EPYC calls this power-cone case "AlmostSolved" at residuals of
    # 1.5e-10, an Intel Xeon "Solved"); what is tested is the residual and the point below
    assert raw.status in _SOLVED and max(raw.residuals.values()) < 1e-9
    D = check(*args, x=pr["x"], y=pr["y"], s=pr["s"])
    scs = solve(*args)
    for name in "xys":
        np.testing.assert_allclose(getattr(D, name), getattr(scs, name), atol=1e-12)
    d = direction(rng, pr)
    fd = finite_difference(pr, d, solver=solve_clarabel_conic)
    fwd = np.concatenate(D.jvp(*d))
    np.testing.assert_allclose(fwd, fd, atol=1e-6 * max(1.0, np.abs(fd).max()), rtol=0)
    np.testing.assert_allclose(fwd, np.concatenate(scs.jvp(*d)), atol=1e-9, rtol=0)


def test_a_sequence_updates_one_solver_and_agrees_with_fresh_solves():
    """Programs of one pattern with new values of ``A``, ``b``, ``c`` and ``P``: the
    sequence keeps its solver (data updates) and each answer is a fresh solve's; an
    infeasible program in between raises and the next one is solved on a new solver; a
    new pattern gets a new solver."""
    rng = np.random.default_rng(3)
    cones = {"z": 1, "l": 3, "q": [3]}
    base = random_program(rng, cones, True)
    seq = ClarabelSequence(cones)
    solvers = []
    for k in range(4):
        A = base["A"] * (1 + 0.1 * rng.normal(size=base["A"].shape))
        P = base["P"] * (1 + 0.1 * k)
        args = (A, base["b"] + 0.1 * rng.uniform(size=base["b"].shape),
                base["c"] + 0.1 * rng.normal(size=base["c"].shape), P)
        got, want = seq.solve(*args), solve_clarabel_conic(*args[:3], cones, args[3])
        for name in "xys":
            np.testing.assert_allclose(getattr(got, name), getattr(want, name), atol=RAW_ATOL)
        assert max(got.residuals.values()) < 1e-9  # on this program's data: it was solved
        solvers.append(seq._solver)
    assert all(sv is solvers[0] for sv in solvers)
    # x ≥ 1 and x ≤ 0: no point; then 0 ≤ x ≤ 1, x* = 0
    A = np.array([[-1.0], [1.0]])
    interval = ClarabelSequence({"l": 2})
    with pytest.raises(InfeasibleError):
        interval.solve(A, np.array([-1.0, 0.0]), np.ones(1))
    assert interval._solver is None
    np.testing.assert_allclose(interval.solve(A, np.array([0.0, 1.0]), np.ones(1)).x, 0.0,
                               atol=1e-8)
    assert interval._solver is not None
    with pytest.raises(ValueError, match="inconsistent sizes"):  # another shape
        seq.solve(A, np.array([0.0, 1.0]), np.ones(1))
    sparser = base["A"].copy()
    sparser[1, 0] = 0.0
    seq.solve(sparser, base["b"], base["c"], base["P"])  # another pattern: a new solver
    assert seq._solver is not solvers[0]


def test_entries_of_a_batch_agree_with_one_by_one_and_keep_failures_apart():
    """``solve_entries`` on one pattern: each member's answer is the one
    ``solve_clarabel_conic`` gives it; an infeasible member in between is its own
    InfeasibleError and the members after it are solved. ``P`` is stored with both
    off-diagonal entries and a repeated diagonal one, as the conic backend's patterns may
    be: its CSC entries for Clarabel are the upper triangle of ``½(P + Pᵀ)``."""
    rng = np.random.default_rng(4)
    cones = {"z": 1, "l": 2, "q": [3]}
    # x₁ + x₂ = t, x ≥ 0, ‖x‖ ≤ r: infeasible for t < 0
    A = np.array([[1.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [0.0, 0.0], [-1.0, 0.0], [0.0, -1.0]])
    B = 5
    b = np.zeros((B, 6))
    b[:, 0], b[:, 3] = rng.uniform(0.2, 1.0, B), 2.0
    b[2, 0] = -1.0
    c = rng.normal(size=(B, 2))
    P_rows, P_cols = np.array([0, 0, 1, 1, 0]), np.array([0, 1, 0, 1, 0])
    P_vals = np.column_stack([rng.uniform(1, 2, B), rng.uniform(-0.3, 0.3, B),
                              rng.uniform(-0.3, 0.3, B), rng.uniform(1, 2, B),
                              rng.uniform(0, 1, B)])
    A_rows, A_cols = np.nonzero(A)
    pattern = ConicPattern(2, 6, A_rows, A_cols, P_rows, P_cols)
    # the same A in every member (only q, b and P change), then A's entries scaled too
    A_same = np.tile(A[A_rows, A_cols], (B, 1))
    for A_vals in (A_same, A_same * rng.uniform(0.5, 2.0, A_same.shape)):
        A_csc, A_data = pattern.csc_entries(A_vals, "A")
        P_csc, P_data = pattern.csc_entries(P_vals, "P_upper")
        got = ClarabelSequence(cones).solve_entries(A_csc, A_data, b, c, P_csc, P_data)
        assert np.array_equal(A_csc.data, A_data[0])  # the caller's matrices untouched
        assert np.array_equal(P_csc.data, P_data[0])
        for k in range(B):
            P = np.zeros((2, 2))
            np.add.at(P, (P_rows, P_cols), P_vals[k])
            A_k = np.zeros_like(A)
            np.add.at(A_k, (A_rows, A_cols), A_vals[k])
            if k == 2:
                assert isinstance(got[k], InfeasibleError)
                with pytest.raises(InfeasibleError):
                    solve_clarabel_conic(A_k, b[k], c[k], cones, P)
                continue
            want = solve_clarabel_conic(A_k, b[k], c[k], cones, P)
            for name in "xys":
                np.testing.assert_allclose(getattr(got[k], name), getattr(want, name),
                                           atol=1e-9)
    assert not ClarabelSequence.takes_entries({"l": 1, "s": [2]})
    with pytest.raises(ValueError, match="solve_entries takes"):
        ClarabelSequence({"l": 1, "ep": 1, "ed": 1}).solve_entries(A_csc, A_data, b, c)


def test_functional_conic_with_clarabel_reports_an_indefinite_member_alone():
    """A batch through ``functional.conic`` (Clarabel, by entries): a member whose ``P`` is
    indefinite fails as nonconvex, and the others keep SCS's answers."""
    cones = {"l": 4}
    A = torch.cat((torch.eye(2), -torch.eye(2))).to(T64)  # -1 ≤ x ≤ 1
    b = torch.ones(4, dtype=T64)
    P = torch.tensor([[[2.0, 0.5], [0.5, 1.0]], [[1.0, 0.0], [0.0, -1.0]],
                      [[1.0, 0.2], [0.2, 3.0]]], dtype=T64)
    c = torch.tensor([[1.0, -1.0], [0.5, 0.5], [-2.0, 1.0]], dtype=T64)
    with pytest.raises(NonconvexError, match="batch member 1: nonconvex"):
        tdo.functional.conic(A, b, c, cones, P=P, solver="clarabel")
    ok = [0, 2]
    x = tdo.functional.conic(A, b, c[ok], cones, P=P[ok], solver="clarabel")
    want = tdo.functional.conic(A, b, c[ok], cones, P=P[ok], solver="scs")
    torch.testing.assert_close(x, want, atol=1e-9, rtol=0)


# ---------------------------------------------------------------- wiring

def test_model_with_clarabel():
    """README's SOC example (∂x*/∂p = (-√2, -1, 1)) with tdo.conic_diff_model("clarabel")."""
    m = tdo.conic_diff_model("clarabel")
    v, p = m.variable(3), m.parameter(np.zeros(3))
    m.constraint(v[0] == 1)
    m.constraint(v[2] >= 1 / math.sqrt(2))
    m.constraint(tdo.SOC(v[0] + p[0], v[1:] + p[1:]))
    m.minimize(v[1])
    m.optimize()
    m.set_reverse_variable(v, [0.0, 1.0, 0.0])
    m.reverse_differentiate()
    np.testing.assert_allclose(m.get_reverse_parameter(p), [-math.sqrt(2), -1, 1], atol=1e-10)


def test_clarabel_takes_lps_to_the_conic_backend():
    """The README's tutorial LP: x = (3p - 5)/q = 3.5, ∂x/∂p = 1.5, ∂x/∂q = -1.75."""
    m = tdo.Model(solver="clarabel")
    x, y = m.variable(), m.variable()
    p, q = m.parameter(4.0), m.parameter(2.0)
    cons = m.constraint(q * x + y >= 3 * p)
    m.constraint(y <= 5)
    m.minimize(2 * x - y)
    assert isinstance(pipeline_for(m), ConicPipeline)
    m.optimize()
    assert abs(m.value(x) - 3.5) < 1e-10 and abs(m.dual(cons) - 1.0) < 1e-10
    m.set_forward_parameter(p, 1.0)
    m.forward_differentiate()
    assert abs(m.get_forward_variable(x) - 1.5) < 1e-10
    m.empty_input_sensitivities()
    m.set_reverse_variable(x, 1.0)
    m.reverse_differentiate()
    assert abs(m.get_reverse_parameter(q) + 1.75) < 1e-10


def test_layer_with_clarabel_matches_scs():
    rng = np.random.default_rng(0)
    n = 4
    G = rng.normal(size=(6, n))
    m = tdo.Model()
    x, c, h = m.variable(n), m.parameter(np.zeros(n)), m.parameter(np.ones(6))
    ball = m.constraint(tdo.norm2(x) <= 1.5)
    m.constraint(G @ x <= h)
    m.minimize(0.5 * tdo.sum_squares(x) + c @ x)
    c_t = torch.tensor(rng.normal(size=(3, n)), dtype=T64, requires_grad=True)
    h_t = torch.ones(6, dtype=T64, requires_grad=True)
    results = []
    for solver in ("clarabel", "scs"):
        outs = tdo.Layer(m, [c, h], [x, ball, m.objective], solver=solver)(c_t, h_t)
        loss = outs[0].square().sum() + outs[1].sum() + outs[2].sum()
        results.append([o.detach() for o in outs] + list(torch.autograd.grad(loss, (c_t, h_t))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="Clarabel.*SCS.*interior point"):
        tdo.Layer(m, [c, h], x, solver="daqp")  # a QP solver: not one of the conic backend's
    q = tdo.quadratic_diff_model()
    z = q.variable(2)
    q.minimize(tdo.sum_squares(z - 1))
    with pytest.raises(ValueError, match="conic backend"):
        tdo.Layer(q, [], z, solver="clarabel")


def test_functional_conic_with_clarabel():
    """test_conic.test_psd_2x2_off_diagonal_constant (t* = |1 + θ|, dt/dθ = 1), then
    gradcheck of forward and reverse mode on a random program."""
    theta = torch.tensor(0.0, dtype=T64, requires_grad=True)
    I2 = torch.eye(2, dtype=T64)
    t = tdo.functional.conic(-C.svec(I2).reshape(3, 1), C.svec((1 + theta) * (1 - I2)),
                             torch.ones(1, dtype=T64), {"s": [2]}, solver="clarabel")
    assert abs(t.item() - 1) < 1e-12
    (dt,) = torch.autograd.grad(t.sum(), theta)
    assert abs(dt.item() - 1) < 1e-10
    cones = {"l": 2, "q": [3], "ed": 1}
    pr = random_program(np.random.default_rng(2), cones)
    inputs = tuple(torch.tensor(pr[k], dtype=T64, requires_grad=True) for k in "Abc")
    f = lambda A, b, c: tdo.functional.conic(A, b, c, cones, return_duals=True,  # noqa: E731
                                             solver="clarabel")
    assert torch.autograd.gradcheck(f, inputs, check_forward_ad=True)


def test_auto_is_clarabel_and_scs_where_clarabel_is_missing(monkeypatch):
    import torchdiffopt.solvers as solvers
    assert solvers.conic_solver("auto") is solvers.solve_clarabel_conic
    assert solvers.conic_solver(None) is solvers.solve_clarabel_conic
    monkeypatch.setattr(solvers, "find_spec", lambda name: None)
    assert solvers.conic_solver("auto") is solvers.solve_scs_conic
    assert solvers.conic_solver("scs") is solvers.solve_scs_conic
