"""Train the embedded default model of sdft_kernels (a small LLaMA-style causal LM) from scratch on CPU.

Recipe (all steps are deterministic given the Python version of the interpreter running this script):
  1. Split the CPython standard-library sources by module (python/default_model_data.py) and write the
     shipped texts (held-out, calibration, a training sample) to sdft_kernels/assets/data/.
  2. Train a byte-level BPE tokenizer (vocab 4096) on the training split with `tokenizers`.
  3. Train LlamaForCausalLM with AdamW + warmup/cosine, gradient clipping, random-offset fixed-length
     windows, checkpointing atomically every few minutes so a killed run resumes where it stopped.
  4. Save with save_pretrained (safetensors) and write training_record.json with held-out perplexity,
     unigram / bigram baselines and degradation sanity checks (python/default_model_eval.py).

Rebuild:  python python/train_default_model.py --total-steps 1300 --max-minutes 74 (the shipped model; see README)
Smoke:    python python/train_default_model.py --tiny --max-minutes 1 --out /tmp/dm --data-out /tmp/dd
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

EOS, PAD = "<|endoftext|>", "<|pad|>"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "sdft_kernels/assets/default_model")
    p.add_argument("--data-out", type=Path, default=REPO / "sdft_kernels/assets/data")
    p.add_argument("--work-dir", type=Path, default=REPO / "build/default_model_work",
                   help="tokenizer cache, token cache and resumable checkpoint")
    p.add_argument("--max-minutes", type=float, default=74.0, help="wall-time budget of the training loop")
    p.add_argument("--ckpt-minutes", type=float, default=3.0)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=40)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--total-steps", type=int, default=None,
                   help="cosine horizon; default: estimated from the measured step rate and --max-minutes")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; on a shared, oversubscribed CPU one thread was 4x faster than two")
    p.add_argument("--restart-schedule", action="store_true",
                   help="on resume, start a new warmup + cosine cycle from the checkpoint's step (a warm "
                        "restart: --total-steps and --max-minutes then count from the resumed point)")
    p.add_argument("--device", default="cpu", help="torch device for training, e.g. cuda")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (slower without AVX512-BF16/AMX)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens used for perplexity")
    p.add_argument("--tiny", action="store_true", help="2 layers, hidden 64, vocab 512: smoke test")
    p.add_argument("--skip-eval", action="store_true")
    args = p.parse_args(argv)
    if args.tiny:
        args.layers, args.hidden, args.heads, args.intermediate, args.vocab_size = 2, 64, 2, 172, 512
    return args


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_shipped_data(splits: dict, data_out: Path) -> None:
    atomic_write_text(data_out / "heldout.txt", splits["heldout"])
    atomic_write_text(data_out / "calibration.txt", splits["calibration"])
    atomic_write_text(data_out / "train.txt", splits["train_sample"])


def build_tokenizer(docs: list[str], vocab_size: int, save_dir: Path):
    """Byte-level BPE; saved as a PreTrainedTokenizerFast so AutoTokenizer loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if (save_dir / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(save_dir))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=2048)
    tmp = save_dir.with_name(save_dir.name + ".tmp")
    fast.save_pretrained(str(tmp))
    if save_dir.exists():
        import shutil
        shutil.rmtree(save_dir)
    os.replace(tmp, save_dir)
    return fast


def encode_corpus(tokenizer, docs: list[str], cache: Path):
    """All training documents as one 1-D token stream, each document followed by EOS (cached)."""
    import torch
    if cache.is_file():
        return torch.load(cache)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer._tokenizer.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    stream = torch.tensor(ids, dtype=torch.int16 if tokenizer.vocab_size < 32768 else torch.int32)
    tmp = cache.with_name(cache.name + ".tmp")
    torch.save(stream, tmp)
    os.replace(tmp, cache)
    return stream


def make_model(args, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=2048, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5, tie_word_embeddings=True, initializer_range=0.02,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


def batch_for_step(stream, step: int, args):
    """Windows for one step: each epoch is a seeded permutation of non-overlapping windows at a seeded
    offset, so the batch is a pure function of the step (a resumed run sees the same data)."""
    import torch
    n_win = (len(stream) - 1 - args.seq_len) // args.seq_len
    per_epoch = n_win // args.batch_size
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(args.seed * 100003 + epoch)
    offset = int(torch.randint(0, args.seq_len, (1,), generator=g))
    perm = torch.randperm(n_win, generator=g)[k * args.batch_size:(k + 1) * args.batch_size]
    starts = offset + perm * args.seq_len
    idx = starts[:, None] + torch.arange(args.seq_len + 1)[None, :]
    return stream[idx].long(), epoch


def lr_factor(step: int, progress: float, args) -> float:
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return args.min_lr_ratio + (1.0 - args.min_lr_ratio) * cos


def train(args, model, stream, ckpt_path: Path, log) -> dict:
    import torch
    import torch.nn.functional as F

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    state = {"step": 0, "tokens": 0, "elapsed": 0.0, "total_steps": args.total_steps, "losses": []}
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, weights_only=False, map_location=args.device)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        state = ck["state"]
        log(f"resumed from {ckpt_path} at step {state['step']} ({state['elapsed']:.0f} s done)")
        if args.total_steps is not None and args.total_steps != state["total_steps"]:
            # an explicit horizon wins over the stored one (used to extend a run that is under way)
            log(f"cosine horizon changed from {state['total_steps']} to {args.total_steps} steps")
            state["total_steps"] = args.total_steps
        if args.restart_schedule:
            # a new cycle: the schedule's step and time origin move to where the run resumes
            state["cycle"] = {"step": state["step"], "elapsed": state["elapsed"]}
            state["total_steps"] = state["step"] + (args.total_steps or 10 ** 9)
            log(f"warm restart at step {state['step']}: new cycle of {args.total_steps} steps / "
                f"{args.max_minutes} min")
    cycle = state.get("cycle", {"step": 0, "elapsed": 0.0})
    budget = cycle["elapsed"] + args.max_minutes * 60.0
    model.train()
    t_start, t_ckpt = time.time() - state["elapsed"], time.time()
    rate_t0 = None
    while True:
        elapsed = time.time() - t_start
        if elapsed >= budget or (state["total_steps"] and state["step"] >= state["total_steps"]):
            break
        step = state["step"]
        horizon = state["total_steps"] or 10 ** 9
        c_step, c_time = step - cycle["step"], elapsed - cycle["elapsed"]
        progress = max(c_step / max(1, horizon - cycle["step"]), c_time / (budget - cycle["elapsed"]))
        factor = lr_factor(c_step, progress, args)
        for group in opt.param_groups:
            group["lr"] = args.lr * factor
        x, epoch = batch_for_step(stream, step, args)
        x = x.to(args.device)
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(input_ids=x[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        state["step"] += 1
        state["tokens"] += x[:, :-1].numel()
        state["elapsed"] = time.time() - t_start
        state["losses"].append(round(loss.item(), 4))
        # The cosine horizon comes from the step rate measured over steps 5..25 of a fresh run.
        if state["total_steps"] is None and state["step"] == 5:
            rate_t0 = time.time()
        if state["total_steps"] is None and state["step"] == 25 and rate_t0 is not None:
            rate = 20.0 / (time.time() - rate_t0)
            state["total_steps"] = int(25 + rate * (budget - state["elapsed"]) * 0.97)
            log(f"measured {rate:.3f} steps/s = {rate * x[:, :-1].numel():.0f} tokens/s; "
                f"cosine horizon {state['total_steps']} steps")
        if state["step"] % 10 == 0:
            log(f"step {state['step']} epoch {epoch} loss {loss.item():.4f} lr {args.lr * factor:.2e} "
                f"gnorm {float(gnorm):.2f} tokens {state['tokens']} elapsed {state['elapsed']:.0f}s")
        if time.time() - t_ckpt >= args.ckpt_minutes * 60:
            save_checkpoint(ckpt_path, model, opt, state)
            t_ckpt = time.time()
    save_checkpoint(ckpt_path, model, opt, state)
    return state


def save_checkpoint(path: Path, model, opt, state) -> None:
    import torch
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "state": state}, tmp)
    os.replace(tmp, path)


def save_model(model, tokenizer, out: Path) -> None:
    import shutil
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    old = out.with_name(out.name + ".old")
    if out.exists():
        # keep a previous training_record.json out of the way; the new one is written after evaluation
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    import torch
    torch.set_num_threads(args.threads)
    from default_model_data import split_texts

    args.work_dir.mkdir(parents=True, exist_ok=True)
    log_path = args.work_dir / "train.log"

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(log_path, "a") as f:
            f.write(line + "\n")

    t0 = time.time()
    splits = split_texts()
    write_shipped_data(splits, args.data_out)
    log(f"stdlib {splits['stdlib_dir']} (Python {splits['python_version']}): {len(splits['train_docs'])} "
        f"train docs, {sum(map(len, splits['train_docs']))} chars; heldout {len(splits['heldout'])} chars")
    tag = f"v{args.vocab_size}"
    tokenizer = build_tokenizer(splits["train_docs"], args.vocab_size, args.work_dir / f"tokenizer_{tag}")
    stream = encode_corpus(tokenizer, splits["train_docs"], args.work_dir / f"train_ids_{tag}.pt")
    log(f"tokenizer vocab {len(tokenizer)}; train stream {len(stream)} tokens "
        f"({sum(map(len, splits['train_docs'])) / len(stream):.2f} chars/token); prep {time.time() - t0:.0f}s")

    model = make_model(args, tokenizer).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {args.layers} layers, hidden {args.hidden}, {n_params} parameters")
    name = f"ckpt_{tag}_L{args.layers}_H{args.hidden}_S{args.seq_len}_B{args.batch_size}.pt"
    state = train(args, model, stream, args.work_dir / name, log)
    log(f"training done: {state['step']} steps, {state['tokens']} tokens, {state['elapsed']:.0f}s")
    model = model.cpu().eval()
    save_model(model, tokenizer, args.out)

    record = {
        "recipe": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": {"source": "CPython standard library sources (PSF licence)",
                 "python_version": splits["python_version"], "train_docs": len(splits["train_docs"]),
                 "train_chars": sum(map(len, splits["train_docs"])), "train_tokens": len(stream)},
        "parameters": n_params, "steps": state["step"], "tokens_seen": state["tokens"],
        "epochs_seen": round(state["tokens"] / len(stream), 3),
        "train_wall_seconds": round(state["elapsed"], 1), "cosine_horizon_steps": state["total_steps"],
        "final_train_loss_mean_last50": round(sum(state["losses"][-50:]) / max(1, len(state["losses"][-50:])), 4),
        "torch_version": torch.__version__, "threads": args.threads,
    }
    if not args.skip_eval:
        from default_model_eval import evaluate_all
        record["evaluation"] = evaluate_all(model, tokenizer, stream, splits, args, log)
    atomic_write_text(args.out / "training_record.json", json.dumps(record, indent=2) + "\n")
    log(f"wrote {args.out} ({time.time() - t0:.0f}s total)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
