"""Recovery by self-distillation fine-tuning (SDFT): the original model is the frozen teacher, its
degraded copy the student, and the loss is the project's fused linear distillation divergence (the
N x V logits never exist). Full fine-tuning or LoRA (peft). A quantized student keeps its QuantLinear
layers (straight-through fake-quant) and a pruned student its masks / removed blocks, because training
only ever touches the student's own parameters through its own forward.

Checkpoints hold model, optimizer, scheduler, RNG states, step, metrics and the CKA trajectory; the
data order is a pure function of (seed, step), so a resumed run is bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import io as sio
from .align import align, check_layer_map, unwrap, _layers
from .distributed import World, all_reduce_sum_, barrier, init_world, shard, wrap_student
from .distributed import full_state, gathered_root, load_full_state, single_process_world
from .heads import check_head, head_params, logit_scale, softcap

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@dataclass
class RecoverConfig:
    steps: int = 100
    batch_size: int = 8            # blocks per optimizer step, summed over all ranks
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"       # "cosine" or "constant" (after warm-up)
    divergence: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5              # JSD mixture weight
    ce_weight: float = 0.0         # loss = divergence + ce_weight * next-token cross-entropy
    grad_clip: float = 1.0
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    checkpoint_every: int = 0      # 0: only at the end
    align_blocks: int = 2          # held-out blocks for the CKA trajectory at each checkpoint
    seed: int = 0
    chunk_size: int | None = None  # fused-loss token chunk (None: the kernel's memory-budget default)
    strategy: str = "ddp"          # how the student is wrapped under torchrun

    def validate(self) -> "RecoverConfig":
        if self.steps < 1:
            raise ValueError(f"steps: expected >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence: expected one of {DIVERGENCES}, got {self.divergence!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature: expected > 0, got {self.temperature}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta: expected in [0, 1], got {self.beta}")
        if self.ce_weight < 0:
            raise ValueError(f"ce_weight: expected >= 0, got {self.ce_weight}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule: expected 'cosine' or 'constant', got {self.schedule!r}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every: expected >= 0, got {self.checkpoint_every}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps (--warmup): expected >= 0, got {self.warmup_steps}")
        if self.lora and self.lora_r < 1:
            raise ValueError(f"lora_r (--lora-r): expected >= 1, got {self.lora_r}")
        return self


def check_compatible(teacher, student, teacher_tok=None, student_tok=None) -> None:
    """Teacher and student must share the tokenizer / vocabulary; raise before any training."""
    vt = unwrap(teacher).get_output_embeddings().weight.shape[0]
    vs = unwrap(student).get_output_embeddings().weight.shape[0]
    if vt != vs:
        raise ValueError(f"student: vocabulary size {vs} differs from the teacher's {vt}; "
                         "SDFT needs the same tokenizer")
    if teacher_tok is not None and student_tok is not None:
        if teacher_tok.get_vocab() != student_tok.get_vocab():
            raise ValueError("student tokenizer: its vocabulary differs from the teacher's tokenizer")


def _fused_loss():
    """The project's fused linear distillation loss (the N x V logits never exist)."""
    import sdft_kernels
    fn = getattr(sdft_kernels, "fused_linear_distill_loss", None)
    if fn is None:
        from .ops.fused_linear import fused_linear_distill_loss as fn
    return fn


class SDFTObjective(torch.nn.Module):
    """Student forward + fused distillation loss in one module, so DDP/FSDP wrap exactly what trains.

    Returns (divergence summed over tokens, CE summed over tokens with a next token)."""

    def __init__(self, student, cfg: RecoverConfig, teacher_softcap=None):
        super().__init__()
        self.student = student
        self.cfg = cfg
        self.teacher_softcap = teacher_softcap  # the teacher's final-logit soft-cap (Gemma 2), or None

    def forward(self, ids, teacher_hidden, teacher_weight, teacher_bias=None):
        fused_linear_distill_loss = _fused_loss()
        hf = unwrap(self.student)
        h = hf.base_model(input_ids=ids).last_hidden_state          # [B, T, d_s]
        head = hf.get_output_embeddings()
        sw, sb = head_params(hf, "student")  # the weight the logits come from (quantised, logit scale)
        cfg = self.cfg
        kd = fused_linear_distill_loss(
            h.reshape(-1, h.shape[-1]), sw,
            teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_weight,
            student_bias=sb, teacher_bias=teacher_bias, divergence=cfg.divergence,
            beta=cfg.beta, temperature=cfg.temperature, scale_by_t2=cfg.temperature != 1.0,
            chunk_size=cfg.chunk_size, reduction="sum", student_softcap=softcap(hf),
            teacher_softcap=self.teacher_softcap)
        if cfg.ce_weight > 0:
            # Next-token CE through the student's head a chunk at a time (recomputed in backward), so
            # CE mixing does not bring back the N x V logits that the fused divergence avoids.
            from .losses import chunked_cross_entropy
            ce = chunked_cross_entropy(h[:, :-1].reshape(-1, h.shape[-1]), head, ids[:, 1:].reshape(-1),
                                       chunk_size=cfg.chunk_size, logit_scale=logit_scale(hf, "student"),
                                       softcap=softcap(hf))
        else:
            ce = h.new_zeros(())
        return kd, ce


def _base_hidden(hf, ids):
    """The final hidden states SDFTObjective and kl_to_teacher feed the fused loss."""
    return hf.base_model(input_ids=ids).last_hidden_state


def teacher_hidden(teacher, ids):
    hf = unwrap(teacher)
    with torch.no_grad():
        return hf.base_model(input_ids=ids).last_hidden_state


def _peft_ignore_old_torchao():
    """peft raises ImportError while dispatching LoRA layers when an older torchao is installed (the
    benchmarks pin torchao 0.11 as a peer). Our layers are never torchao tensors, so treat an unusable
    torchao as absent instead of failing."""
    try:
        import peft.tuners.lora.torchao as pt
    except ImportError:
        return
    orig = pt.is_torchao_available
    if getattr(orig, "_sdft_safe", False):
        return

    def safe():
        try:
            return orig()
        except ImportError:
            return False
    safe._sdft_safe = True
    pt.is_torchao_available = safe


def _check_lora_mergeable(student):
    """LoRA adapters are dense: merged into a quantized layer they are re-quantized onto its grid, into a
    pruned one they are cut by its mask, so the saved model would not be the trained one (KL 0.15 trained
    vs 0.23 saved on the default model at 2 bits). Full fine-tuning keeps the model compressed."""
    from .degrade.quantize import QuantLinear
    for n, m in unwrap(student).named_modules():
        if isinstance(m, QuantLinear) or any(k.endswith("_mask") for k, _ in m.named_buffers(recurse=False)):
            raise ValueError(f"lora: the student is {'quantized' if isinstance(m, QuantLinear) else 'pruned'} "
                             f"({n}); adapters cannot be merged into it exactly: recover with full fine-tuning "
                             "(without --lora), which trains the compressed weights and keeps them compressed")


def _apply_lora(student, cfg: RecoverConfig):
    from peft import LoraConfig, get_peft_model

    from .degrade.common import linearize_blocks
    _peft_ignore_old_torchao()
    linearize_blocks(unwrap(student))  # GPT-2's Conv1D as nn.Linear: one adapter kind for every model
    # full names: a suffix such as an unfused expert's "0" would also name decoder layer 0
    names = sorted(n for n, m in unwrap(student).named_modules()
                   if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    if not names:
        raise ValueError("lora: the student has no nn.Linear layers to adapt")
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=names,
                      bias="none")
    # LoRA's A matrices are drawn from the RNG: seed them, so runs (and 1 vs N ranks) start alike
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return get_peft_model(student, lcfg)


def _schedule(cfg: RecoverConfig):
    def f(step):
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
    return f


def batch_rows(step: int, n_rows: int, batch_size: int, seed: int) -> list[int]:
    """Global rows of the step's batch: epochs of seeded permutations, a pure function of step."""
    out = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, off = divmod(pos, n_rows)
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        take = min(batch_size - len(out), n_rows - off)
        out.extend(perm[off:off + take].tolist())
        pos += take
    return out


def _rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(s):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])


@dataclass
class RecoverResult:
    student: torch.nn.Module
    history: list = field(default_factory=list)     # one dict per step
    trajectory: list = field(default_factory=list)  # CKA per layer at step 0 and every checkpoint
    resumed_from: int = 0
    seconds: float = 0.0  # training time of all invocations up to the last step (checkpoints carry it)


def _run_fingerprint(student, train_ids: torch.Tensor) -> dict:
    """What a checkpoint must have been trained on to be resumed: the training blocks (SHA-256 of their
    shape and token ids) and the student's architecture (its parameter names and shapes)."""
    import hashlib
    ids = hashlib.sha256(str(tuple(train_ids.shape)).encode())
    ids.update(train_ids.detach().cpu().contiguous().numpy().tobytes())
    arch = hashlib.sha256(repr([(n, tuple(p.shape)) for n, p in unwrap(student).named_parameters()]).encode())
    return {"train_ids": ids.hexdigest(), "student": arch.hexdigest()}


def recover(teacher, student, train_ids: torch.Tensor, config: RecoverConfig | None = None, *,
            out_dir: str | Path | None = None, align_ids: torch.Tensor | None = None,
            layer_map: Sequence[int] | None = None, world: World | None = None,
            progress: bool = True, stop_after: int | None = None) -> RecoverResult:
    """Train `student` towards frozen `teacher` on blocks `train_ids` [n, T] (LongTensor).

    out_dir: checkpoints (`checkpoint.pt`), `metrics.jsonl`; an existing checkpoint there is resumed.
    align_ids: held-out blocks for the CKA trajectory (the first `config.align_blocks` are used).
    stop_after: stop (after checkpointing) once this step is reached - a time-boxed or test "kill".
    The student is modified in place (LoRA: wrapped by peft; see `merge_lora`) and returned.
    """
    cfg = (config or RecoverConfig()).validate()
    world = world or init_world()
    if not isinstance(train_ids, torch.Tensor) or train_ids.dtype != torch.long or train_ids.ndim != 2:
        raise TypeError("train_ids: expected a LongTensor [n_blocks, block_len]")
    if train_ids.shape[0] == 0 or train_ids.shape[1] < 2:
        raise ValueError(f"train_ids: expected at least one block of >= 2 tokens, got {tuple(train_ids.shape)}")
    if cfg.batch_size < world.world_size:
        raise ValueError(f"batch_size: {cfg.batch_size} is smaller than the world size {world.world_size}")
    check_compatible(teacher, student)
    layer_map = check_layer_map(layer_map, len(_layers(student)), len(_layers(teacher)))
    if cfg.lora:
        _check_lora_mergeable(student)

    out_dir = Path(out_dir) if out_dir is not None else None
    ckpt_path = out_dir / "checkpoint.pt" if out_dir else None
    metrics_path = out_dir / "metrics.jsonl" if out_dir else None
    if out_dir is not None and world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if student is teacher:
        raise ValueError("student: is the teacher object itself; pass a (degraded) copy")
    # full fine-tuning trains every student weight (QuantLinear latent weights, pruning weight_orig);
    # LoRA freezes them and adds adapters
    student.requires_grad_(not cfg.lora)
    if cfg.lora:
        student = _apply_lora(student, cfg)
    if world.is_distributed:
        teacher.to(world.device)  # each rank holds a frozen teacher replica on its own device
    thf = unwrap(teacher)
    t_head = head_params(thf, "teacher")
    probe = train_ids[:1, :8].to(next(unwrap(student).parameters()).device)
    check_head(teacher, _base_hidden, probe.to(next(thf.parameters()).device), "teacher")
    check_head(student, _base_hidden, probe, "student")

    objective = SDFTObjective(student, cfg, teacher_softcap=softcap(thf))
    # Wrap before building the optimizer: FSDP replaces the parameters with sharded ones.
    model = wrap_student(objective, world, strategy=cfg.strategy) if world.is_distributed else objective
    device = next(unwrap(student).parameters()).device
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))

    res = RecoverResult(student=student)
    start, seconds_before = 0, 0.0
    run_id = _run_fingerprint(student, train_ids) if ckpt_path is not None else None  # (checkpoints only)
    if ckpt_path is not None and ckpt_path.exists():
        ck = sio.torch_load(ckpt_path)
        # how often to checkpoint and how ranks wrap the model (a full-state checkpoint resumes under
        # either strategy) do not change the run; every other setting must match
        free = ("checkpoint_every", "strategy")
        saved = {k: v for k, v in ck["config"].items() if k not in free}
        now = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in free}
        if saved != now:
            diff = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
            raise ValueError(f"out_dir: {out_dir} holds a checkpoint of a different config ("
                             + ", ".join(f"{k}: {saved.get(k)!r} there, {now.get(k)!r} now" for k in diff)
                             + "); use a new directory or delete it")
        for key, what in (("train_ids", "training blocks (--text, --block-len, --max-blocks)"),
                          ("student", "student architecture")):
            if key in ck.get("run", {}) and ck["run"][key] != run_id[key]:
                raise ValueError(f"{key}: out_dir {out_dir} holds a checkpoint of other {what}; resuming "
                                 "would continue another run: use a new directory or delete it")
        # full (unsharded) state keyed by name: resumes on any number of ranks, any wrapping
        load_full_state(unwrap(student), ck["model"], opt, ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        _set_rng_state(ck["rng"])
        start, res.history, res.trajectory = ck["step"], ck["history"], ck["trajectory"]
        seconds_before = float(ck.get("seconds", 0.0))
        res.resumed_from = start
    if world.is_main and metrics_path is not None:  # what the checkpoint holds (nothing at step 0):
        sio.atomic_write_jsonl(metrics_path, res.history)  # steps logged after it are redone

    def trajectory_point(step):
        if align_ids is None or cfg.align_blocks <= 0:
            return
        student.eval()
        # FSDP: every rank must run the same forwards (each one all-gathers), so each rank aligns on
        # all the blocks itself instead of a shard; the bare student's embeddings/head are gathered.
        aw = single_process_world(world.device) if cfg.strategy == "fsdp" else world
        with gathered_root(model):
            a = align(teacher, student, align_ids[: cfg.align_blocks], layer_map=layer_map,
                      heatmap=False, world=aw)
        student.train()
        res.trajectory.append({"step": step, "cka": a["cka"], "mean_cka": a["mean_cka"]})

    def save(step):
        if ckpt_path is None:
            return
        state, opt_state = full_state(unwrap(student), world, opt)  # collective: all ranks gather
        if world.is_main:
            sio.atomic_torch_save({"step": step, "model": state, "optimizer": opt_state,
                                   "scheduler": sched.state_dict(), "rng": _rng_state(),
                                   "history": res.history, "trajectory": res.trajectory,
                                   "config": dataclasses.asdict(cfg), "run": run_id,
                                   "seconds": seconds_before + time.perf_counter() - t0}, ckpt_path)
        barrier(world)

    if start == 0 and not res.trajectory:
        trajectory_point(0)
    student.train()
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.steps, initial=start, desc="sdft", disable=not (progress and world.is_main),
               leave=False, dynamic_ncols=True)
    mfile = open(metrics_path, "a", encoding="utf-8") if (metrics_path and world.is_main) else None
    t0 = time.perf_counter()
    try:
        for step in range(start, end):
            rows = batch_rows(step, train_ids.shape[0], cfg.batch_size, cfg.seed)
            mine = [rows[i] for i in shard(len(rows), world)]
            ids = train_ids[mine].to(device)
            t_h = teacher_hidden(teacher, ids)
            # Normalise by the GLOBAL token counts so every rank's gradient is a share of one mean;
            # DDP averages gradients over ranks, hence the extra world_size factor.
            counts = torch.tensor([float(ids.numel()), float(ids.shape[0] * (ids.shape[1] - 1))],
                                  device=device)
            all_reduce_sum_(counts, world)
            kd_sum, ce_sum = model(ids, t_h, *t_head)
            kd = kd_sum / counts[0]
            ce = ce_sum / counts[1]
            loss = (kd + cfg.ce_weight * ce) * world.world_size
            if not torch.isfinite(loss):
                raise FloatingPointError(f"recover: non-finite loss at step {step} (kd={kd.item()}, "
                                         f"ce={ce.item()}); lower lr or check the student")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip else torch.tensor(0.0)
            lr = sched.get_last_lr()[0]  # the rate this step used (after sched.step() it is the next one's)
            opt.step()
            sched.step()
            stats = torch.stack([kd.detach(), ce.detach()]).double()  # shares of the global mean: sum, no factor
            all_reduce_sum_(stats, world)  # each rank holds its share of the global mean
            rec = {"step": step + 1, "loss": float(stats[0] + cfg.ce_weight * stats[1]),
                   "divergence": float(stats[0]), "ce": float(stats[1]) if cfg.ce_weight > 0 else None,
                   "lr": lr, "grad_norm": float(gnorm),
                   "tokens": int(counts[0].item())}
            res.history.append(rec)
            if mfile:
                mfile.write(json.dumps(sio.to_jsonable(rec)) + "\n")
                mfile.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            done = step + 1
            if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == end:
                trajectory_point(done)
                save(done)
    finally:
        bar.close()
        if mfile:
            mfile.close()
    student.eval()
    res.student = student
    res.seconds = seconds_before + time.perf_counter() - t0
    return res


def merge_lora(student):
    """A LoRA-wrapped student -> the plain model with adapters merged (no-op otherwise)."""
    if hasattr(student, "merge_and_unload"):
        return student.merge_and_unload()
    return student


@torch.no_grad()
def kl_to_teacher(teacher, student, ids: torch.Tensor, divergence: str = "forward_kl",
                  batch_size: int = 4) -> float:
    """Mean per-token divergence of the student from the teacher on blocks `ids` [n, T]."""
    fused_linear_distill_loss = _fused_loss()
    total, n = 0.0, 0
    shf, thf = unwrap(student), unwrap(teacher)
    (sw, sb), (tw, tb) = head_params(shf, "student"), head_params(thf, "teacher")
    was = student.training
    student.eval()
    device = next(shf.parameters()).device
    for s in range(0, ids.shape[0], batch_size):
        b = ids[s:s + batch_size].to(device)
        hs = shf.base_model(input_ids=b).last_hidden_state
        ht = thf.base_model(input_ids=b).last_hidden_state
        total += float(fused_linear_distill_loss(hs.reshape(-1, hs.shape[-1]), sw,
                                                 ht.reshape(-1, ht.shape[-1]), tw,
                                                 student_bias=sb, teacher_bias=tb, student_softcap=softcap(shf),
                                                 teacher_softcap=softcap(thf),
                                                 divergence=divergence, reduction="none").sum())
        n += b.numel()
    student.train(was)
    return total / n
