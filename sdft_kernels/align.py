"""Layer-by-layer alignment (CKA) between a student and its teacher, streamed.

Forward hooks on every decoder block hand each block's output to the CKA accumulators as soon as it is
computed; nothing beyond the current chunk's activations is ever held. A long sequence is fed through
in chunks with the model's KV cache, so activation memory is bounded by the chunk, not the sequence,
while the result is the same as one full-length forward (causal attention).

Matched layers come from the degradation record's `layer_map` (student block i -> teacher block j), so
a student with removed blocks is compared with the teacher blocks it replaced.
"""
from __future__ import annotations

import contextlib
import inspect
import operator
import time
from typing import Sequence

import torch

from .checks import ids_in_vocab, int_at_least
from .distributed import World, init_world, shard


def unwrap(model):
    """The Hugging Face model inside DDP/FSDP/peft wrappers (LoRA layers stay injected in place)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module) and \
                type(model).__name__ in ("DistributedDataParallel", "FullyShardedDataParallel"):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def _layers(model) -> torch.nn.ModuleList:
    from .models import decoder_layers
    return decoder_layers(unwrap(model))


def default_block_len(model, cap: int = 2048) -> int:
    """Alignment block length: the model's full context, capped at `cap` tokens."""
    ctx = getattr(unwrap(model).config, "max_position_embeddings", None) or cap
    return int(min(ctx, cap))


def check_layer_map(layer_map, n_student: int, n_teacher: int) -> list[int]:
    """Validate (or build, when None) the student -> teacher block map; raise before any work."""
    if layer_map is None:
        if n_student != n_teacher:
            raise ValueError(
                f"layer_map: the student has {n_student} decoder layers and the teacher {n_teacher}; "
                "pass the degradation record's layer_map (student index -> teacher index)")
        return list(range(n_student))
    if not (isinstance(layer_map, (list, tuple)) and all(hasattr(j, "__index__") for j in layer_map)):
        raise TypeError(f"layer_map: expected a list of teacher block indices (ints), one per student block, "
                        f"got {layer_map!r}")
    layer_map = [operator.index(j) for j in layer_map]
    if len(layer_map) != n_student:
        raise ValueError(f"layer_map: expected one teacher index per student layer ({n_student}), "
                         f"got {len(layer_map)} entries")
    bad = [j for j in layer_map if not 0 <= j < n_teacher]
    if bad:
        raise ValueError(f"layer_map: teacher indices must be in [0, {n_teacher}), got {bad} (a degradation "
                         "record maps onto the original model's blocks: is the teacher itself degraded?)")
    return layer_map


class _Outputs(list):
    """Decoder-block outputs of one model's forwards; `active` False makes its hooks ignore a forward (a
    teacher and student that share block modules, or one model passed as both, fire both hook sets)."""
    active = True


@contextlib.contextmanager
def capture_layer_outputs(model):
    """Context manager yielding a list that each forward fills with every decoder block's output
    (detached, in order) while its `active` attribute is True. The caller reduces and clears it after
    each forward. Block i's output is Hugging Face's output_hidden_states[i + 1] except for the last
    block: HF's hidden_states[-1] is taken after the final norm, this is the block's raw output."""
    buf = _Outputs()

    def hook(_module, _inputs, output):
        if buf.active:
            h = output[0] if isinstance(output, (tuple, list)) else output
            buf.append(h.detach())

    handles = [layer.register_forward_hook(hook) for layer in _layers(model)]
    try:
        yield buf
    finally:
        for h in handles:
            h.remove()


def _cache_name(model) -> str:
    """The KV-cache argument / output field of this model's forward: `cache` from transformers 5.2x on
    (where `past_key_values` is deprecated, to be removed in 5.40), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(unwrap(model).forward).parameters else "past_key_values"


def _forward_chunks(model, ids: torch.Tensor, chunk_len: int):
    """Run `ids` [B, T] through `model` chunk by chunk with its KV cache; yields (start, end) after
    each chunk's forward (hooks have fired by then)."""
    cache = None
    T = ids.shape[1]
    name = _cache_name(model) if chunk_len < T else None
    for s in range(0, T, chunk_len):
        e = min(T, s + chunk_len)
        if chunk_len >= T:
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        else:
            out = model(input_ids=ids[:, s:e], use_cache=True, logits_to_keep=1, **{name: cache})
            cache = getattr(out, name)
        yield s, e


def _check_ids(token_ids, *models) -> torch.Tensor:
    if not isinstance(token_ids, torch.Tensor) or token_ids.dtype != torch.long or token_ids.ndim != 2:
        raise TypeError("token_ids: expected a LongTensor [n_blocks, block_len], got "
                        f"{type(token_ids).__name__} {getattr(token_ids, 'dtype', '')} "
                        f"{tuple(getattr(token_ids, 'shape', ()))}")
    if token_ids.numel() == 0:
        raise ValueError("token_ids: no tokens to align on (empty text?)")
    for name, m in zip(("teacher", "student"), models):
        ids_in_vocab(token_ids, unwrap(m).get_input_embeddings().num_embeddings, "token_ids", f"the {name}'s")
    return token_ids


@contextlib.contextmanager
def _eval_mode(*models):
    """Models in eval mode for the duration, each restored to its own mode afterwards (also on error)."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def _advance(it, on: _Outputs, off: _Outputs):
    """One chunk of one model's forward, recorded only in that model's buffer."""
    on.active, off.active = True, False
    try:
        return next(it)
    finally:
        on.active = off.active = True


def _lockstep(t_iter, s_iter, tbuf: _Outputs, sbuf: _Outputs):
    """The (start, end) of each chunk after the teacher's and then the student's forward of it."""
    while True:
        try:
            span = _advance(t_iter, tbuf, sbuf)
        except StopIteration:
            return
        _advance(s_iter, sbuf, tbuf)
        yield span


@torch.no_grad()
def align(teacher, student, token_ids: torch.Tensor, *, layer_map: Sequence[int] | None = None,
          batch_size: int = 1, chunk_len: int | None = None, drop_first: int = 0,
          heatmap: bool = True, heatmap_tokens: int = 512, kernel: str | None = None,
          kernel_tokens: int = 2048, world: World | None = None, seed: int = 0,
          progress: bool = False) -> dict:
    """CKA between `student` and `teacher` hidden states of every decoder block on `token_ids`.

    token_ids: LongTensor [n_blocks, block_len]; blocks are sharded over `world`'s ranks.
    chunk_len: stream each block in chunks of this many tokens through the KV cache (None = whole block).
    drop_first: leave the first k positions of every block out (attention sinks carry massive
        activations that dominate CKA).
    heatmap: also accumulate minibatch CKA over all (student, teacher) block pairs, one minibatch per
        chunk of at most `heatmap_tokens` randomly chosen tokens.
    kernel: None, "linear" or "rbf": additionally the kernel CKA of every matched pair on a fixed
        subsample of `kernel_tokens` tokens (tiled kernel, never n x n in memory).
    Returns a JSON-able dict (per-layer CKA, mean CKA, heatmap, tokens used, timings). Under several
    ranks, linear CKA and the heatmap are reduced exactly across ranks; the kernel CKA is computed on
    each rank's own subsample (the main rank's is what `sdft align` writes). The models run in eval
    mode and get their own mode back afterwards.
    """
    from .cka import LinearCKA, MinibatchCKA

    token_ids = _check_ids(token_ids, teacher, student)
    batch_size = int_at_least(batch_size, "batch_size", 1)
    world = world or init_world()
    n_s, n_t = len(_layers(student)), len(_layers(teacher))
    layer_map = check_layer_map(layer_map, n_s, n_t)
    drop_first = int_at_least(drop_first, "drop_first", 0)  # 1.5 dropped 2 positions and reported 1
    if drop_first >= token_ids.shape[1]:
        raise ValueError(f"drop_first: expected 0 <= drop_first < block_len={token_ids.shape[1]}, "
                         f"got {drop_first}")
    if kernel not in (None, "linear", "rbf"):
        raise ValueError(f"kernel: expected None, 'linear' or 'rbf', got {kernel!r}")
    T = token_ids.shape[1]
    chunk_len = T if chunk_len is None else min(int_at_least(chunk_len, "chunk_len", 1), T)
    # The heatmap's minibatch CKA needs more than 3 tokens per chunk (unbiased HSIC; smaller chunks are left
    # out of it): at least one chunk must qualify, said before any work (not after every forward).
    if heatmap:
        heatmap_tokens = int_at_least(heatmap_tokens, "heatmap_tokens", 4)
        kept = max(max(0, min(s + chunk_len, T) - max(s, drop_first)) for s in range(0, T, chunk_len))
        per_chunk = min(batch_size, token_ids.shape[0]) * kept
        if per_chunk <= 3:
            raise ValueError(f"heatmap: minibatch CKA needs more than 3 tokens per chunk, but the largest chunk "
                             f"keeps {per_chunk} (batch_size x chunk tokens after drop_first); use larger chunks "
                             "or heatmap=False")
    if kernel is not None:
        kernel_tokens = int_at_least(kernel_tokens, "kernel_tokens", 4)  # fewer give a NaN CKA

    pairs = [(i, j) for i, j in enumerate(layer_map)]
    lin = LinearCKA(pairs=pairs)
    mb = MinibatchCKA() if heatmap else None
    ksamples: list[list[torch.Tensor]] = [[] for _ in pairs]  # (x, y) token subsamples for kernel CKA
    n_kernel = 0
    gen = torch.Generator().manual_seed(seed + world.rank)
    device = next(unwrap(student).parameters()).device

    rows = shard(token_ids.shape[0], world)
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    t0 = time.perf_counter()
    bar = _bar(len(batches), "align", progress)
    with _eval_mode(teacher, student), capture_layer_outputs(teacher) as tbuf, \
            capture_layer_outputs(student) as sbuf:
        for b in batches:
            ids = token_ids[b].to(device)
            t_iter, s_iter = _forward_chunks(teacher, ids, chunk_len), _forward_chunks(student, ids, chunk_len)
            for s, e in _lockstep(t_iter, s_iter, tbuf, sbuf):
                ys, xs = list(tbuf), list(sbuf)
                tbuf.clear(), sbuf.clear()
                pos = torch.arange(s, e, device=device)
                keep = (pos >= drop_first).expand(ids.shape[0], -1)
                if not keep.any():
                    continue
                lin.update(xs, ys, mask=keep)
                flat_idx = keep.reshape(-1).nonzero().squeeze(1)
                if mb is not None and flat_idx.numel() > 3:
                    sel = flat_idx[torch.randperm(flat_idx.numel(), generator=gen)[:heatmap_tokens].to(device)]
                    mb.update([x.reshape(-1, x.shape[-1])[sel] for x in xs],
                              [y.reshape(-1, y.shape[-1])[sel] for y in ys])
                if kernel is not None and n_kernel < kernel_tokens:
                    take = flat_idx[: kernel_tokens - n_kernel]
                    for p, (i, j) in enumerate(pairs):
                        ksamples[p].append((xs[i].reshape(-1, xs[i].shape[-1])[take].float().cpu(),
                                            ys[j].reshape(-1, ys[j].shape[-1])[take].float().cpu()))
                    n_kernel += take.numel()
                del xs, ys
            bar.update(1)
    bar.close()
    if world.is_distributed:
        lin.all_reduce()
        if mb is not None:
            mb.all_reduce()
    seconds = time.perf_counter() - t0

    cka = lin.compute().tolist()
    out = {
        "per_layer": [{"student_layer": i, "teacher_layer": j, "cka": c} for (i, j), c in zip(pairs, cka)],
        "cka": cka,
        "mean_cka": float(sum(cka) / len(cka)),
        "layer_map": layer_map,
        "tokens": int(lin.tokens),
        "blocks": int(token_ids.shape[0]),
        "block_len": int(T),
        "chunk_len": int(chunk_len),
        "drop_first": int(drop_first),
        "seconds": seconds,
    }
    if mb is not None:
        # rows: student blocks, columns: teacher blocks
        out["heatmap"] = mb.compute().tolist()
    if kernel is not None:
        from .cka import kernel_cka
        kc = []
        for p in range(len(pairs)):
            if n_kernel < 2:  # e.g. a rank whose shard held no block
                kc.append(float("nan"))
                continue
            x = torch.cat([a for a, _ in ksamples[p]])
            y = torch.cat([c for _, c in ksamples[p]])
            kc.append(float(kernel_cka(x.double(), y.double(), kernel=kernel)))
        out["kernel"] = {"kernel": kernel, "tokens": n_kernel, "cka": kc}
    return out


def _bar(total, desc, enabled):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


@torch.no_grad()
def measure_overhead(teacher, student, ids_1d: torch.Tensor, *, layer_map=None, chunk_len=None,
                     heatmap: bool = True, repeats: int = 2) -> dict:
    """Cost of alignment on one long sequence relative to the two models' own forward passes.

    Both timings run the same chunked forwards of teacher and student; the aligned one adds the hooks
    and the CKA updates. Median of `repeats` after one warm-up. overhead = aligned / plain - 1.
    """
    if not isinstance(ids_1d, torch.Tensor) or ids_1d.dtype != torch.long or ids_1d.dim() != 1:
        raise TypeError(f"ids_1d: expected a 1-d LongTensor (one sequence), got {type(ids_1d).__name__} "
                        f"{tuple(getattr(ids_1d, 'shape', ()))}")
    repeats = int_at_least(repeats, "repeats", 1)
    ids = ids_1d.reshape(1, -1)
    T = ids.shape[1]
    chunk = T if chunk_len is None else min(int_at_least(chunk_len, "chunk_len", 1), T)
    device = next(unwrap(student).parameters()).device
    ids = ids.to(device)

    def plain():
        for _ in _forward_chunks(teacher, ids, chunk):
            pass
        for _ in _forward_chunks(student, ids, chunk):
            pass

    def aligned():
        align(teacher, student, ids.cpu(), layer_map=layer_map, chunk_len=chunk, heatmap=heatmap)

    tp, ta = [], []
    with _eval_mode(teacher, student):  # both timings in eval mode (align's own), modes restored after
        plain(), aligned()  # warm-up
        for _ in range(repeats):  # interleaved, so load changes on a shared machine hit both alike
            t = time.perf_counter()
            plain()
            tp.append(time.perf_counter() - t)
            t = time.perf_counter()
            aligned()
            ta.append(time.perf_counter() - t)
    t_plain, t_align = sorted(tp)[len(tp) // 2], sorted(ta)[len(ta) // 2]
    return {"tokens": int(T), "chunk_len": int(chunk), "forward_s": t_plain, "align_s": t_align,
            "overhead": t_align / t_plain - 1.0, "heatmap": heatmap}
