"""`sdft run`: the whole study on one model.

For each degradation (specs.py) at a couple of severities: degrade the original model, evaluate and
align it with the original (the teacher), recover it with SDFT, evaluate and align again; then
correlate alignment with recovery across runs and write the run directory (config, metrics, plots,
report.md). Every finished unit of work is saved atomically under units/ and skipped on a rerun; an
interrupted recovery resumes from its checkpoint, so a killed study continues where it stopped.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import _C, io as sio
from .recover import RecoverConfig
from .specs import parse_spec

DEFAULT_SPECS = ("forget:40", "forget:160", "rtn:3", "rtn:2", "gptq:2", "blocks:1", "blocks:2", "wanda2:4")
QUICK_SPECS = ("rtn:2", "blocks:1", "forget:4")


@dataclass
class StudyConfig:
    model: str | None = None          # None: the embedded default model
    specs: tuple = DEFAULT_SPECS
    block_len: int = 256              # training / evaluation window
    eval_tokens: int = 4096           # held-out tokens for perplexity
    task_examples: int = 16           # narrow-task examples for accuracy
    align_blocks: int = 1             # held-out blocks for alignment
    align_block_len: int | None = None  # None: min(model context, 2048)
    # KV-cache chunking bounds activation memory for very long blocks, but on CPU a chunked forward
    # is ~3x slower (masked attention), so whole blocks unless set
    align_chunk: int | None = None
    calib_blocks: int = 8
    train_blocks: int = 512
    recover: RecoverConfig = field(default_factory=lambda: RecoverConfig(
        steps=120, batch_size=4, lr=3e-4, warmup_steps=6, checkpoint_every=20, align_blocks=1))
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_config(cls, model=None) -> "StudyConfig":
        return cls(model=model, specs=QUICK_SPECS, block_len=64, eval_tokens=256, task_examples=2,
                   align_blocks=1, align_block_len=128, align_chunk=None, calib_blocks=4, train_blocks=16,
                   recover=RecoverConfig(steps=3, batch_size=2, lr=1e-3, checkpoint_every=2, align_blocks=1),
                   quick=True)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Context:
    """Teacher, tokenizer and the token tensors every unit shares (built once per study)."""

    def __init__(self, cfg: StudyConfig, device=None):
        from .align import default_block_len
        from .data import load_text, token_blocks
        from .models import context_length, decoder_layers, load_model

        self.cfg = cfg
        self.teacher, self.tok = load_model(cfg.model)
        # every student is a copy of the teacher, on its device; token tensors move per batch
        self.teacher.to(device or "cpu").eval().requires_grad_(False)
        self.n_layers = len(decoder_layers(self.teacher))
        self.specs = [parse_spec(s, self.n_layers) for s in cfg.specs]  # bad specs fail here, early
        from .heads import check_head
        from .recover import _base_hidden
        probe = torch.arange(8).unsqueeze(0) % self.teacher.config.vocab_size
        check_head(self.teacher, _base_hidden, probe.to(device or "cpu"), "model")  # SDFT's fused loss applies
        if any(s.kind not in ("forget", "blocks") for s in self.specs):
            from .degrade.common import check_degradable
            check_degradable(self.teacher)  # weights a quantization / pruning cannot reach (fused MoE)
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"specs: duplicate degradations in {list(cfg.specs)}")
        torch.manual_seed(cfg.seed)
        T = cfg.block_len
        ctx = context_length(self.teacher)
        for name, v in (("block_len", T), ("align_block_len", cfg.align_block_len)):
            if ctx is not None and v is not None and v > ctx:
                raise ValueError(f"{name}: {v} tokens exceed the model's context of {ctx} (max_position_embeddings)")
        self.train_ids = token_blocks(self.tok, load_text("train"), T, max_blocks=cfg.train_blocks)
        heldout = load_text("heldout")
        self.eval_ids = token_blocks(self.tok, heldout, cfg.eval_tokens, max_blocks=1)[0]
        self.calib_ids = token_blocks(self.tok, load_text("calibration"), T, max_blocks=cfg.calib_blocks)
        aT = cfg.align_block_len or default_block_len(self.teacher)
        # alignment blocks come from the END of the held-out text: disjoint from the perplexity tokens
        all_ids = token_blocks(self.tok, heldout, aT)
        self.align_ids = all_ids[-cfg.align_blocks:]
        from . import tasks
        self.examples = tasks.make_examples(cfg.task_examples, seed=cfg.seed + 1)
        tasks.check_fits(self.teacher, max(len(self.tok(tasks.format_prompt(e))["input_ids"]) for e in self.examples))


def evaluate_model(ctx: Context, model) -> dict:
    from . import tasks
    from .evaluate import perplexity
    T = ctx.cfg.block_len
    ppl = perplexity(model, ctx.eval_ids, window=T, stride=T)  # non-overlapping windows: CPU budget
    acc = tasks.task_accuracy(model, ctx.tok, ctx.examples)
    return {"perplexity": float(ppl), "task_accuracy": float(acc)}


def align_model(ctx: Context, model, layer_map, heatmap=True) -> dict:
    from .align import align
    return align(ctx.teacher, model, ctx.align_ids, layer_map=layer_map, chunk_len=ctx.cfg.align_chunk,
                 heatmap=heatmap, drop_first=1)


def _cached(path: Path, fn):
    """Compute-once unit of work: the JSON at `path` is written atomically when fn() finishes."""
    if path.exists():
        return sio.read_json(path)
    out = fn()
    sio.atomic_write_json(path, out)
    return sio.read_json(path)


def run_unit(ctx: Context, spec, out: Path, progress: bool = True) -> dict:
    """Degrade -> evaluate + align -> SDFT -> evaluate + align, for one spec. Resumable."""
    from .recover import kl_to_teacher, recover
    from .specs import apply_spec

    udir = out / "units" / spec.name
    final = udir / "result.json"
    if final.exists():
        return sio.read_json(final)
    t0 = time.perf_counter()
    student, record = apply_spec(spec, ctx.teacher, ctx.tok, ctx.calib_ids, seed=ctx.cfg.seed)
    t_degrade = time.perf_counter() - t0
    layer_map = record["layer_map"]
    kl_ids = ctx.align_ids[:, :ctx.cfg.block_len * 2]  # held-out tokens

    def before():
        student.eval()
        return {"eval": evaluate_model(ctx, student), "align": align_model(ctx, student, layer_map),
                "kl_to_teacher": kl_to_teacher(ctx.teacher, student, kl_ids), "record": record,
                "degrade_seconds": t_degrade}
    pre = _cached(udir / "before.json", before)

    res = recover(ctx.teacher, student, ctx.train_ids,
                  ctx.cfg.recover, out_dir=udir / "recover", align_ids=ctx.align_ids,
                  layer_map=layer_map, progress=progress)
    student = res.student
    post = {"eval": evaluate_model(ctx, student), "align": align_model(ctx, student, layer_map),
            "kl_to_teacher": kl_to_teacher(ctx.teacher, student, kl_ids)}
    result = {"name": spec.name, "spec": spec.text, "family": spec.family, "kind": record["kind"],
              "record": record, "before": pre, "after": post,
              "trajectory": res.trajectory, "history": res.history,
              "recover_seconds": res.seconds, "structure_kept": _structure_kept(record, student)}
    sio.atomic_write_json(final, result)
    return result


def _structure_kept(record, student) -> dict:
    """Evidence that the recovered student is still compressed (quant layers / sparsity / depth)."""
    from .degrade.quantize import QuantLinear
    from .models import decoder_layers
    n_q = sum(isinstance(m, QuantLinear) for m in student.modules())
    zeros = total = 0
    for m in student.modules():
        mask = getattr(m, "weight_mask", None)
        if mask is not None:
            zeros += int((mask == 0).sum())
            total += mask.numel()
    return {"quant_layers": n_q, "mask_sparsity": zeros / total if total else 0.0,
            "decoder_layers": len(decoder_layers(student))}


def run_study(cfg: StudyConfig, out: str | Path, progress: bool = True, log=print, device=None) -> dict:
    """Run (or resume) the study into directory `out` on `device` (default cpu); returns the metrics
    dict. The device is not part of the config: a study may resume on another one (the numbers then
    differ by float rounding only)."""
    from .report import show, summarize, write_outputs

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.json"
    cfg_dict = sio.to_jsonable(cfg.to_dict())
    if cfg_path.exists() and sio.read_json(cfg_path) != cfg_dict:
        raise ValueError(f"out: {out} holds a study with a different config; use another --out "
                         "directory or delete it")
    t0 = time.perf_counter()
    device = torch.device(device or "cpu")
    ctx = Context(cfg, device)
    sio.atomic_write_json(cfg_path, cfg_dict)

    def teacher_unit():
        from .align import measure_overhead
        ev = evaluate_model(ctx, ctx.teacher)
        self_align = align_model(ctx, ctx.teacher, list(range(ctx.n_layers)), heatmap=False)
        long_ids = ctx.align_ids[0]
        ovh = measure_overhead(ctx.teacher, ctx.teacher, long_ids, chunk_len=cfg.align_chunk,
                               repeats=1 if cfg.quick else 3)
        return {"eval": ev, "self_cka": self_align["cka"], "align_overhead": ovh,
                "n_layers": ctx.n_layers, "n_params": sum(p.numel() for p in ctx.teacher.parameters())}
    log("[study] teacher: evaluating and timing alignment overhead")
    teacher = _cached(out / "units" / "teacher.json", teacher_unit)

    results = []
    for i, spec in enumerate(ctx.specs):
        log(f"[study] {i + 1}/{len(ctx.specs)} {spec.text} ({spec.family})")
        r = run_unit(ctx, spec, out, progress=progress)
        b, a = r["before"]["eval"]["perplexity"], r["after"]["eval"]["perplexity"]
        log(f"[study]   ppl {teacher['eval']['perplexity']:.2f} -> degraded {b:.2f} -> recovered {a:.2f}; "
            f"CKA {show(r['before']['align']['mean_cka'])} -> {show(r['after']['align']['mean_cka'])}")
        results.append(r)
    metrics = summarize(teacher, results)
    metrics["seconds_this_invocation"] = time.perf_counter() - t0
    metrics["device"] = (torch.cuda.get_device_name(device) + f" ({device})" if device.type == "cuda"
                         else f"cpu ({torch.get_num_threads()} threads, {_C.cpu_isa()} kernels)")
    write_outputs(out, cfg_dict, teacher, results, metrics)
    log(f"[study] done in {metrics['seconds_this_invocation']:.0f} s; read {out / 'report.md'}")
    return metrics
