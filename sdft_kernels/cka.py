"""Streaming CKA between the layers of two models, without storing activations.

- LinearCKA: exact linear CKA (Kornblith et al. 2019; biased, or debiased = unbiased HSIC) from
  streamed per-batch centred moments merged with Chan's parallel formula in float64. Memory O(d^2) per
  pair, independent of the number of tokens; merges exactly across batches, objects and processes.
- MinibatchCKA: Nguyen et al. 2021's minibatch CKA for every student x teacher layer pair: per batch the
  unbiased HSIC of U-centred b x b Grams, summed over batches.
- kernel_hsic / kernel_cka: HSIC/CKA with linear or RBF kernels over n tokens, tiled like flash
  attention: memory O(n + tile^2), never an n x n Gram.

Activations are [B, T, d] or [T, d] (float32/bfloat16/float16/float64); a bool mask [B, T] or [T]
(True = keep) drops padding and `drop_first` drops the first k positions of every sequence (attention
sinks carry "massive activations"). The GEMMs run in float32 (float64 when every layer is float64):
LinearCKA and MinibatchCKA read bf16/fp16 layers as they are and widen them as they shift them
(ops.cka.shift), with no float32 copy; kernel_hsic converts them to float32 once.
"""
from __future__ import annotations

import contextlib
import math
import operator
from typing import Sequence

import numpy as np
import torch

from .checks import int_at_least
from .ops import cka as _k

__all__ = ["LinearCKA", "MinibatchCKA", "kernel_hsic", "kernel_cka"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ----------------------------------------------------------------------------------------------- inputs
def _as_list(xs, name):
    if isinstance(xs, torch.Tensor):
        return [xs]
    if not isinstance(xs, (list, tuple)) or not xs:
        raise TypeError(f"{name}: expected a non-empty list of activation tensors, got {type(xs).__name__}")
    return list(xs)


def _keep_index(shape, mask, drop_first, device):
    """Flat indices of kept tokens for activations of leading shape [B, T] or [T], or None = keep all."""
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask: expected a bool tensor of shape {list(shape)}, got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        if tuple(mask.shape) != tuple(shape):
            raise ValueError(f"mask: expected shape {list(shape)} (the activations' tokens), got {list(mask.shape)}")
        keep = mask.to(device)
    elif drop_first == 0:
        return None
    else:
        keep = torch.ones(shape, dtype=torch.bool, device=device)
    if drop_first:
        keep = keep.clone()
        keep[..., :drop_first] = False
    return keep.reshape(-1).nonzero().squeeze(1)


def _tokens(acts: list, name: str, shape, idx, single=False):
    """Flatten each layer to [n_kept, d] (in its own dtype: bf16/fp16 are read as they are by the ops that
    follow), after validating it. Returns (features, float64 column sums, float64 max |x| per layer), all
    from one read (ops.cka.column_stats). Only kept tokens are checked for NaN/Inf (padding may hold
    anything): any NaN/Inf makes a column sum non-finite, so the check costs no extra pass."""
    out, sums, amax = [], [], []
    for i, a in enumerate(acts):
        label = name if single else f"{name}[{i}]"
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"{label}: expected a tensor, got {type(a).__name__}")
        if a.dtype not in _FLOATS:
            raise TypeError(f"{label}: expected float32/bfloat16/float16/float64, got {a.dtype}")
        if a.dim() not in (2, 3) or tuple(a.shape[:-1]) != tuple(shape):
            raise ValueError(f"{label}: expected shape {list(shape)} + [d] (the tokens of the first student "
                             f"layer), got {list(a.shape)}")
        if a.shape[-1] == 0:
            raise ValueError(f"{label}: expected at least one feature, got shape {list(a.shape)}")
        f = a.detach().reshape(-1, a.shape[-1])
        if idx is not None:
            f = f.index_select(0, idx)
        c, m = _k.column_stats(f)
        if not bool(torch.isfinite(c).all()):
            raise ValueError(f"{label}: activations contain NaN or Inf in kept tokens (or their sum "
                             f"overflows float64)")
        out.append(f)
        sums.append(c)
        amax.append(m)
    return out, sums, amax


def _prepare(xs, ys, mask, drop_first, names=("xs", "ys")):
    """(student features, teacher features, tokens n, shifts, max |x| per layer, working dtype): features
    [n, d] as given (flattened, masked), the shifts their column means in the working dtype (float64 if
    every layer is float64, else float32; the GEMMs' precision)."""
    single = names != ("xs", "ys")  # kernel_hsic's x / y: one tensor each
    xs, ys = _as_list(xs, names[0]), _as_list(ys, names[1])
    first = xs[0]
    if not isinstance(first, torch.Tensor) or first.dim() not in (2, 3):
        raise ValueError(f"{names[0] if single else 'xs[0]'}: expected a [B, T, d] or [T, d] tensor, got "
                         f"{list(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__}")
    shape = tuple(first.shape[:-1])
    idx = _keep_index(shape, mask, drop_first, first.device)
    (fx, sx, ax), (fy, sy, ay) = (_tokens(xs, names[0], shape, idx, single), _tokens(ys, names[1], shape, idx, single))
    devs = {t.device for t in fx + fy}
    if len(devs) > 1:
        raise ValueError(f"{names[0]}/{names[1]}: expected every layer on one device, got {sorted(map(str, devs))}")
    wdt = torch.float64 if all(t.dtype == torch.float64 for t in fx + fy) else torch.float32
    n = fx[0].shape[0]
    shifts = [(c / max(n, 1)).to(wdt) for c in sx + sy]
    return fx, fy, n, shifts, ax + ay, wdt


@contextlib.contextmanager
def _no_tf32(device):
    """Full-precision float32 GEMMs on CUDA whatever the user's global TF32 setting."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _shift(x, s, out):
    """(u, mean, r) for features x and a shift s (x's approximate column mean, in the working dtype):
    u = x - s, written into `out`, has small values that are exact (or nearly) in the working precision,
    so its GEMM loses nothing to the mean; r = mean(u) (float64 sums of u as written, in the same pass) is
    tiny and corrected exactly in float64 (C = u'u - n r r'); mean = s + r in float64. No float64 (or, for
    bf16/fp16 input, float32) copy of the features is made."""
    r = _k.shift(x, s, out) / max(x.shape[0], 1)
    return out, s.double() + r, r


def _check_products_fit(amax, shifts, n, names, dtype):
    """Refuse, before any state changes, a batch whose co-moment products could overflow the working
    dtype (float32 past 3.4e38 merged infinities into the accumulated state for good): an entry of
    u_a^T u_b sums n products of shifted features, each at most (max|x| + max|shift|)^2. One sync for all
    layers."""
    bounds = torch.stack(amax) + torch.stack([s.abs().max() for s in shifts]).double()
    for name, b in zip(names, bounds.tolist()):
        if n * b * b > torch.finfo(dtype).max / 8:
            raise ValueError(f"{name}: activations of magnitude {b:.3g} over {n} tokens can overflow the "
                             f"{dtype} co-moment products; pass float64 activations")


# Narrowest layer whose self-moment comes from the upper block triangle of GEMMs (narrower: one full
# GEMM), per device type. On the 2-core CPU the 8 row panels (36/64 of a full GEMM's flops) take ~0.7 of
# its time (10 vs 14.4 ms at d=768 and 2048 tokens on the AMD VM: the narrow GEMMs run a bit slower).
# On a GPU the panels are smaller GEMMs that may leave SMs idle (a 512-row panel of a 4096-wide layer at
# 2048 tokens is 64 output tiles of 128 x 128 for 132 SMs); that is not measured yet, so the GPU
# benchmark also times provider "ours(full self-moments)", which sets the CUDA entry past any width.
HALF_SELF_MOMENT_MIN_WIDTH = {"cpu": 256, "cuda": 256}


def _self_moment(u, blocks=8, out=None):
    """(m, upper): u^T u from the upper block triangle of GEMMs only (the result is symmetric): 36/64 of
    a full GEMM's flops with 8 column blocks (4 blocks, 10/16, were 30-40 ms slower over the 96
    self-moments of the 12-pair d=768 benchmark). upper=True means only m's upper triangle is valid
    (the rest of `out`, if given, is left as it was; the merge op then merges the upper triangle only).
    Layers narrower than HALF_SELF_MOMENT_MIN_WIDTH use one full GEMM."""
    d = u.shape[1]
    if out is None:
        out = torch.empty(d, d, dtype=u.dtype, device=u.device)
    if d < HALF_SELF_MOMENT_MIN_WIDTH.get(u.device.type, 256):
        return torch.mm(u.T, u, out=out), False
    w = -(-d // blocks)
    for i in range(0, d, w):
        torch.mm(u[:, i:i + w].T, u[:, i:], out=out[i:i + w, i:])  # written in place (row stride d)
    return out, True


def _single_process(group) -> bool:
    """True when all_reduce has no other rank to merge with: torch.distributed unavailable or not
    initialised (a process group passed explicitly must be usable)."""
    import torch.distributed as dist
    return group is None and not (dist.is_available() and dist.is_initialized())


def _from_upper(m):
    """The symmetric matrix whose upper triangle is m's (m's lower triangle is ignored)."""
    return torch.triu(m) + torch.triu(m, 1).mT


def _copies(tensors: dict) -> dict:
    return {k: None if t is None else t.clone() for k, t in tensors.items()}


def _scratch(cache: dict, shape, dtype, device):
    """A buffer of this shape kept in `cache` across calls: fresh large tensors are mmapped and faulted in
    page by page on every allocation, which costs more than the work done in them."""
    key = (tuple(shape), dtype, device)
    if key not in cache:
        cache[key] = torch.empty(shape, dtype=dtype, device=device)
    return cache[key]


def _resolve_pairs(pairs, nx, ny):
    if pairs == "diagonal":
        if nx != ny:
            raise ValueError(f"pairs='diagonal' needs as many student as teacher layers, got {nx} and {ny}")
        return [(i, i) for i in range(nx)]
    if pairs == "all":
        return [(i, j) for i in range(nx) for j in range(ny)]
    out = []
    for p in pairs:
        try:
            i, j = (operator.index(v) for v in p)
        except (TypeError, ValueError):
            raise ValueError(f"pairs: expected (student, teacher) index pairs of two ints, got {p!r}") from None
        if not (0 <= i < nx and 0 <= j < ny):
            raise ValueError(f"pairs: ({i}, {j}) is out of range for {nx} student and {ny} teacher layers")
        out.append((i, j))
    if not out:
        raise ValueError("pairs: expected at least one (student, teacher) layer pair")
    return out


def _shift_extras(S, g, h, C, tr_a, tr_b, n, da, db):
    """Re-centre the debiasing statistics of one part (n tokens) of a pair (A, B) from the part's own
    means to the merged means (da = part mean of A - merged mean, db likewise), exactly:
    S = sum_i a_i b_i, g = sum_i a_i v_i, h = sum_i b_i u_i with a_i = |u_i|^2, b_i = |v_i|^2 and u, v the
    centred features; C = sum_i u_i v_i^T, tr_a = sum_i a_i, tr_b = sum_i b_i (all of the part)."""
    ct_da, c_db = C.T @ da, C @ db
    dd, ee = da @ da, db @ db
    g2 = g + (tr_a + n * dd) * db + 2.0 * ct_da
    h2 = h + (tr_b + n * ee) * da + 2.0 * c_db
    S2 = S + 2.0 * (db @ g) + ee * tr_a + 2.0 * (da @ h) + 4.0 * (da @ c_db) + dd * tr_b + n * dd * ee
    return S2, g2, h2


class LinearCKA:
    """Exact streaming linear CKA between student and teacher layers.

    pairs: "diagonal" (student layer i vs teacher layer i), "all" (every student x teacher pair; memory
    d_i x d_j float64 per pair), or an explicit list of (student, teacher) index pairs.
    debiased: use the unbiased HSIC (Song et al. 2012; Kornblith et al. 2019's debiased CKA) instead of
    the biased one. It is computed in feature space from streamed, exactly re-centred statistics.
    drop_first: drop the first k positions of every sequence.

    Per batch each layer's features are shifted by their (rounded) batch mean and multiplied in the input
    precision (float32 for fp32/bf16/fp16; TF32 off), then merged into float64 centred co-moments with
    Chan's formula (csrc/common/cka_math.h). A layer's self-moment is shared by all pairs using it.
    Memory beyond the float64 state: the shifted copies of the layers in use at once (two for diagonal
    pairs; for "all", every teacher layer plus one student layer) and one d x d product, kept between
    updates as scratch so that a stream of batches allocates nothing new.
    """

    def __init__(self, pairs="diagonal", debiased: bool = False, drop_first: int = 0):
        if not (pairs in ("diagonal", "all") if isinstance(pairs, str) else isinstance(pairs, (list, tuple))):
            raise ValueError(f"pairs: expected 'diagonal', 'all' or a list of (i, j), got {pairs!r}")
        self._pairs_arg = pairs
        self.debiased = bool(debiased)
        self.drop_first = int_at_least(drop_first, "drop_first")
        self.reset()

    def reset(self):
        # explicit pairs are checked for form here (their range once the layer counts are known)
        self.pairs = None if isinstance(self._pairs_arg, str) else _resolve_pairs(self._pairs_arg, math.inf, math.inf)
        self.widths = None  # {"x": [d_i], "y": [d_j]}
        self.n = 0.0
        self.mean, self.mom, self.ext = {}, {}, {}
        self._stale = set()  # self-moment keys whose lower triangle lags (merged upper-only; see _symmetrise)
        self._raw_bufs = {}  # scratch for one batch's co-moment products, reused (not part of the state)
        self._pool = {}  # scratch: free shifted-feature buffers by (shape, dtype, device), reused across batches
        return self

    @property
    def tokens(self) -> int:
        """Number of tokens accumulated (after mask and drop_first)."""
        return int(self.n)

    def _keys(self):
        """(layers, co-moment keys). Keys are pair-major (a layer's self-moment just before the first pair
        using it), so update() can shift a layer when it is first needed and drop it after its last use."""
        layers = sorted({f"x{i}" for i, _ in self.pairs} | {f"y{j}" for _, j in self.pairs})
        moms = {}  # insertion-ordered set: a pair listed twice is accumulated once
        for i, j in self.pairs:
            moms.update(dict.fromkeys((f"x{i}|x{i}", f"y{j}|y{j}", f"x{i}|y{j}")))
        return layers, list(moms)

    def _resolve(self, fx, fy):
        widths = {"x": [t.shape[1] for t in fx], "y": [t.shape[1] for t in fy]}
        if self.widths is None:
            self.pairs = _resolve_pairs(self._pairs_arg if self.pairs is None else self.pairs, len(fx), len(fy))
            self.widths = widths
        elif widths != self.widths:
            raise ValueError(f"xs/ys: expected layers of widths {self.widths} as in earlier updates, got {widths}")

    def _width(self, key):
        return self.widths[key[0]][int(key[1:])]

    def update(self, xs, ys, mask=None):
        """Accumulate one batch: xs / ys lists of student / teacher activations ([B, T, d] or [T, d])."""
        fx, fy, n, means, amax, wdt = _prepare(xs, ys, mask, self.drop_first)
        self._resolve(fx, fy)
        if n == 0:
            return self
        _check_products_fit(amax, means, n, [f"xs[{i}]" for i in range(len(fx))] +
                            [f"ys[{j}]" for j in range(len(fy))], wdt)
        names = [f"x{i}" for i in range(len(fx))] + [f"y{j}" for j in range(len(fy))]
        feats, fmean = dict(zip(names, fx + fy)), dict(zip(names, means))
        layers, moms = self._keys()
        left = {a: sum(a in k.split("|") for k in moms) for a in layers}  # keys still to use each layer
        live, mean, r, ext, tr = {}, {}, {}, {}, {}
        self._pool = {key: bufs for key, bufs in self._pool.items() if key[0][0] == n}  # this batch's size

        def layer(a):  # the shifted features of layer a (formed on first use, into a pooled buffer)
            if a not in live:
                f = feats[a]
                u = self._take(f.shape, wdt, f.device)
                _, mean[a], r[a] = _shift(f, fmean[a], out=u)
                uc = sq = None
                if self.debiased:
                    uc = u.double() - r[a]
                    sq = (uc * uc).sum(1)
                    tr[a] = sq.sum()
                live[a] = (u, uc, sq)
            return live[a]

        # Each co-moment is formed just before it is merged, into one reused buffer per shape; a layer's
        # shifted copy lives from its first key to its last (two at a time for diagonal pairs), and no
        # buffer is allocated afresh per batch (fresh pages cost more to fault in than the subtraction).
        def raw(k):
            a, b = k.split("|")
            (ua, uca, sqa), (ub, ucb, sqb) = layer(a), layer(b)
            if self.debiased:
                ext[k] = (sqa @ sqb, ucb.T @ sqa, uca.T @ sqb)
            buf = _scratch(self._raw_bufs, (self._width(a), self._width(b)), ua.dtype, ua.device)
            out = _self_moment(ua, out=buf) if a == b else (torch.mm(ua.T, ub, out=buf), False)
            for c in {a, b}:
                left[c] -= 1
                if left[c] == 0:
                    u = live.pop(c)[0]
                    self._pool.setdefault((tuple(u.shape), u.dtype, u.device), []).append(u)
            return out

        with torch.no_grad(), _no_tf32(fx[0].device):
            self._merge(float(n), mean, raw, r, ext if self.debiased else None, tr, fx[0].device)
        return self

    def _symmetrise(self):
        """Mirror the upper triangles of the self-moments merged upper-only into their lower ones. Batches
        merge a wide layer's self-moment as its upper triangle alone (half the GEMM flops, and a merge
        along rows); everything that reads a whole accumulator calls this first, once, not per batch."""
        for k in self._stale:
            m = self.mom[k]
            m.copy_(_from_upper(m))
        self._stale.clear()

    def _take(self, shape, dtype, device):
        bufs = self._pool.get((tuple(shape), dtype, device))
        return bufs.pop() if bufs else torch.empty(shape, dtype=dtype, device=device)

    def _merge(self, n_q, mean_q, mom_q, r_q, ext_q, tr_q, dev):
        """Merge a part (n_q tokens; float64 means; co-moments about the shifts whose residuals are r_q,
        None = exactly centred; debiasing statistics ext_q with its traces tr_q) into self, on device dev.
        mom_q(k) returns (co-moment of key k, upper) with upper=True when only its upper triangle holds
        values; it is called once per key, in order, and the result is used before the next call. The
        dicts mean_q, r_q, ext_q and tr_q may be filled by mom_q itself: a layer's entries (a key's, for
        ext_q) must exist once mom_q has returned for the first key that uses it."""
        layers, moms = self._keys()
        if self.debiased:  # the debiasing statistics are re-centred with the whole accumulated moments
            self._symmetrise()
        n_p = self.n
        n = n_p + n_q
        if n_p == 0:
            for a in layers:
                self.mean[a] = torch.zeros(self._width(a), dtype=torch.float64, device=dev)
            for k in moms:
                a, b = k.split("|")
                self.mom[k] = torch.zeros(self._width(a), self._width(b), dtype=torch.float64, device=dev)
        new_mean = {}
        if self.debiased:  # traces of the accumulated self-moments, before any of them is updated
            zero = torch.zeros((), dtype=torch.float64, device=dev)
            tr_p = {a: torch.diagonal(self.mom[f"{a}|{a}"]).sum() for a in layers}
            new_ext = {}
        w = n_p * n_q / n
        for k in moms:
            a, b = k.split("|")
            raw, upper = mom_q(k)
            for c in (a, b):
                if c not in new_mean:
                    new_mean[c] = mean_q[c] if n_p == 0 else self.mean[c] + (n_q / n) * (mean_q[c] - self.mean[c])
            if self.debiased:
                cq = raw.double()
                if upper:
                    cq = _from_upper(cq)
                if r_q is not None:
                    cq = cq - n_q * torch.outer(r_q[a], r_q[b])
                sq = _shift_extras(*ext_q[k], cq, tr_q[a], tr_q[b], n_q, mean_q[a] - new_mean[a],
                                   mean_q[b] - new_mean[b])
                if n_p == 0:
                    new_ext[k] = sq
                else:  # self.mom[k] is still the accumulated part's co-moment here
                    sp = _shift_extras(*self.ext[k], self.mom[k], tr_p[a], tr_p[b], n_p,
                                       self.mean[a] - new_mean[a], self.mean[b] - new_mean[b])
                    new_ext[k] = tuple(p + q for p, q in zip(sp, sq))
                new_ext[k] = (new_ext[k][0] + zero, *new_ext[k][1:])
            rx = r_q[a] if r_q is not None else torch.zeros_like(mean_q[a])
            ry = r_q[b] if r_q is not None else torch.zeros_like(mean_q[b])
            raw = raw if raw.dtype in (torch.float32, torch.float64) else raw.float()
            _k.comoment_merge_(self.mom[k], raw.contiguous(), rx, ry, n_q, self.mean[a] - mean_q[a],
                               self.mean[b] - mean_q[b], w, upper)
            if upper:
                self._stale.add(k)
        if self.debiased:
            self.ext = new_ext
        self.mean = new_mean
        self.n = n

    def _hsic_terms(self, k):
        """Unnormalised HSIC of the pair k: ||C||_F^2 (biased) or n(n-3) x unbiased HSIC (debiased)."""
        c = self.mom[k].reshape(-1)
        f2 = torch.dot(c, c)  # no d x d temporary
        if not self.debiased:
            return f2
        a, b = k.split("|")
        n = self.n
        S = self.ext[k][0]
        tra = torch.diagonal(self.mom[f"{a}|{a}"]).sum()
        trb = torch.diagonal(self.mom[f"{b}|{b}"]).sum()
        return (f2 - S + tra * trb / ((n - 1) * (n - 2)) - 2.0 * S / (n - 2)) / (n * (n - 3))

    def compute(self) -> torch.Tensor:
        """CKA per pair (float64 [P], in `pairs` order). Debiased CKA is NaN where a self-HSIC is <= 0."""
        if self.n == 0:
            raise RuntimeError("LinearCKA.compute: no tokens accumulated yet (call update first)")
        if self.debiased and self.n <= 3:
            raise RuntimeError(f"LinearCKA.compute: the debiased estimator needs more than 3 tokens, got {self.tokens}")
        self._symmetrise()
        h = {k: self._hsic_terms(k) for k in self._keys()[1]}  # each self-HSIC once, however many pairs use it
        out = []
        for i, j in self.pairs:
            xy, xx, yy = h[f"x{i}|y{j}"], h[f"x{i}|x{i}"], h[f"y{j}|y{j}"]
            out.append(xy / torch.sqrt(xx * yy) if (xx * yy) > 0 else xy * float("nan"))
        return torch.stack(out).cpu()

    def results(self) -> list:
        """Per pair: {"student": i, "teacher": j, "cka": float, "tokens": int} (JSON-able)."""
        vals = self.compute().tolist()
        return [{"student": i, "teacher": j, "cka": v, "tokens": self.tokens} for (i, j), v in zip(self.pairs, vals)]

    # ---- exact merging across objects and processes
    def state_dict(self) -> dict:
        """A snapshot (copies: the accumulators are updated in place by later updates)."""
        self._symmetrise()
        return {"pairs": self.pairs, "widths": self.widths, "debiased": self.debiased,
                "drop_first": self.drop_first, "n": self.n, "mean": _copies(self.mean), "mom": _copies(self.mom),
                "ext": {k: [t.clone() for t in v] for k, v in self.ext.items()}}

    def load_state_dict(self, state: dict):
        self.pairs = [tuple(p) for p in state["pairs"]] if state["pairs"] is not None else None
        self.widths, self.debiased = state["widths"], bool(state["debiased"])
        self.drop_first, self.n = int(state["drop_first"]), float(state["n"])
        self.mean, self.mom = _copies(state["mean"]), _copies(state["mom"])
        self._stale = set()
        self.ext = {k: tuple(t.clone() for t in v) for k, v in state["ext"].items()}
        return self

    def _compatible(self, other):
        if not isinstance(other, LinearCKA):
            raise TypeError(f"other: expected a LinearCKA, got {type(other).__name__}")
        if other.debiased != self.debiased or other.drop_first != self.drop_first:
            raise ValueError(f"other: expected debiased={self.debiased}, drop_first={self.drop_first}, got "
                             f"{other.debiased}, {other.drop_first}")
        if other.widths is None:
            return
        # a fresh object checks its own pairs argument against other's layer counts
        pairs = self.pairs if self.pairs is not None else _resolve_pairs(
            self._pairs_arg, len(other.widths["x"]), len(other.widths["y"]))
        if other.pairs != pairs or (self.widths is not None and other.widths != self.widths):
            raise ValueError(f"other: expected pairs {pairs} and widths {self.widths or other.widths}, got "
                             f"{other.pairs} and {other.widths}")

    def merge(self, other: "LinearCKA"):
        """Fold another accumulator (same pairs and widths) into this one, exactly (Chan's formula)."""
        self._compatible(other)
        if other.n == 0:
            return self
        self._symmetrise()
        other._symmetrise()
        if self.widths is None:
            self.pairs, self.widths = list(other.pairs), other.widths
        tr = ({a: torch.diagonal(other.mom[f"{a}|{a}"]).sum() for a in other.mean} if self.debiased else None)
        self._merge(other.n, other.mean, lambda k: (other.mom[k], False), None,
                    other.ext if self.debiased else None, tr, next(iter(other.mean.values())).device)
        return self

    def _flat(self):
        self._symmetrise()
        layers, moms = self._keys()
        parts = [self.mean[a] for a in layers] + [self.mom[k].reshape(-1) for k in moms]
        if self.debiased:
            for k in moms:
                parts += [self.ext[k][0].reshape(1), self.ext[k][1], self.ext[k][2]]
        return torch.cat([p.reshape(-1) for p in parts])

    def _from_flat(self, flat, n):
        part = LinearCKA(self.pairs, self.debiased, self.drop_first)
        part.widths, part.n = self.widths, n
        layers, moms = self._keys()
        off = 0

        def take(*shape):
            nonlocal off
            size = math.prod(shape)
            t = flat[off:off + size].reshape(shape)
            off += size
            return t
        part.mean = {a: take(self._width(a)) for a in layers}
        part.mom = {k: take(self._width(k.split("|")[0]), self._width(k.split("|")[1])) for k in moms}
        if self.debiased:
            for k in moms:
                a, b = k.split("|")
                part.ext[k] = (take(1)[0], take(self._width(b)), take(self._width(a)))
        return part

    def all_reduce(self, group=None):
        """Replace this rank's state by the exact merge of every rank's state (torch.distributed).
        Each rank's float64 (n, means, co-moments) is gathered and Chan-merged in rank order, so every
        rank ends with bit-identical results, equal to a single process seeing all tokens. Without an
        initialised process group (a plain single-process run) there is nothing to merge: a no-op, so
        one script serves both."""
        import torch.distributed as dist
        if _single_process(group):
            return self
        world = dist.get_world_size(group)
        metas = [None] * world
        dist.all_gather_object(metas, (self.pairs, self.widths, (self.debiased, self.drop_first), self.n),
                               group=group)
        full = [m for m in metas if m[3] > 0]
        if not full:
            return self
        for m in full:
            if (m[0], m[1], m[2]) != (full[0][0], full[0][1], full[0][2]):
                raise ValueError(f"all_reduce: ranks disagree on pairs/widths/(debiased, drop_first): "
                                 f"{full[0][:3]} vs {m[:3]}")
        if self.n == 0:
            self.pairs, self.widths = [tuple(p) for p in full[0][0]], full[0][1]
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
        mine = self._flat().to(dev) if self.n > 0 else None
        if mine is None:
            size = self.__class__(self.pairs, self.debiased)._zero_like(self).numel()
            mine = torch.zeros(size, dtype=torch.float64, device=dev)
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine, group=group)
        pairs, widths = self.pairs, self.widths
        self.reset()
        self.pairs, self.widths = pairs, widths
        for m, flat in zip(metas, gathered):
            if m[3] > 0:
                self.merge(self._from_flat(flat, m[3]))
        return self

    def _zero_like(self, ref):
        """A flat zero state with ref's layout (for a rank that saw no tokens)."""
        self.widths, self.pairs = ref.widths, ref.pairs
        layers, moms = self._keys()
        size = sum(self._width(a) for a in layers)
        size += sum(self._width(k.split("|")[0]) * self._width(k.split("|")[1]) for k in moms)
        if self.debiased:
            size += sum(1 + self._width(k.split("|")[0]) + self._width(k.split("|")[1]) for k in moms)
        return torch.zeros(size, dtype=torch.float64)


class MinibatchCKA:
    """Minibatch CKA (Nguyen et al. 2021) for every student x teacher layer pair.

    Each update() is one minibatch of b tokens (after mask/drop_first; b > 3 is required by the unbiased
    HSIC): every layer's b x b linear Gram of its centred features is U-centred by a fused kernel
    (csrc/cpu/cka_moments.cpp), and all student x teacher unbiased HSICs come from one
    (L_x x b^2)(b^2 x L_y) product, accumulated in float64 across batches.
    compute() -> float64 [L_x, L_y] with CKA_ij = sum HSIC_ij / sqrt(sum HSIC_ii sum HSIC_jj).

    The unbiased HSIC of a batch can be negative (it is an unbiased estimate of a non-negative quantity);
    sums are kept signed. A layer whose summed self-HSIC is <= 0 (e.g. constant features) gets NaN CKA.
    The value depends on the batch size b (it estimates a population CKA; it is not the full-data CKA).
    """

    def __init__(self, drop_first: int = 0, chunk: int = 64):
        self.drop_first = int_at_least(drop_first, "drop_first")
        self.chunk = int_at_least(chunk, "chunk", minimum=1)
        self.reset()

    def reset(self):
        self.hxy = self.hxx = self.hyy = None
        self.batches, self.n = 0, 0
        # Scratch of the latest batch size b (not part of the state): the [L, b, b] Grams and one centred
        # [b, d] layer per width. A fresh Gram stack per batch faulted in L b^2 new pages each time (a
        # tenth of the update's time at L=24, b=1024 on CPU).
        self._bufs = {}
        return self

    @property
    def tokens(self) -> int:
        return int(self.n)

    def update(self, xs, ys, mask=None):
        fx, fy, b, means, _, wdt = _prepare(xs, ys, mask, self.drop_first)
        if b <= 3:
            raise ValueError(f"xs: minibatch CKA needs more than 3 tokens per batch (unbiased HSIC), got {b} "
                             "after mask/drop_first")
        if self.hxy is not None and self.hxy.shape != (len(fx), len(fy)):
            raise ValueError(f"xs/ys: expected {tuple(self.hxy.shape)} layers as in earlier updates, got "
                             f"({len(fx)}, {len(fy)})")
        nx = len(fx)
        dev = fx[0].device
        self._bufs = {b: self._bufs.get(b, {})}  # drop the buffers of other batch sizes
        bufs = self._bufs[b]
        with torch.no_grad(), _no_tf32(dev):
            grams = _scratch(bufs, (nx + len(fy), b, b), wdt, dev)
            upper = b >= 256  # symmetric Grams from the upper block triangle only
            w = -(-b // (4 if b >= 512 else 2))  # 4 row blocks: 10/16 of the flops, 2: 3/4
            for i, (t, mu) in enumerate(zip(fx + fy, means)):
                # centring is not needed by U-centring; it conditions the Gram. Twice: the second pass takes
                # out the rounding of the first mean, so a constant feature centres to exactly 0 (its
                # residue would otherwise give a tiny, meaningless Gram and a finite "CKA")
                u, _, r = _shift(t, mu, out=_scratch(bufs, t.shape, wdt, dev))
                u.sub_(r.to(wdt))
                if upper:
                    for r0 in range(0, b, w):
                        torch.mm(u[r0:r0 + w], u[r0:].T, out=grams[i, r0:r0 + w, r0:])  # in place
                else:
                    torch.mm(u, u.T, out=grams[i])
            uc = _k.ucentre_(grams, upper)  # in the kept buffer
            # All inner products <U(K_i), U(K_j)> from one (L x b^2)(b^2 x L) product, split over row chunks
            # (views, no copies): each chunk's GEMM runs in the working precision, chunks add in float64.
            nl = nx + len(fy)
            h = torch.zeros(nl, nl, dtype=torch.float64, device=dev)
            for r0 in range(0, b, self.chunk):
                c = uc[:, r0:r0 + self.chunk].reshape(nl, -1)
                h += torch.mm(c, c.T).double()
            if not bool(torch.isfinite(h).all()):
                raise ValueError(f"xs/ys: the batch's Gram products overflow {wdt} (features of magnitude "
                                 "~1e9 or more?); pass float64 activations")
            hxy, hs = h[:nx, nx:], torch.diagonal(h)
            scale = 1.0 / (b * (b - 3.0))
            hxy, hs = (hxy * scale).cpu(), (hs * scale).cpu()
        if self.hxy is None:
            self.hxy, self.hxx, self.hyy = hxy, hs[:nx].clone(), hs[nx:].clone()
        else:
            self.hxy += hxy
            self.hxx += hs[:nx]
            self.hyy += hs[nx:]
        self.batches += 1
        self.n += b
        return self

    def compute(self) -> torch.Tensor:
        if self.hxy is None:
            raise RuntimeError("MinibatchCKA.compute: no batches accumulated yet (call update first)")
        ok = (self.hxx[:, None] > 0) & (self.hyy[None, :] > 0)
        return torch.where(ok, self.hxy / torch.sqrt((self.hxx[:, None] * self.hyy[None, :]).clamp_min(0)),
                           float("nan"))  # NaN where a self-HSIC <= 0

    def state_dict(self) -> dict:
        """A snapshot (copies: the sums are updated in place by later updates)."""
        h = _copies({"hxy": self.hxy, "hxx": self.hxx, "hyy": self.hyy})
        return {**h, "batches": self.batches, "n": self.n, "drop_first": self.drop_first}

    def load_state_dict(self, state: dict):
        h = _copies({k: state[k] for k in ("hxy", "hxx", "hyy")})
        self.hxy, self.hxx, self.hyy = h["hxy"], h["hxx"], h["hyy"]
        self.batches, self.n, self.drop_first = int(state["batches"]), int(state["n"]), int(state["drop_first"])
        return self

    def merge(self, other: "MinibatchCKA"):
        if not isinstance(other, MinibatchCKA):
            raise TypeError(f"other: expected a MinibatchCKA, got {type(other).__name__}")
        if other.drop_first != self.drop_first:
            raise ValueError(f"other: expected drop_first={self.drop_first}, got {other.drop_first}")
        if other.hxy is None:
            return self
        if self.hxy is None:
            self.hxy, self.hxx, self.hyy = other.hxy.clone(), other.hxx.clone(), other.hyy.clone()
        elif self.hxy.shape != other.hxy.shape:
            raise ValueError(f"other: expected {tuple(self.hxy.shape)} layer pairs, got {tuple(other.hxy.shape)}")
        else:
            self.hxy += other.hxy
            self.hxx += other.hxx
            self.hyy += other.hyy
        self.batches += other.batches
        self.n += other.n
        return self

    def all_reduce(self, group=None):
        """Sum the per-batch HSIC sums of every rank (the estimator is a plain sum over batches); a no-op
        without an initialised process group."""
        import torch.distributed as dist
        if _single_process(group):
            return self
        world = dist.get_world_size(group)
        metas = [None] * world
        shape = None if self.hxy is None else tuple(self.hxy.shape)
        dist.all_gather_object(metas, (shape, self.drop_first), group=group)
        if len({m[1] for m in metas}) > 1:
            raise ValueError(f"all_reduce: ranks disagree on drop_first: {sorted({m[1] for m in metas})}")
        shapes = {m[0] for m in metas if m[0] is not None}
        if not shapes:
            return self
        if len(shapes) > 1:
            raise ValueError(f"all_reduce: ranks disagree on the layer counts: {sorted(shapes)}")
        nx, ny = shapes.pop()
        if self.hxy is None:
            self.hxy, self.hxx, self.hyy = torch.zeros(nx, ny, dtype=torch.float64), torch.zeros(
                nx, dtype=torch.float64), torch.zeros(ny, dtype=torch.float64)
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
        flat = torch.cat([self.hxy.reshape(-1), self.hxx, self.hyy,
                          torch.tensor([self.batches, self.n], dtype=torch.float64)]).to(dev)
        dist.all_reduce(flat, group=group)
        flat = flat.cpu()
        self.hxy = flat[:nx * ny].reshape(nx, ny).clone()
        self.hxx, self.hyy = flat[nx * ny:nx * ny + nx].clone(), flat[nx * ny + nx:nx * ny + nx + ny].clone()
        self.batches, self.n = int(flat[-2]), int(flat[-1])
        return self


# ----------------------------------------------------------------------------- long-sequence kernel HSIC
def _median_d2(x: torch.Tensor, pilot: int = 1024, seed: int = 0) -> float:
    """Median pairwise squared Euclidean distance on a fixed pilot subsample (numpy default_rng(seed), the
    same rows as sdft_kernels.reference.cka.median_sigma); 0 for fewer than 2 tokens."""
    n = x.shape[0]
    if n > pilot:
        idx = np.sort(np.random.default_rng(seed).choice(n, size=pilot, replace=False))
        x = x[torch.from_numpy(idx).to(x.device)]
    x = x.detach().double()
    sq = (x * x).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0)
    iu = torch.triu_indices(x.shape[0], x.shape[0], 1, device=x.device)
    # NumPy's median convention (mean of the two middle values; torch's median takes the lower one)
    vals = d2[iu[0], iu[1]].cpu().numpy()
    return float(np.median(vals)) if vals.size else 0.0


def _median_sigma(x: torch.Tensor) -> float:
    """The median heuristic's RBF bandwidth: the median pairwise distance on the pilot subsample."""
    sigma = math.sqrt(_median_d2(x))
    if not sigma > 0:
        raise ValueError("sigma: the median heuristic found a zero median distance (constant features); "
                         "pass sigma explicitly")
    return sigma


def _exact_mean(x, s, block_elems=1 << 20):
    """Column mean of x [n, d] in x's dtype, as s + mean(x - s) accumulated in float64 over row blocks (no
    copy of x): the rounding of the first estimate s is taken out, so a constant feature centres to
    exactly 0 (its residue would otherwise give a tiny, meaningless linear kernel and a finite "CKA")."""
    r = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    rows = max(1, block_elems // max(1, x.shape[1]))  # temporaries of ~1M elements (16384 rows were 48 MiB)
    for r0 in range(0, x.shape[0], rows):
        r += (x[r0:r0 + rows] - s).sum(0, dtype=torch.float64)
    return (s.double() + r / max(x.shape[0], 1)).to(x.dtype)


def _kernel_inputs(x, y, kernel, sigma, tile, mask, unbiased):
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name}: expected a [n, d] tensor, got "
                             f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name}: expected float32/bfloat16/float16/float64, got {t.dtype}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"y: expected {x.shape[0]} tokens (rows) like x, got {y.shape[0]}")
    if kernel not in _k.KERNELS:
        raise ValueError(f"kernel: expected 'linear' or 'rbf', got {kernel!r}")
    tile = None if tile is None else int_at_least(tile, "tile", minimum=1)
    fx, fy, n, (mx, my), _, wdt = _prepare([x], [y], mask, 0, names=("x", "y"))
    x, y = fx[0].to(wdt), fy[0].to(wdt)
    need = 3 if unbiased else 1
    if n <= need:
        raise ValueError(f"x: the {'unbiased' if unbiased else 'biased'} HSIC needs more than {need} tokens, got {n}")
    sig = tuple(sigma) if isinstance(sigma, (tuple, list)) else (sigma, sigma)
    if len(sig) != 2:
        raise ValueError(f"sigma: expected a float, None or a pair (sigma_x, sigma_y), got {sigma!r}")
    gammas, minus_one = [0.0, 0.0], [False, False]
    if kernel == "rbf":
        for i, (s, t) in enumerate(zip(sig, (x, y))):
            if s is None:  # the median heuristic's 1024-token pilot; sigma^2 is the median squared distance
                s = _median_sigma(t)
                med = s * s
            else:  # only the rough size of the distances is needed below: their mean square, 2 sum var,
                # over <= ~1024 strided rows (var over all of them copied the whole [n, d] tensor)
                med, s = 2.0 * float(t[::max(1, t.shape[0] // 1024)].var(dim=0).sum()), float(s)
            s2 = s * s if math.isfinite(s) and s > 0 else 0.0
            gammas[i] = 0.5 / s2 if 0 < s2 < math.inf else 0.0
            if not gammas[i] > 0:
                raise ValueError(f"sigma: expected a positive, finite RBF bandwidth (with 1 / (2 sigma^2) > 0), "
                                 f"got {s}")
            # Most kernel values near 1 (typical value above 1/2, as under the median heuristic's exp(-1/2)): the
            # Gram is formed as K - 1, whose digits survive where 1 - eps rounds them away (HSIC is the same).
            minus_one[i] = gammas[i] * med < math.log(2.0)
    mx, my = _exact_mean(x, mx), _exact_mean(y, my)
    # Centred by the op (float64 means rounded to the working dtype, subtracted tile by tile): exact for
    # both kernels' HSIC, and keeps dot products / distances well conditioned in float32 for activations
    # with large means, without a centred copy of x and y.
    # Default tile: 256 tokens on CPU (two tiles per thread stay in cache); 4096 on CUDA, where each tile's
    # GEMM must fill the device (tiles of 2 x 64 MiB in float32).
    tile = tile or (4096 if x.device.type == "cuda" else 256)
    return x.contiguous(), y.contiguous(), mx.to(x.dtype), my.to(y.dtype), n, gammas, minus_one, tile


def _kernel_stats(x, y, kernel, sigma, unbiased, tile, mask):
    x, y, sx, sy, n, (gx, gy), (m1x, m1y), tile = _kernel_inputs(x, y, kernel, sigma, tile, mask, unbiased)
    with torch.no_grad(), _no_tf32(x.device):
        sums, rows, diag = _k.kernel_hsic_stats(x, y, kernel, gx, gy, tile, sx, sy, m1x, m1y)
    sums, rows, diag = sums.cpu(), rows.cpu(), diag.cpu()
    # The op leaves the diagonals out: that is the unbiased estimator's K~; the biased one adds them back.
    if not unbiased:
        rows = rows + diag
        sums = sums + torch.stack([(diag[0] * diag[1]).sum(), (diag[0] ** 2).sum(), (diag[1] ** 2).sum()])
    rk, rl = rows[0], rows[1]
    sk, sl = rk.sum(), rl.sum()
    f = _hsic_u if unbiased else _hsic_b
    out = (f(sums[0], rk @ rl, sk, sl, n), f(sums[1], rk @ rk, sk, sk, n), f(sums[2], rl @ rl, sl, sl, n))
    if not all(map(math.isfinite, out)):
        raise ValueError(f"x/y: the kernel sums overflow {x.dtype} (features of magnitude ~1e9 or more?); "
                         "pass float64 activations")
    return out


def _hsic_u(kl, rkl, sk, sl, n):  # Song et al. 2012 (same formula as cka_math.h hsic_unbiased)
    return float((kl + sk * sl / ((n - 1.0) * (n - 2.0)) - 2.0 / (n - 2.0) * rkl) / (n * (n - 3.0)))


def _hsic_b(kl, rkl, sk, sl, n):  # Gretton et al. 2005: tr(KHLH)/(n-1)^2
    return float((kl - 2.0 / n * rkl + sk * sl / (n * n)) / ((n - 1.0) ** 2))


def kernel_hsic(x, y, kernel: str = "linear", sigma=None, unbiased: bool = False, tile=None, mask=None) -> float:
    """HSIC between the token sets x [n, d] and y [n, e] with a linear or RBF kernel, computed tile by
    tile (memory O(n + tile^2)). sigma: RBF bandwidth (float, or (sigma_x, sigma_y)); None = median
    heuristic on a fixed 1024-token pilot subsample. unbiased: Song et al.'s estimator (else
    Gretton's biased tr(KHLH)/(n-1)^2). tile: tokens per tile (default 256 on CPU, 4096 on CUDA). mask:
    bool [n]."""
    return _kernel_stats(x, y, kernel, sigma, unbiased, tile, mask)[0]


def kernel_cka(x, y, kernel: str = "linear", sigma=None, unbiased: bool = False, tile=None, mask=None) -> float:
    """CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with kernel_hsic's options, all three from one tiled
    pass. NaN if an unbiased self-HSIC is <= 0."""
    xy, xx, yy = _kernel_stats(x, y, kernel, sigma, unbiased, tile, mask)
    return xy / math.sqrt(xx * yy) if xx * yy > 0 else float("nan")
