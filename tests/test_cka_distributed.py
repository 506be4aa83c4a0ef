"""Two gloo processes, each seeing a different (unequal) shard of the tokens: after all_reduce every rank
holds the single-process result, to float64 precision."""
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import rank_env
from sdft_kernels import LinearCKA, MinibatchCKA

SPLIT = 70  # rank 0 gets tokens [0, 70), rank 1 [70, 200)


def _data():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(200, d, generator=g, dtype=torch.float64) * 3 + 500 for d in (9, 6)]
    ys = [torch.tanh(xs[0] @ torch.randn(9, e, generator=g, dtype=torch.float64) / 30) + 0.1 * torch.randn(
        200, e, generator=g, dtype=torch.float64) for e in (5, 9)]
    return xs, ys


def _estimators():
    return [LinearCKA("all"), LinearCKA("all", debiased=True), MinibatchCKA()]


def _feed(ests, xs, ys, lo, hi):
    for est in ests:
        for b0 in range(lo, hi, 40):  # minibatches of <= 40 tokens, the same on both sides
            b1 = min(b0 + 40, hi)
            est.update([x[b0:b1] for x in xs], [y[b0:b1] for y in ys])


def _worker(rank, world, port, out_dir):
    os.environ.update(rank_env(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        xs, ys = _data()
        ests = _estimators()
        lo, hi = (0, SPLIT) if rank == 0 else (SPLIT, 200)
        _feed(ests, xs, ys, lo, hi)
        lonely = LinearCKA("all", debiased=True)  # only rank 0 sees tokens: an empty rank must not matter
        if rank == 0:
            _feed([lonely], xs, ys, 0, 200)
        ests.append(lonely)
        res = [e.all_reduce().compute().reshape(-1).numpy() for e in ests]
        res.append(np.array([ests[0].tokens, ests[2].tokens], dtype=np.float64))
        np.save(os.path.join(out_dir, f"rank{rank}.npy"), np.concatenate(res))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_all_reduce_equals_single_process(tmp_path, rendezvous_port):
    mp.spawn(_worker, args=(2, rendezvous_port, str(tmp_path)), nprocs=2, join=True)
    xs, ys = _data()
    ests = _estimators()
    _feed(ests, xs, ys, 0, SPLIT)  # same minibatch boundaries as the two ranks
    _feed(ests, xs, ys, SPLIT, 200)
    lonely = LinearCKA("all", debiased=True)
    _feed([lonely], xs, ys, 0, 200)
    want = np.concatenate([e.compute().reshape(-1).numpy() for e in ests + [lonely]] + [np.array([200.0, 200.0])])
    r0, r1 = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    np.testing.assert_array_equal(r0, r1)  # every rank ends with the same numbers
    np.testing.assert_allclose(r0, want, rtol=0, atol=1e-12)


def test_all_reduce_without_a_process_group_is_a_no_op():
    """One script for both launches: in a plain single-process run all_reduce leaves the state as it was
    (it used to raise 'Default process group has not been initialized')."""
    assert not dist.is_initialized()
    g = torch.Generator().manual_seed(0)
    xs, ys = [torch.randn(40, 6, generator=g)], [torch.randn(40, 5, generator=g)]
    for est in (LinearCKA(pairs="all"), MinibatchCKA()):
        est.update(xs, ys)
        before = est.compute().clone()
        assert est.all_reduce() is est
        assert torch.equal(est.compute(), before)
