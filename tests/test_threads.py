"""linalg.threads.serial_if_small: one torch thread for small problems, restored after."""

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
