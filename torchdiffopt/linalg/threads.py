"""Torch's threads and the package's work: one thread for the linear algebra of small
problems (:func:`serial_if_small`, torch's; :func:`serial_numpy_blas`, numpy's and
scipy's), an indexing that stays in the calling thread (:func:`take_last`), and native
solvers run in torch's own OpenMP threads (:func:`run_in_openmp_threads`).

Torch's CPU LAPACK (MKL) threads every call. On the matrices of a small batch of small
problems a second thread saves nothing, and where another process keeps a core busy (a
data loader's workers, a second job, a peer's lingering thread pool) MKL's threads wait
for that core: on two cores with another process running, a Cholesky factorization of
order 50 took 0.85 ms with torch's default two threads against 0.02 ms with one, and a
batch of 64 of them 7.6 against 0.8 ms. On idle cores the two are level at these sizes
(W1 at batch 1, n = 10 to 100, and at batch 128, n = 10: within 2%), while larger batches
gain from the threads (W1 n = 50 at batch 32: 14%), hence the size limit.

``torch.set_num_threads`` sets the calling thread's OpenMP thread count and MKL's
process-wide one, so each thread saves and restores its own (nested calls restore once, at
the outermost); a concurrent caller may see MKL's count back at its old value before it
leaves, which costs time, never results. Torch offers no per-call or per-thread LAPACK
thread count (threadpoolctl cannot see the MKL linked into torch), hence this module.

numpy and scipy bring their own BLAS (OpenBLAS), with its own threads, which meet torch's
OpenMP threads on the same cores: right after a torch operation in two threads, whose
workers go on spinning for a while, triangular solves of order 10 to 200 in scipy took
8 ms with OpenBLAS's two threads against 0.02–0.6 ms in one. Code that runs small numpy
linear algebra between torch operations does it under :func:`serial_numpy_blas`
(threadpoolctl, which does see OpenBLAS): the single-problem QP path, and the pipelines'
solves and derivatives (the sensitivity API, the nonlinear layer). OpenBLAS's thread count is process-wide: a
concurrent caller may find it at one, or restored early, which costs time, never results.

Torch's advanced indexing ``t[..., index]`` opens an OpenMP parallel region from 3,000
output entries on (its index kernel's own grain, a tenth of torch's usual one): on a
``(64, 50)`` tensor with 400 indices it took 22 µs, and the region leaves torch's worker
thread spinning for about 7.5 ms after (libgomp's default wait), on a core that native
solver threads started next then share with it. W4's conic layer gathered its data that
way right before its 64 Clarabel solves in two threads. :func:`take_last` gathers with
``gather``, which stays serial up to 32,768 entries: 10 µs for the same call, and no
spin. (``index_select`` also stays serial, but took 45 µs.)

That spin also meets the package's own solver threads: after any parallel torch operation
(a network's layer, the last backward pass) torch's OpenMP worker holds a core for about
7.5 ms, which two solver threads on two cores then share with it; W4's second solver
thread lost 3–6 ms of its 64 Clarabel solves so. :func:`run_in_openmp_threads` runs such
work in the OpenMP team itself: the worker that would spin solves instead, and is still
spinning, at hand, for the parallel operations that follow (W4's solves 15.7 → 12.9 ms,
forward + backward 28.1 → 25.3 ms, in an A/B in one process). It calls ``GOMP_parallel``,
the entry point that ``#pragma omp parallel`` compiles to in GNU OpenMP (``libgomp``, which
torch's Linux wheels carry), through ctypes: neither torch nor threadpoolctl runs Python
work in torch's intra-op threads (they only size them). Where torch's runtime is another
(or in a forked child, whose copy of the runtime has no threads) it does nothing, and
callers use a thread pool.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading

import torch
from threadpoolctl import ThreadpoolController

#: largest ``batch · order²`` (members times the square of their KKT order) run in one
#: thread: W1 at batch 1 up to n = 100 (order 200), and at n = 10 up to batch 163
SERIAL_MAX_ENTRIES = 1 << 16

_state = threading.local()  # per thread: nesting depth and the count to restore


@contextlib.contextmanager
def serial_if_small(batch: int, order: int, device: torch.device):
    """Run the block with one torch (and MKL) thread when ``batch`` problems of KKT order
    ``order`` on the CPU are small (``batch · order² ≤`` :data:`SERIAL_MAX_ENTRIES`) and
    torch has more than one; see the module docstring."""
    if device.type != "cpu" or batch * order * order > SERIAL_MAX_ENTRIES:
        yield
        return
    depth = getattr(_state, "depth", 0)
    if depth == 0:
        _state.saved = torch.get_num_threads()
        if _state.saved > 1:
            torch.set_num_threads(1)
    _state.depth = depth + 1
    try:
        yield
    finally:
        _state.depth -= 1
        if _state.depth == 0 and _state.saved > 1:
            torch.set_num_threads(_state.saved)


_OPENMP_BODY = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


@functools.cache
def _gnu_openmp():
    """Torch's GNU OpenMP runtime as a ctypes library, or None: where ATen's parallel
    backend is OpenMP and the process has exactly one OpenMP runtime mapped, a ``libgomp``
    (Linux; with LLVM's or Intel's runtime also there, torch's may be that one)."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as maps:
            names = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return None
    runtimes = {path for path in names if os.path.basename(path).startswith(
        ("libgomp", "libomp", "libiomp"))}
    paths = {path for path in runtimes if os.path.basename(path).startswith("libgomp")}
    if len(paths) != 1 or len(runtimes) != 1:
        return None
    lib = ctypes.CDLL(paths.pop())
    lib.GOMP_parallel.argtypes = [_OPENMP_BODY, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    lib.GOMP_parallel.restype = None
    return lib


_forked = False


def _after_fork_in_child() -> None:
    global _forked
    _forked = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def run_in_openmp_threads(work, threads: int) -> bool:
    """Call ``work()`` once in each of ``threads`` threads of torch's OpenMP team (the
    calling thread is one of them) and return True, or return False without calling it
    where that team cannot be reached (see the module docstring). ``work`` takes its share
    of the job itself (from a shared queue, say); the first exception it raises in any
    thread is raised here, once every thread has returned. In a thread that is already in
    an OpenMP region the team is that thread alone (nested regions get one thread)."""
    lib = None if _forked else _gnu_openmp()
    if lib is None:
        return False
    errors = []

    def body(_):
        try:
            work()
        except BaseException as err:  # noqa: BLE001 - raised in the calling thread below
            errors.append(err)

    lib.GOMP_parallel(_OPENMP_BODY(body), None, threads, 0)
    if errors:
        raise errors[0]
    return True


def take_last(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[..., index]`` for a 1-D integer tensor ``index``, by ``gather`` on the index
    expanded over the leading dimensions (see the module docstring); differentiable, and
    under ``torch.func`` transforms, like the indexing."""
    return values.gather(-1, index.expand(*values.shape[:-1], index.shape[-1]))


@functools.cache
def _numpy_blas() -> list:
    """threadpoolctl's controllers of the BLAS libraries loaded by then (numpy's and
    scipy's OpenBLAS), found once: a search costs milliseconds."""
    return ThreadpoolController().select(user_api="blas").lib_controllers


@contextlib.contextmanager
def serial_numpy_blas(order: int = 0):
    """Run the block with numpy's and scipy's BLAS and LAPACK in one thread, restoring their
    thread counts after (see the module docstring), unless the block works on systems of an
    ``order`` above ``√SERIAL_MAX_ENTRIES`` (256), which gain from the threads. (Through
    threadpoolctl's library controllers themselves: its ``limit`` context costs 25–50 µs a
    call, a tenth of a 10-variable QP's forward pass.)"""
    if order * order > SERIAL_MAX_ENTRIES:
        yield
        return
    saved = [(lib, count) for lib in _numpy_blas() if (count := lib.get_num_threads()) > 1]
    for lib, _ in saved:
        lib.set_num_threads(1)
    try:
        yield
    finally:
        for lib, count in saved:
            lib.set_num_threads(count)
