"""One thread for the linear algebra of small problems: :func:`serial_if_small` (torch's)
and :func:`serial_numpy_blas` (numpy's and scipy's); and :func:`take_last`, an indexing
that stays in the calling thread.

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
"""

from __future__ import annotations

import contextlib
import functools
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
