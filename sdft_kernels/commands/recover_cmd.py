"""`sdft recover`: SDFT of a degraded student toward its original model; resumes from --out."""
from __future__ import annotations

from .common import friendly

from .common import add_device_arg, add_layer_map_arg, add_model_arg, add_text_args


def configure(p):
    add_model_arg(p, "--teacher", "teacher / original model directory; default: the embedded model")
    add_model_arg(p, "--student", "degraded student directory (e.g. from `sdft degrade`); required")
    add_text_args(p, "train")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="run directory: checkpoint.pt, metrics.jsonl, summary.json, model/ (recovered)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-len", type=int, default=None,
                   help="training block length (default 256, or the models' context if shorter)")
    p.add_argument("--max-blocks", type=int, default=2048, help="training blocks taken from the text")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--divergence", choices=("forward_kl", "reverse_kl", "jsd"), default="forward_kl")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.5, help="JSD mixture weight")
    p.add_argument("--ce-weight", type=float, default=0.0, help="add this times the next-token CE")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all weights")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--checkpoint-every", type=int, default=25)
    p.add_argument("--align-blocks", type=int, default=1, help="held-out blocks for the CKA trajectory (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp", help="under torchrun")
    add_layer_map_arg(p)
    add_device_arg(p)


@friendly
def main(args) -> int:
    from pathlib import Path
    from .. import io as sio
    from ..data import load_text
    from ..distributed import init_world
    from ..recover import RecoverConfig, kl_to_teacher, merge_lora, recover
    from .common import blocks, emit, fit_len, load_pair, parse_layer_map, read_text, resolve_device

    device = resolve_device(args.device)
    if args.student is None:
        raise ValueError("--student: required (a model directory)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise FileExistsError(f"--out: {args.out} exists and is not a directory")
    sio.check_model_out(Path(args.out) / "model", "--out")
    cfg = RecoverConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
                        divergence=args.divergence, temperature=args.temperature, beta=args.beta,
                        ce_weight=args.ce_weight, lora=args.lora, lora_r=args.lora_r,
                        checkpoint_every=args.checkpoint_every, align_blocks=args.align_blocks,
                        seed=args.seed, strategy=args.strategy).validate()
    text = read_text(args.text, "train")
    world = init_world()
    # under torchrun each rank's models go to its own device (recover wraps the student there)
    teacher, tok, student, stok, record, layer_map = load_pair(
        args.teacher, args.student, device=None if world.is_distributed else device,
        layer_map=parse_layer_map(args.layer_map))
    block_len = fit_len(args.block_len, "--block-len", teacher, student)
    train_ids = blocks(tok, text, block_len, args.max_blocks, "--text")
    held = blocks(tok, load_text("heldout"), block_len, 4, "held-out")
    out = Path(args.out)
    kl0 = kl_to_teacher(teacher, student, held)
    res = recover(teacher, student, train_ids, cfg, out_dir=out, align_ids=held, layer_map=layer_map, world=world)
    student = res.student
    if world.is_distributed and cfg.strategy == "fsdp":
        # FSDP leaves the weights sharded: gather them into a plain copy of the student on rank 0
        from ..align import unwrap
        from ..distributed import unshard_into
        from ..recover import _apply_lora
        from .common import load_any
        fresh = load_any(args.student)[0] if world.is_main else None
        if fresh is not None and cfg.lora:
            fresh = _apply_lora(fresh, cfg)
        unshard_into(unwrap(student), unwrap(fresh) if fresh is not None else None, world)
        student = fresh
    student = merge_lora(student)
    kl1 = kl_to_teacher(teacher, student, held) if world.is_main else None
    if args.layer_map is not None:  # the saved model's record carries the map it was trained and aligned with
        record = {**(record or {"kind": "unknown", "params": {}}), "layer_map": layer_map}
    if world.is_main:
        sio.save_model_dir(student, stok, out / "model", record)
        summary = {"steps": cfg.steps, "resumed_from": res.resumed_from, "kl_before": kl0, "kl_after": kl1,
                   "final_loss": res.history[-1]["loss"] if res.history else None,
                   "trajectory": res.trajectory, "model": str(out / "model")}
        emit(summary, out / "summary.json")
    return 0
