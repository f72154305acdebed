"""Measurement harness shared by the workloads: timing, memory and accuracy of the methods.

A *case* is one problem instance of a workload (fixed data, fixed sizes) and the *methods*
that solve it: torchdiffopt with each solver, and each installed peer. Every method maps the
same batch-first leaf tensors (``requires_grad``) to a solution ``x (B, n)``; the loss is
``Σ_b ⟨w_b, x_b⟩`` with a fixed random ``w``, so every batch member contributes
independently and the gradient of a member's leaves depends on that member only.

Per method the harness records

* forward, backward and total time: the median over the timed repetitions, after one
  warm-up call. The methods of a case take turns, one call each per round, so that a change
  in the machine's load falls on all of them, in a new order each round, so that no method
  always follows the same one (what a method leaves behind outlasts even the untimed call
  below: W4 with Clarabel, 51.5 ms after our own other method, 54.5 ms after cvxpylayers
  with Clarabel). A method whose warm-up took under
  :data:`REWARM_BELOW_S` makes one untimed call right before each timed one: a call of a
  few milliseconds timed right after another method's is slowed by what that method left
  behind (measured on W1 n=10 B=32: 2.8 ms alone, 3.3 ms after qpth, 6.6–10 ms after
  cvxpylayers), so without it the order of the turns, not the method, sets the time. A slow method gets fewer repetitions (down to
  one) so that they fit in a time budget; the count used is recorded;
* peak memory: the growth of the process's peak resident set (Linux ``VmHWM``) during the
  first timed forward + backward, after ``malloc_trim`` and a reset of the peak through
  ``/proc/self/clear_refs``. It sees torch's, numpy's and the native solvers' allocations;
  ``tracemalloc`` would only see Python's and numpy's. ``None`` where /proc is unavailable;
* accuracy against a KKT-certified reference (torchdiffopt with SCS, HiGHS where SCS fails,
  whose points are polished by a Newton step on the KKT system and certified by their KKT
  residual; see :func:`workloads.common.certified_reference`): the relative
  solution error per member, the directional derivative of the loss against central finite
  differences of the reference on a few random directions (each touching at most two batch
  members, so the differences are cheap), and the gradient difference to each peer.
"""

from __future__ import annotations

import ctypes
import random
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

FD_STEP = 1e-6
#: a method whose warm-up call took less than this makes an untimed call before each
#: timed one (see the module docstring)
REWARM_BELOW_S = 0.5
#: a member whose solution is this far (relative ∞-norm) from the reference is "wrong"
WRONG_SOLUTION = 1e-4
#: a peer's gradients are compared for assertions only on members it solved this accurately
CERTIFIED_SOLUTION = 1e-6


@dataclass
class Method:
    """One way of computing ``x(leaves)``: ``kind`` is ``"ours"`` or ``"peer"``."""

    name: str
    kind: str
    forward: Callable[..., torch.Tensor] | None
    setup_s: float = 0.0
    skip: str = ""          # why this method does not run on this case, if it does not


@dataclass
class Case:
    """One instance of a workload and the methods that solve it.

    ``reference(*leaves)`` solves (any sub-batch of) the instance to KKT accuracy without
    gradients. ``compare_peer_gradients`` is False where gradients are not unique (LP
    vertices), so that differences to peers are reported but not asserted.
    """

    workload: str
    label: str
    params: dict
    leaves: list[torch.Tensor]
    weights: torch.Tensor           # the loss is Σ_b ⟨weights_b, x_b⟩
    methods: list[Method]
    reference: Callable[..., torch.Tensor]
    compare_peer_gradients: bool = True
    fd_count: int = 3
    notes: list[str] = field(default_factory=list)


@dataclass
class Result:
    """What one method did on one case (times in seconds, memory in MiB)."""

    workload: str
    case: str
    params: dict
    method: str
    kind: str
    status: str = "ok"              # "ok", "skipped" or "failed"
    note: str = ""
    setup_s: float = 0.0
    reps: int = 0
    forward_s: float | None = None
    backward_s: float | None = None
    total_s: float | None = None
    peak_mib: float | None = None
    failed_members: int = 0
    solution_error: float | None = None
    wrong_members: int = 0
    fd_error: float | None = None
    peer_gradient_error: dict = field(default_factory=dict)
    certified_peer_gradient_error: dict = field(default_factory=dict)
    time_ratio: dict = field(default_factory=dict)
    # kept in memory for the comparisons, not serialized
    x: torch.Tensor | None = field(default=None, repr=False)
    grads: list | None = field(default=None, repr=False)


# -- memory ---------------------------------------------------------------------------------
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> int | None:
    """Return the resident set now (KiB) after resetting the recorded peak to it."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status_kib("VmRSS")


def peak_growth_mib(start_kib: int | None) -> float | None:
    peak = _status_kib("VmHWM")
    if start_kib is None or peak is None:
        return None
    return max(peak - start_kib, 0) / 1024.0


# -- one method -----------------------------------------------------------------------------
def _loss(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (torch.nan_to_num(x, nan=0.0) * w).sum()


def _call(method: Method, leaves, w):
    start = time.perf_counter()
    x = method.forward(*leaves)
    mid = time.perf_counter()
    grads = torch.autograd.grad(_loss(x, w), leaves, allow_unused=True)
    end = time.perf_counter()
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    return x.detach(), [g.detach() for g in grads], mid - start, end - mid


class _Timing:
    """One method's measurement in progress: its warm-up, then its timed calls."""

    def __init__(self, case: Case, method: Method):
        self.case, self.method = case, method
        self.result = Result(case.workload, case.label, case.params, method.name,
                             method.kind, setup_s=method.setup_s)
        self.fwd: list[float] = []
        self.bwd: list[float] = []
        self.kinds: set[str] = set()
        self.planned = 0

    def call(self, record_memory: bool = False, timed: bool = True) -> bool:
        """One forward + backward, recorded unless ``timed`` is False; False (and the result
        marked) if it raised."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = reset_peak() if record_memory else None
            try:
                x, grads, f, b = _call(self.method, self.case.leaves, self.case.weights)
            except Exception as err:  # noqa: BLE001 - every failure is reported, none fatal
                res = self.result
                if isinstance(err, ValueError) and "unknown solver" in str(err):
                    res.status, res.note = "skipped", f"solver not available: {err}"
                else:
                    res.status, res.note = "failed", f"{type(err).__name__}: {err}"
                return False
            if record_memory:
                self.result.peak_mib = peak_growth_mib(start)
        self.kinds |= {type(c.message).__name__ for c in caught
                       if not issubclass(c.category, (DeprecationWarning, FutureWarning))}
        self.result.x, self.result.grads = x, grads
        if timed:
            self.fwd.append(f)
            self.bwd.append(b)
        return True

    def finish(self) -> Result:
        res = self.result
        if res.status != "ok":
            return res
        fwd, bwd = self.fwd[1:], self.bwd[1:]  # the first call was the warm-up
        if self.kinds:
            res.note = "warnings: " + ", ".join(sorted(self.kinds))
        res.reps = len(fwd)
        res.forward_s = statistics.median(fwd)
        res.backward_s = statistics.median(bwd)
        res.total_s = statistics.median(f + b for f, b in zip(fwd, bwd))
        x = res.x
        res.failed_members = int((~torch.isfinite(x).reshape(x.shape[0], -1).all(-1)).sum())
        return res


def measure(case: Case, reps: int, budget_s: float) -> list[Result]:
    """Time every method of ``case``: one warm-up call each, then rounds in which each
    method still due makes one timed forward + backward call, so that a change in the
    machine's load hits all methods alike. A method makes ``reps`` timed calls, or as many
    as fit in ``budget_s`` judged by its warm-up (at least one)."""
    timings = []
    for method in case.methods:
        timing = _Timing(case, method)
        if method.skip:
            timing.result.status, timing.result.note = "skipped", method.skip
        elif timing.call():
            warm = timing.fwd[0] + timing.bwd[0]
            timing.planned = max(1, min(reps, int(budget_s / max(warm, 1e-9))))
        timings.append(timing)
    order = list(timings)
    for round_ in range(reps):
        # the turns in a new order each round (seeded: the same for every run), so that no
        # method always follows the same one
        random.Random(round_).shuffle(order)
        for t in order:
            if t.result.status == "ok" and round_ < t.planned:
                if t.fwd[0] + t.bwd[0] < REWARM_BELOW_S and not t.call(timed=False):
                    continue
                t.call(record_memory=round_ == 0)
    return [t.finish() for t in timings]


# -- accuracy -------------------------------------------------------------------------------
def member_errors(x: torch.Tensor, x_ref: torch.Tensor) -> torch.Tensor:
    """Relative ∞-norm error per member (inf where ``x`` is not finite)."""
    B = x.shape[0]
    diff = (x - x_ref).reshape(B, -1).abs().amax(-1)
    scale = x_ref.reshape(B, -1).abs().amax(-1).clamp_min(1.0)
    err = diff / scale
    return torch.where(torch.isfinite(err), err, torch.inf)


@dataclass
class Direction:
    members: list[int]
    tangent: list[torch.Tensor]     # one per leaf, rows of ``members`` only
    fd: float                       # central difference of the reference loss


def fd_directions(case: Case, count: int, seed: int) -> list[Direction]:
    """``count`` random directions, each on at most two batch members, with the central
    differences of the reference loss along them."""
    gen = torch.Generator().manual_seed(seed)
    B = case.leaves[0].shape[0]
    out = []
    for _ in range(count):
        k = min(2, B)
        members = torch.randperm(B, generator=gen)[:k].sort().values.tolist()
        tangent = [torch.randn(t[members].shape, generator=gen, dtype=t.dtype)
                   for t in case.leaves]
        base = [t.detach()[members] for t in case.leaves]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plus = case.reference(*(b + FD_STEP * v for b, v in zip(base, tangent)))
            minus = case.reference(*(b - FD_STEP * v for b, v in zip(base, tangent)))
        fd = float(((plus - minus) * case.weights[members]).sum()) / (2 * FD_STEP)
        out.append(Direction(members, tangent, fd))
    return out


def fd_error(grads: list[torch.Tensor], directions: list[Direction],
             solved: torch.Tensor) -> float | None:
    """Largest ``|⟨g, v⟩ - fd| / max(1, |fd|)`` over the directions whose members were all
    ``solved`` (None if there are none)."""
    errors = []
    for d in (d for d in directions if bool(solved[d.members].all())):
        dd = sum(float((g[d.members] * v).sum()) for g, v in zip(grads, d.tangent))
        errors.append(abs(dd - d.fd) / max(1.0, abs(d.fd)))
    return max(errors, default=None)


def gradient_difference(g: list[torch.Tensor], g_ref: list[torch.Tensor],
                        members: torch.Tensor) -> float | None:
    """``max_leaf ‖g - g_ref‖∞ / max(1, ‖g_ref‖∞)`` over the selected members."""
    if not bool(members.any()):
        return None
    worst = 0.0
    for a, b in zip(g, g_ref):
        a, b = a[members], b[members]
        worst = max(worst, float((a - b).abs().max()) / max(1.0, float(b.abs().max())))
    return worst


def evaluate(case: Case, results: list[Result], seed: int) -> None:
    """Fill in the accuracy and time-ratio fields of ``results`` (one per method)."""
    done = [r for r in results if r.status == "ok"]
    if not done:
        return
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x_ref = case.reference(*(t.detach() for t in case.leaves))
    directions = fd_directions(case, case.fd_count, seed)
    errors = {}
    for r in done:
        errors[r.method] = member_errors(r.x, x_ref)
        finite = torch.isfinite(errors[r.method])
        r.solution_error = float(errors[r.method][finite].max()) if finite.any() else None
        r.wrong_members = int((errors[r.method] > WRONG_SOLUTION).sum()) - r.failed_members
        r.fd_error = fd_error(r.grads, directions, finite)
    peers = [r for r in done if r.kind == "peer"]
    for r in done:
        for p in peers:
            if p is r:
                continue
            both = torch.isfinite(errors[r.method]) & torch.isfinite(errors[p.method])
            r.peer_gradient_error[p.method] = gradient_difference(r.grads, p.grads, both)
            certified = both & (errors[p.method] <= CERTIFIED_SOLUTION)
            r.certified_peer_gradient_error[p.method] = gradient_difference(
                r.grads, p.grads, certified)
            if r.total_s and p.total_s:
                r.time_ratio[p.method] = r.total_s / p.total_s
