"""Evaluation of the default model for training_record.json: held-out perplexity, n-gram baselines and
degradation sanity checks (2-bit round-to-nearest weights; two decoder blocks removed).

The degradation checks here are deliberately self-contained (plain PyTorch on a deep copy) so the
record does not depend on sdft_kernels.degrade; they only show that the model is sensitive to damage.
"""
from __future__ import annotations

import copy
import math
import time

import torch


def _windows(n: int, window: int, stride: int) -> list[tuple[int, int]]:
    """(start, newly scored targets) of each window over a sequence of n tokens; windows all have
    length min(window, n), advance by `stride`, and the last one ends at n."""
    w = min(window, n)
    out, prev_end, end = [], 1, w
    while True:
        out.append((end - w, end - prev_end))
        if end == n:
            return out
        prev_end, end = end, min(end + stride, n)


@torch.no_grad()
def sliding_window_ppl(model, seqs, window: int = 256, stride: int = 128, batch: int = 16) -> float:
    """Token-level perplexity over every token but the first of each sequence in `seqs` (1-D tensors):
    each token is scored once, with up to `window` tokens of context; windows advance by `stride` and
    only their newly reached tokens are scored. Windows of equal length are batched."""
    model.eval()
    if isinstance(seqs, torch.Tensor) and seqs.ndim == 1:
        seqs = [seqs]
    by_len: dict[int, list] = {}
    for seq in seqs:
        for st, new in _windows(seq.numel(), window, stride):
            by_len.setdefault(min(window, seq.numel()), []).append((seq, st, new))
    nll, count = 0.0, 0
    for length, jobs in by_len.items():
        for i in range(0, len(jobs), batch):
            group = jobs[i:i + batch]
            x = torch.stack([seq[st:st + length] for seq, st, _ in group])
            logits = model(input_ids=x).logits[:, :-1].float()
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
            for row, (_, _, new) in zip(losses, group):
                nll += float(row[-new:].sum())
                count += new
    assert count == sum(seq.numel() - 1 for seq in seqs)
    return math.exp(nll / count)


@torch.no_grad()
def rtn_quantized_copy(model, bits: int, group_size: int):
    """Copy of `model` whose decoder nn.Linear weights are symmetric round-to-nearest quantised per
    group of `group_size` input columns (embeddings and norms untouched)."""
    q = copy.deepcopy(model)
    qmax = 2 ** (bits - 1) - 1
    qmin = -(2 ** (bits - 1))
    for layer in q.model.layers:
        for mod in layer.modules():
            if isinstance(mod, torch.nn.Linear):
                w = mod.weight.data
                pad = (-w.shape[1]) % group_size  # a partial last group is padded with zeros
                g = torch.nn.functional.pad(w, (0, pad)).reshape(w.shape[0], -1, group_size)
                # GPTQ's symmetric grid: 2**bits levels (q - 2**(bits-1)) * scale, scale = 2*absmax/(2**bits-1)
                scale = g.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) * 2.0 / (2 ** bits - 1)
                g_q = torch.clamp(torch.round(g / scale), qmin, qmax) * scale
                mod.weight.data = g_q.reshape(w.shape[0], -1)[:, : w.shape[1]].contiguous()
    return q


@torch.no_grad()
def angular_distances(model, ids: torch.Tensor, n: int, window: int = 256) -> list[float]:
    """Mean angular distance arccos(cos(h_l, h_{l+n}))/pi over tokens, for every start layer l."""
    model.eval()
    blocks = ids[: (ids.numel() // window) * window].view(-1, window)[:8]
    hs = model(input_ids=blocks, output_hidden_states=True).hidden_states
    out = []
    for l in range(len(hs) - n):
        cos = torch.nn.functional.cosine_similarity(hs[l].float(), hs[l + n].float(), dim=-1)
        out.append(float((torch.arccos(cos.clamp(-1, 1)) / math.pi).mean()))
    return out


def drop_blocks_copy(model, start: int, n: int):
    q = copy.deepcopy(model)
    keep = [b for i, b in enumerate(q.model.layers) if not start <= i < start + n]
    q.model.layers = torch.nn.ModuleList(keep)
    q.config.num_hidden_layers = len(keep)
    for i, b in enumerate(keep):
        b.self_attn.layer_idx = i
    return q


def heldout_segments(ids: torch.Tensor, n_segments: int, seg_len: int) -> list[torch.Tensor]:
    """`n_segments` evenly spaced slices of `seg_len` tokens, so a small evaluation budget covers all
    held-out modules instead of the first one only."""
    if ids.numel() < n_segments * seg_len:
        raise ValueError(f"held-out text has {ids.numel()} tokens, fewer than {n_segments} x {seg_len}")
    step = ids.numel() // n_segments
    return [ids[k * step:k * step + seg_len] for k in range(n_segments)]


def evaluate_all(model, tokenizer, train_stream, splits, args, log) -> dict:
    from sdft_kernels.data import ngram_baselines

    t0 = time.time()
    ids = torch.tensor(tokenizer.backend_tokenizer.encode(splits["heldout"], add_special_tokens=False).ids)
    seg_len = 1024
    segs = heldout_segments(ids, max(1, args.eval_tokens // seg_len), seg_len)
    cal = torch.tensor(tokenizer.backend_tokenizer.encode(splits["calibration"], add_special_tokens=False).ids)
    window, stride = args.seq_len, args.seq_len // 2
    res = {"heldout_tokens_scored": sum(s.numel() - 1 for s in segs), "heldout_segments": len(segs),
           "segment_len": seg_len, "window": window, "stride": stride}
    res["heldout_ppl"] = sliding_window_ppl(model, segs, window, stride)
    log(f"held-out ppl {res['heldout_ppl']:.3f} on {res['heldout_tokens_scored']} tokens")
    res["baselines"] = ngram_baselines(train_stream.long().numpy(), torch.stack(segs).numpy(), len(tokenizer))
    log(f"baselines {res['baselines']}")
    degr = {}
    for bits, group in ((2, 64), (4, 128)):
        qm = rtn_quantized_copy(model, bits, group)
        degr[f"rtn_{bits}bit_g{group}"] = sliding_window_ppl(qm, segs, window, stride)
        log(f"RTN {bits}-bit g{group}: ppl {degr[f'rtn_{bits}bit_g{group}']:.3f}")
        del qm
    dist = angular_distances(model, cal, 2, window)
    start = min(range(len(dist)), key=dist.__getitem__)
    pm = drop_blocks_copy(model, start, 2)
    degr["drop_2_blocks"] = {"removed": [start, start + 1], "angular_distances": dist,
                             "ppl": sliding_window_ppl(pm, segs, window, stride)}
    log(f"drop blocks {start},{start + 1}: ppl {degr['drop_2_blocks']['ppl']:.3f}")
    res["degradation"] = degr
    res["eval_seconds"] = round(time.time() - t0, 1)
    return res
