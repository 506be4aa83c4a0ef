"""Data parallelism: 2 gloo ranks on CPU (spawned by the test, loopback only) must reproduce one process.

One spawn of 2 workers runs every distributed scenario (process start-up dominates the cost); the
parent process computes the single-process references and compares:
  - DDP SDFT steps with uneven rows and valid tokens per rank == one process on the full batch;
  - FSDP2 (fully_shard) steps, resumed from a 1-process checkpoint == the uninterrupted run;
  - a checkpoint written by 2 DDP ranks at step K, resumed on 1 process == the uninterrupted run;
  - LinearCKA / MinibatchCKA all_reduce over 2 shards == one accumulator on all data (float64).
"""
import os
import time

import pytest
import torch
import torch.multiprocessing as mp

from conftest import rank_env
from sdft_kernels import distributed as D

VOCAB, SEQ, ROWS, STEPS, K, LR = 96, 10, 5, 4, 2, 1e-3


def _tiny_llama(seed):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float()


def _batch(step):
    """The global batch of a step: ROWS sequences, each with its own number of valid tokens
    (one row fully ignored), so ranks hold different token counts."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    lengths = torch.tensor([SEQ, 3, 0, 7, 1])[torch.randperm(ROWS, generator=g)]
    mask = torch.arange(SEQ)[None, :] < lengths[:, None]
    return ids, mask


def _kl_sum(student, teacher, ids, mask):
    """Sum over valid tokens of forward KL(teacher || student) with the project's fused kernel
    (reduction="sum": the data-parallel normalisation is done by the caller)."""
    import sdft_kernels
    with torch.no_grad():
        t = teacher(ids).logits
    return sdft_kernels.distill_loss(student(ids).logits, t, divergence="forward_kl", mask=mask, reduction="sum")


def _models():
    student, teacher = _tiny_llama(1), _tiny_llama(2)
    teacher.eval().requires_grad_(False)
    return student, teacher


def _parallel_steps(world, student, teacher, opt, steps):
    """Training as recover.py does it: shard each step's rows, normalise by the global count."""
    losses = []
    for step in steps:
        ids, mask = _batch(step)
        rows = D.shard(ROWS, world)
        ids, mask = ids[rows], mask[rows]
        local_sum = _kl_sum(student, teacher, ids, mask)
        count = D.global_token_count(mask, world)
        loss = D.data_parallel_loss(local_sum, count, world)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(D.global_mean(local_sum, count, world))
    return losses


def _reference_steps(student, teacher, opt, steps):
    """One process, full batch, plain mean over valid tokens: what the ranks must reproduce."""
    losses = []
    for step in steps:
        ids, mask = _batch(step)
        loss = _kl_sum(student, teacher, ids, mask) / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _cka_data(seed, n_batches=4):
    g = torch.Generator().manual_seed(seed)
    xs = [[torch.randn(2, 9, d, generator=g, dtype=torch.float32) * 3 + 1e2 for d in (6, 5)] for _ in range(n_batches)]
    ys = [[torch.randn(2, 9, d, generator=g) + x[0][..., :1] for d in (4, 7)] for x in xs]
    masks = [torch.rand(2, 9, generator=g) > 0.3 for _ in range(n_batches)]
    return xs, ys, masks


def _cka_run(world, batches):
    import sdft_kernels
    xs, ys, masks = _cka_data(7)
    lin, mb = sdft_kernels.LinearCKA(pairs="all"), sdft_kernels.MinibatchCKA()
    for i in batches:
        lin.update(xs[i], ys[i], mask=masks[i])
        mb.update([x.reshape(-1, x.shape[-1]) for x in xs[i]], [y.reshape(-1, y.shape[-1]) for y in ys[i]])
    if world is not None:
        lin.all_reduce()
        mb.all_reduce()
    return lin.compute(), mb.compute(), lin.tokens


class _AlwaysEqual:
    """A cache key that matches any key."""

    def __eq__(self, other):
        return True

    def __ne__(self, other):
        return False


def _worker(rank, world_size, port, tmp, run_cka):
    import faulthandler
    faulthandler.enable(all_threads=True)  # a rank that aborts in C++ still prints where it was
    torch.set_num_threads(1)  # two ranks on a 2-core machine: one thread each
    os.environ.update(rank_env(port, RANK=rank, WORLD_SIZE=world_size, LOCAL_RANK=rank))
    world = D.init_world("gloo", timeout_s=90)
    _work(rank, world, tmp, run_cka)
    D.destroy_world(world)  # after _work returned: its FSDP modules must be gone first (see there)


def _work(rank, world, tmp, run_cka):
    assert (world.rank, world.world_size, world.is_distributed, world.is_main) == (rank, 2, True, rank == 0)
    out = {}

    # DDP from scratch; a checkpoint at step K on the way (does not change the run).
    student, teacher = _models()
    model = D.wrap_student(student, world, "ddp")
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    out["ddp_losses"] = _parallel_steps(world, model, teacher, opt, range(K))
    D.save_checkpoint(tmp / "ckpt_2ranks.pt", world, model, opt, extra={"step": K})
    out["ddp_losses"] += _parallel_steps(world, model, teacher, opt, range(K, STEPS))
    out["ddp_state"] = {k: v.clone() for k, v in D.unwrap(model).state_dict().items()}

    # FSDP2 resumed from the 1-process checkpoint written by the parent at step K.
    student, teacher = _models()
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(0.5)  # a different start: the checkpoint must overwrite everything
    model = D.wrap_student(student, world, "fsdp")
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    extra = D.load_checkpoint(tmp / "ckpt_1rank.pt", world, model, opt)
    out["fsdp_losses"] = _parallel_steps(world, model, teacher, opt, range(extra["step"], STEPS))
    out["fsdp_state"], _ = D.full_state(model, world)

    # FSDP + a fake-quantised student, run bare (as the CKA trajectory does) before and after
    # training: the no-grad forward must see the trained weights, not a cache of the first gather.
    from sdft_kernels.degrade.quantize import quantize_rtn
    student, teacher = quantize_rtn(_tiny_llama(1), bits=4, group_size=16)[0], _models()[1]
    model = D.wrap_student(student, world, "fsdp")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = _batch(99)[0]
    for steps in (range(0), range(2)):
        _parallel_steps(world, model, teacher, opt, steps)
        for m in student.modules():  # FSDP refilling a buffer at the same address, version unchanged,
            if getattr(m, "_cache", None) is not None:  # is what makes QuantLinear's cache key match:
                m._cache = (_AlwaysEqual(), m._cache[1])  # force that case, the allocator rarely does
        student.eval()
        with torch.no_grad(), D.gathered_root(model):
            out["q_gathered"] = student(ids).logits
        student.train()
    fresh = quantize_rtn(_tiny_llama(1), bits=4, group_size=16)[0] if world.is_main else None
    fresh = D.unshard_into(model, fresh, world)
    if fresh is not None:
        with torch.no_grad():
            out["q_plain"] = fresh.eval()(ids).logits

    if run_cka:
        lin, mb, tokens = _cka_run(world, D.shard(4, world, mode="strided"))
        out.update(lin=lin, mb=mb, tokens=tokens)
    torch.save(out, tmp / f"rank{rank}.pt")


def _run_ranks(tmp, port, run_cka, timeout=150):
    # spawn, not fork: a CUDA build of torch refuses autograd in a child forked from a process that
    # has run backward (every earlier test here), and this fixture runs backward itself.
    ctx = mp.start_processes(_worker, args=(2, port, tmp, run_cka), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed workers did not finish in {timeout} s")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _assert_states_close(got, want, what, atol=2e-6, rtol=1e-5):
    assert got.keys() == want.keys(), f"{what}: keys differ"
    for k in want:
        diff = (got[k].float() - want[k].float()).abs().max().item()
        assert torch.allclose(got[k].float(), want[k].float(), atol=atol, rtol=rtol), f"{what}: {k} differs by {diff:.3g}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, rendezvous_port):
    tmp = tmp_path_factory.mktemp("dist")
    import sdft_kernels
    run_cka = hasattr(sdft_kernels, "LinearCKA") and hasattr(sdft_kernels, "MinibatchCKA")
    world = D.single_process_world("cpu")
    student, teacher = _models()
    opt = torch.optim.AdamW(student.parameters(), lr=LR)
    ref_losses = _reference_steps(student, teacher, opt, range(K))
    D.save_checkpoint(tmp / "ckpt_1rank.pt", world, student, opt, extra={"step": K})
    ref_losses += _reference_steps(student, teacher, opt, range(K, STEPS))
    ref_state = {k: v.clone() for k, v in student.state_dict().items()}
    ranks = _run_ranks(tmp, rendezvous_port, run_cka)
    return {"tmp": tmp, "ref_losses": ref_losses, "ref_state": ref_state, "ranks": ranks, "run_cka": run_cka}


def test_ddp_steps_equal_one_process_on_full_batch(runs):
    r0, r1 = runs["ranks"]
    assert r0["ddp_losses"] == r1["ddp_losses"]
    torch.testing.assert_close(torch.tensor(r0["ddp_losses"]), torch.tensor(runs["ref_losses"]), rtol=1e-5, atol=1e-6)
    _assert_states_close(r0["ddp_state"], runs["ref_state"], "ddp rank 0 vs one process")
    _assert_states_close(r1["ddp_state"], r0["ddp_state"], "ddp rank 1 vs rank 0", atol=0, rtol=0)
    # the run really trained: parameters moved away from the initial student
    start = _models()[0].state_dict()
    assert any((start[k] - runs["ref_state"][k]).abs().max() > 1e-4 for k in start)


def test_checkpoint_from_two_ranks_resumes_on_one(runs):
    world = D.single_process_world("cpu")
    student, teacher = _models()
    torch.nn.init.zeros_(student.lm_head.weight)  # a different start: loading must overwrite it
    opt = torch.optim.AdamW(student.parameters(), lr=LR)
    extra = D.load_checkpoint(runs["tmp"] / "ckpt_2ranks.pt", world, student, opt)
    assert extra == {"step": K}
    losses = _reference_steps(student, teacher, opt, range(K, STEPS))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(runs["ref_losses"][K:]), rtol=1e-5, atol=1e-6)
    _assert_states_close(student.state_dict(), runs["ref_state"], "2-rank checkpoint resumed on 1 process")


def test_fsdp_resume_from_one_process_checkpoint_on_two_ranks(runs):
    r0, r1 = runs["ranks"]
    assert r0["fsdp_losses"] == r1["fsdp_losses"]
    torch.testing.assert_close(torch.tensor(r0["fsdp_losses"]), torch.tensor(runs["ref_losses"][K:]), rtol=1e-5, atol=1e-6)
    _assert_states_close(r0["fsdp_state"], runs["ref_state"], "fsdp (resumed on 2 ranks) vs one process")


def test_fsdp_bare_student_sees_trained_quantized_weights(runs):
    r0 = runs["ranks"][0]
    torch.testing.assert_close(r0["q_gathered"], r0["q_plain"], rtol=1e-5, atol=1e-5)


def test_cka_all_reduce_equals_one_process(runs):
    if not runs["run_cka"]:
        pytest.skip("sdft_kernels.LinearCKA / MinibatchCKA not in this build yet")
    lin, mb, tokens = _cka_run(None, range(4))
    for r in runs["ranks"]:
        assert r["tokens"] == tokens
        torch.testing.assert_close(r["lin"], lin, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r["mb"], mb, rtol=1e-12, atol=1e-12)


def test_shard_covers_every_item_once():
    for n in (0, 1, 5, 7, 64):
        for ws in (1, 2, 3, 8):
            for mode in D.SHARD_MODES:
                parts = [D.shard(n, D.World(r, ws, r, torch.device("cpu"), ws > 1, r == 0), mode=mode)
                         for r in range(ws)]
                assert sorted(i for p in parts for i in p) == list(range(n))
                assert max(map(len, parts)) - min(map(len, parts)) <= 1
                if mode == "contiguous":
                    assert [i for p in parts for i in p] == list(range(n))


def test_checkpoint_extra_that_cannot_be_read_back_is_refused(tmp_path):
    # load_checkpoint reads weights_only: a NumPy scalar in extra saved fine and could never be resumed
    import numpy as np
    world = D.single_process_world("cpu")
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="extra: "):
        D.save_checkpoint(tmp_path / "c.pt", world, model, extra={"step": np.int64(3)})
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp file left behind
    D.save_checkpoint(tmp_path / "c.pt", world, model, extra={"step": 3})
    assert D.load_checkpoint(tmp_path / "c.pt", world, model) == {"step": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_single_process_world_and_bad_input(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    world = D.init_world(device="cpu")
    assert (world.rank, world.world_size, world.is_distributed, world.is_main) == (0, 1, False, True)
    t = torch.arange(3.0)
    assert D.all_reduce_sum_(t, world) is t and t.tolist() == [0.0, 1.0, 2.0]
    assert int(D.global_token_count(torch.tensor([[True, False, True]]), world)) == 2
    m = torch.nn.Linear(2, 2)
    assert D.wrap_student(m, world, "ddp") is m
    zero = D.data_parallel_loss(torch.tensor(0.0, requires_grad=True), 0, world)
    assert float(zero.detach()) == 0.0  # everything ignored: zero, not NaN
    with pytest.raises(ValueError, match="strategy"):
        D.wrap_student(m, world, "zero3")
    with pytest.raises(ValueError, match="n_items"):
        D.shard(-1, world)
    with pytest.raises(ValueError, match="local_count"):
        D.global_token_count(-3, world)
    with pytest.raises(ValueError, match="reduction='sum'"):
        D.data_parallel_loss(torch.ones(2), 4, world)  # a per-token vector, not a sum
    with pytest.raises(ValueError, match="backend"):
        D.init_world("mpi")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        D.init_world("gloo")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        D.init_world("gloo")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "5")  # was silently a single-process world
    with pytest.raises(ValueError, match="RANK=5 but WORLD_SIZE=1"):
        D.init_world("gloo")
    with pytest.raises(ValueError, match="is_main"):
        D.World(rank=1, world_size=2, is_distributed=True, is_main=True)
    with pytest.raises(ValueError, match="strategy='none'"):
        D.wrap_student(m, D.World(0, 2, 0, torch.device("cpu"), True, True), "none")
