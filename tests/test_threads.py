"""Threads: linalg.threads (one torch or BLAS thread for small problems, restored after;
work in torch's OpenMP team) and solvers.batch.map_in_threads (solver threads: torch's
OpenMP team, or the process's kept pools)."""

import threading

import numpy as np
import pytest
import torch

import torchdiffopt as tdo
from torchdiffopt.linalg.threads import SERIAL_MAX_ENTRIES, serial_if_small

CPU = torch.device("cpu")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_small_problems_run_in_one_thread_and_the_count_comes_back(two_threads):
    with serial_if_small(1, 20, CPU):
        assert torch.get_num_threads() == 1
        with serial_if_small(4, 20, CPU):  # nested: still one, and not restored early
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError):
        with serial_if_small(1, 20, CPU):
            raise RuntimeError("inside")
    assert torch.get_num_threads() == 2


def test_large_problems_and_other_devices_keep_their_threads(two_threads):
    order = int(SERIAL_MAX_ENTRIES ** 0.5) + 1
    with serial_if_small(1, order, CPU):
        assert torch.get_num_threads() == 2
    with serial_if_small(1, 20, torch.device("cuda")):  # (the device is only inspected)
        assert torch.get_num_threads() == 2


def test_concurrent_callers_each_get_their_own_count_back(two_threads):
    """Each thread saves and restores its own count, whichever leaves first."""
    inside, first_left = threading.Barrier(2), threading.Event()
    seen = {}

    def worker(name, leave_first):
        torch.set_num_threads(2)
        with serial_if_small(1, 20, CPU):
            seen[name, "inside"] = torch.get_num_threads()
            inside.wait()
            if not leave_first:
                first_left.wait()
        if leave_first:
            first_left.set()
        seen[name, "after"] = torch.get_num_threads()

    workers = [threading.Thread(target=worker, args=(name, name == "a")) for name in "ab"]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert seen == {("a", "inside"): 1, ("b", "inside"): 1, ("a", "after"): 2,
                    ("b", "after"): 2}
    assert torch.get_num_threads() == 2


def test_a_layer_call_leaves_the_thread_count_as_it_was(two_threads):
    Q = torch.eye(3, dtype=torch.float64)
    p = torch.ones(3, dtype=torch.float64, requires_grad=True)
    G, h = -torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    x = tdo.functional.qp(Q, p, G=G, h=h)
    x.sum().backward()
    assert torch.get_num_threads() == 2
    assert torch.allclose(x, torch.zeros(3, dtype=torch.float64))  # x = max(-p, 0) = 0


def test_numpy_blas_runs_in_one_thread_inside_and_its_counts_come_back():
    from threadpoolctl import threadpool_info, threadpool_limits

    from torchdiffopt.linalg.threads import serial_numpy_blas

    def blas_counts():
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    with threadpool_limits(2, user_api="blas"):  # (more than one to begin with)
        before = blas_counts()
        assert max(before) == 2
        with serial_numpy_blas():
            assert all(count == 1 for count in blas_counts())
        assert blas_counts() == before
        with pytest.raises(RuntimeError):
            with serial_numpy_blas():
                raise RuntimeError("inside")
        assert blas_counts() == before


def test_pipeline_operations_run_small_systems_with_one_blas_thread(monkeypatch):
    """The sensitivity API's and the nonlinear layer's numpy work (a pipeline's solve,
    forward and reverse) runs with numpy's BLAS in one thread for small systems, and with
    its threads above order 256."""
    from threadpoolctl import threadpool_info, threadpool_limits

    import torchdiffopt as tdo
    from torchdiffopt.backends import nonlinear

    def blas_counts():
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    seen = []
    original = nonlinear.NonlinearKKT.__init__

    def recording(self, *args, **kwargs):
        seen.append(max(blas_counts()))
        original(self, *args, **kwargs)
    monkeypatch.setattr(nonlinear.NonlinearKKT, "__init__", recording)
    with threadpool_limits(2, user_api="blas"):
        for n in (3, 300):
            m = tdo.nonlinear_diff_model()
            x = m.variable(n, name="x")
            r = m.parameter(np.ones(n), name="r")
            m.minimize(tdo.sum(tdo.exp(x)) + tdo.sum_squares(x - r))
            m.optimize()
        assert max(blas_counts()) == 2
    assert seen == [1, 2]


def test_the_conic_pipeline_counts_the_cone_program_order():
    """The residual map's order counts the cone rows and epigraph variables, not the
    model's: ten variables and one norm of 600 rows is a system of order 612, which keeps
    numpy's threads."""
    from torchdiffopt.pipelines import pipeline_for

    m = tdo.conic_diff_model()
    x = m.variable(10)
    t = m.parameter(1.0)
    A = np.random.default_rng(0).normal(size=(600, 10))
    m.minimize(tdo.norm2(A @ x - np.ones(600)) + t * x.sum())
    assert pipeline_for(m).order == 10 + 1 + 601
    q = tdo.quadratic_diff_model()
    y = q.variable(3, lb=0.0)
    q.constraint(y.sum() <= 2)
    q.minimize(tdo.sum_squares(y - 1))
    assert pipeline_for(q).order == 3 + 1 + 3  # variables, the row, the three lower bounds


def _run_with_deadline(target, seconds=60):
    """``target()``'s result, or a test failure if it has not returned within ``seconds``
    (a deadlock fails the test instead of hanging the suite)."""
    out = {}

    def run():
        try:
            out["value"] = target()
        except BaseException as err:  # noqa: BLE001 - handed to the test below
            out["error"] = err
    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    runner.join(seconds)
    assert not runner.is_alive(), f"no answer within {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.fixture(params=["openmp", "pool"])
def thread_kind(request, monkeypatch):
    """map_in_threads through torch's OpenMP team (where this torch's runtime is GNU
    OpenMP) or through the fallback thread pool."""
    from torchdiffopt.linalg import threads
    from torchdiffopt.solvers import batch
    if request.param == "openmp" and threads._gnu_openmp() is None:
        pytest.skip("torch's OpenMP runtime is not GNU OpenMP here")
    if request.param == "pool":
        monkeypatch.setattr(batch, "run_in_openmp_threads", lambda work, threads: False)
    return request.param


def test_map_in_threads_keeps_the_order_of_the_items_and_uses_the_threads(thread_kind):
    from torchdiffopt.solvers import batch
    seen = set()

    def square(k):
        seen.add(threading.get_native_id())
        return k * k
    items = list(range(40))
    assert batch.map_in_threads(square, items, 2) == [k * k for k in items]
    assert 1 <= len(seen) <= 2  # (the caller and one other thread at most)
    assert batch.map_in_threads(square, [2, 3, 4], 5) == [4, 9, 16]
    # one item or one worker: in the calling thread
    assert batch.map_in_threads(lambda k: threading.get_native_id(), [0], 2) == \
        [threading.get_native_id()]
    assert batch.map_in_threads(lambda k: threading.get_native_id(), [0, 1], 1) == \
        [threading.get_native_id()] * 2


def test_map_in_threads_keeps_its_pool(thread_kind):
    from torchdiffopt.solvers import batch
    if thread_kind != "pool":
        pytest.skip("the OpenMP team is torch's")
    names = set()

    def square(k):
        names.add(threading.current_thread().name)
        return k * k
    items = list(range(40))
    assert batch.map_in_threads(square, items, 2) == [k * k for k in items]
    pool = batch._pools[1]  # two workers: the caller and one pool thread
    assert batch.map_in_threads(square, items, 2) == [k * k for k in items]
    assert batch._pools[1] is pool  # the second call reused the first call's threads
    # fewer items than workers: the pool of the workers asked for, not one per batch size
    assert batch.map_in_threads(square, items, 5) == [k * k for k in items]
    sizes = set(batch._pools)
    assert batch.map_in_threads(square, [2, 3, 4], 5) == [4, 9, 16]
    assert set(batch._pools) == sizes
    caller = threading.current_thread().name
    assert names - {caller} and all(name.startswith("torchdiffopt") for name in names - {caller})


def test_map_in_threads_gives_the_items_to_the_threads_as_they_come_free(thread_kind):
    """A thread held up on its first item takes no other: the rest run in the other
    thread (items are taken one at a time, not split in fixed shares)."""
    import time

    from torchdiffopt.solvers.batch import map_in_threads
    seen = {}

    def work(k):
        if k == 0:
            time.sleep(0.5)
        seen[k] = threading.get_native_id()
        return k
    assert map_in_threads(work, list(range(9)), 2) == list(range(9))
    assert len(set(seen.values())) == 2
    assert all(seen[k] != seen[0] for k in range(1, 9))


def test_map_in_threads_runs_a_call_from_inside_an_item_serially(thread_kind):
    """An item's inner call runs in the item's thread, where queued on the busy threads it
    would wait forever."""
    import time

    from torchdiffopt.solvers.batch import map_in_threads
    inner_threads = []

    def outer(k):
        time.sleep(0.05)  # long enough for the second thread to take an item
        inner_threads.append({threading.get_native_id() for _ in map_in_threads(
            lambda j: threading.get_native_id(), [0, 1, 2], 2)})
        return sum(map_in_threads(lambda j: j + k, [0, 1, 2], 2))
    assert _run_with_deadline(lambda: map_in_threads(outer, [0, 10, 20], 2)) == [3, 33, 63]
    assert len(inner_threads) == 3 and all(len(seen) == 1 for seen in inner_threads)


def test_map_in_threads_raises_what_the_function_raised(thread_kind):
    from torchdiffopt.solvers.batch import map_in_threads

    def fails_on_three(k):
        if k == 3:
            raise ValueError("member 3")
        return k
    with pytest.raises(ValueError, match="member 3"):
        map_in_threads(fails_on_three, list(range(6)), 2)
    assert map_in_threads(lambda k: -k, [1, 2], 2) == [-1, -2]  # still usable


def test_torch_runs_in_its_openmp_team_after_the_solves(two_threads):
    """Solves in torch's OpenMP team leave it as torch needs it: parallel torch operations
    in the same process give the same results after as before."""
    from torchdiffopt.linalg import threads
    from torchdiffopt.solvers.batch import map_in_threads
    if threads._gnu_openmp() is None:
        pytest.skip("torch's OpenMP runtime is not GNU OpenMP here")
    K = torch.randn(64, 80, 80, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for torch_threads in (2, 1, 2):  # (a team of two asked for while torch runs one)
        torch.set_num_threads(torch_threads)
        # the reference at this thread count: BLAS may split a product's sums by thread count
        before = torch.linalg.solve(K, K[..., :1]), (K @ K).sum()
        seen = set()

        def norm(k):
            seen.add(threading.get_native_id())
            return float(np.linalg.norm(np.ones(k)))
        assert map_in_threads(norm, [1, 4, 9, 16], 2) == [1.0, 2.0, 3.0, 4.0]
        assert 1 <= len(seen) <= 2
        after = torch.linalg.solve(K, K[..., :1]), (K @ K).sum()
        assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_forked_child_makes_its_own_pool():
    """A child forked after the parent's pool started has none of its threads: its first
    call must make a new pool, not queue on the parent's copied one and wait forever."""
    import multiprocessing
    import time

    from torchdiffopt.solvers.batch import map_in_threads
    for _ in range(3):  # the parent's pool, started, and its two threads both idle after
        map_in_threads(lambda k: time.sleep(0.005), list(range(8)), 2)
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as children:
        result = children.apply_async(_squares_in_threads, ([1, 2, 3],))
        assert result.get(timeout=60) == [1, 4, 9]


def _squares_in_threads(items):
    from torchdiffopt.solvers.batch import map_in_threads
    return map_in_threads(lambda k: k * k, items, 2)
