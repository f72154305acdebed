"""The layer inside DistributedDataParallel: 2 processes, gloo backend, CPU."""

import torch
import torch.multiprocessing as mp

import ddp_worker


def test_layer_trains_under_ddp(tmp_path):
    mp.spawn(ddp_worker.train, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    # gradients were all-reduced: both replicas hold the same weights after every step
    torch.testing.assert_close(r0["weights"], r1["weights"])
    for r in (r0, r1):
        assert r["losses"][-1] < 0.5 * r["losses"][0]
