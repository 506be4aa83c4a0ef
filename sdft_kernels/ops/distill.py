"""Fused distillation divergence: typed wrappers over torch.ops.sdft_kernels.distill_dense / distill_topk,
with their fake (meta) and autograd registrations.

Conventions (s = student_logits / T, u = teacher_logits / T, q = softmax(s), p = softmax(u)):
  forward_kl   KL(p || q) = sum p (log p - log q)          d/ds_j = q_j - p_j
  reverse_kl   KL(q || p) = sum q (log q - log p)          d/ds_j = q_j (log q_j - log p_j - KL)
  jsd          m = beta p + (1 - beta) q (TRL GKD convention)
               beta KL(p || m) + (1 - beta) KL(q || m)    d/ds_j = (1 - beta) q_j (log q_j - log m_j - KL(q||m))
               beta = 0 is forward KL and beta = 1 reverse KL, as in TRL (the mixture formula is 0 there).
The gradient with respect to the raw student logits is the above times 1/T. 0 log 0 = 0, so -inf logits
(a masked vocabulary entry) are fine where both sides are -inf; a teacher entry of -inf where the
student has mass makes reverse KL infinite (and forward KL likewise the other way round), as the math says.
The teacher never gets a gradient. The loss is float32 (float64 for float64 logits) whatever the
logits' dtype; the gradient is produced by the forward kernel in the logits' dtype and backward only
scales it (in place in eager mode, so the extra memory is one gradient buffer; backward therefore runs
once per forward: retain_graph=True is refused with a clear error, except for float64). Double backward
(create_graph=True) is refused too: the kernel gives first derivatives only. torch.func's grad, jacrev
and jvp, and forward-mode dual tensors, are refused by name (use torch.autograd.grad); torch.vmap of the
forward works.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.autograd.forward_ad as fwAD

__all__ = ["distill_loss", "distill_loss_topk", "DIVERGENCES", "REDUCTIONS"]

DIVERGENCES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
REDUCTIONS = ("none", "sum", "mean", "batchmean")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------- registrations
def _fake(student_logits, *args):
    compute_grad = args[-1]
    n, v = student_logits.shape
    loss_dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    loss = student_logits.new_empty((n,), dtype=loss_dtype)
    grad = student_logits.new_empty((n, v) if compute_grad else (0, 0))
    return loss, grad


torch.library.register_fake("sdft_kernels::distill_dense")(_fake)
torch.library.register_fake("sdft_kernels::distill_topk")(_fake)


@torch.library.register_fake("sdft_kernels::distill_dense_inplace_")
def _fake_inplace(student_logits, *args):
    return _fake(student_logits, *args, False)[0]


def _setup_context(ctx, inputs, output):
    _, grad = output
    ctx.save_for_backward(grad)
    ctx.used = False
    # The gradient output gets no incoming gradient: without this autograd would materialise an
    # N x V zero tensor for it in backward (a second gradient-sized buffer).
    ctx.set_materialize_grads(False)


def _setup_context_dense(ctx, inputs, output):
    _, grad = output
    ctx.save_for_backward(grad, inputs[3])  # inputs[3]: row_weight (or None)
    ctx.used = False
    ctx.set_materialize_grads(False)  # see _setup_context


def check_not_reused(ctx):
    if getattr(ctx, "used", False):
        raise RuntimeError("distill: backward through the same distillation loss twice (retain_graph=True) "
                           "is not supported for float32/bfloat16/float16 logits: the saved gradient buffer "
                           "is scaled in place to save memory; recompute the loss instead (float64 logits, "
                           "the checking dtype, allow it)")


def traced(t: torch.Tensor) -> bool:
    """True under any tracing (dynamo, AOT autograd, make_fx), where mutating a saved tensor or reading a
    value would not be invisible to the graph machinery."""
    if torch.compiler.is_compiling() or type(t) is not torch.Tensor:
        return True
    from torch.fx.experimental.proxy_tensor import get_proxy_mode
    return get_proxy_mode() is not None


def check_once_differentiable(t: torch.Tensor, name: str):
    """The kernels produce the first derivative only: refuse create_graph=True (eager) rather than return
    a gradient whose own derivative would silently be wrong."""
    if torch.is_grad_enabled() and not traced(t):
        raise RuntimeError(f"{name}: double backward (create_graph=True) is not supported; the gradient "
                           "comes from the fused kernel and has no derivative of its own")


def _plain_eager(t: torch.Tensor) -> bool:
    """True outside any tracing, for a gradient buffer only autograd holds: only then is mutating it
    invisible."""
    return not traced(t) and _private(t)


def _private(t: torch.Tensor) -> bool:
    """True when nobody but autograd holds the op's gradient output (our wrappers drop it): then scaling
    it in place is invisible. A caller of the raw op that kept the output sees one more storage
    reference, and gets an out-of-place result instead (also when the count cannot be read)."""
    try:
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata) <= _PRIVATE_USE_COUNT
    except (AttributeError, RuntimeError):
        return False


_PRIVATE_USE_COUNT = 3  # saved variable + unpacked tensor + the autograd graph's own reference


def scale_saved_grad(ctx, grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """grad * grad_loss[:, None] in grad's dtype (the scale multiplies in float32). In eager mode the
    saved buffer is scaled in place (no second N x V tensor); under torch.compile, and for float64
    (the gradcheck dtype, which backpropagates several times through one graph), out of place."""
    if grad.numel() == 0 and grad_loss.numel() != 0:
        raise RuntimeError("distill: backward reached an op that was run without computing its gradient "
                           "(student_logits did not require grad when the loss was computed)")
    scale = grad_loss.reshape(-1, 1).to(torch.float64 if grad.dtype == torch.float64 else torch.float32)
    if grad.dtype == torch.float64 or not _plain_eager(grad):
        return (grad * scale).to(grad.dtype)
    ctx.used = True
    if scale.numel() and bool((scale == scale[0]).all()):
        # One scale for every row (the scalar reductions): a Python float multiplies bf16/fp16 in float32
        # element by element; a float32 tensor operand would make a float32 copy of the whole gradient.
        return grad.mul_(float(scale[0]))
    return grad.mul_(scale)


def _backward_dense(ctx, grad_loss, _grad_unused):
    if grad_loss is None:  # grads are not materialised: the loss output did not reach the result
        return None, None, None, None, None, None, None, None
    check_not_reused(ctx)
    check_once_differentiable(grad_loss, "distill_loss")
    grad, row_weight = ctx.saved_tensors
    if row_weight is not None:
        # The kernel already multiplied row r's gradient by row_weight[r]. With the usual upstream
        # gradient of 1, grad_loss is exactly row_weight and the buffer is returned as is (no pass).
        if _plain_eager(grad) and grad.dtype != torch.float64 and torch.equal(grad_loss, row_weight):
            ctx.used = True
            return grad, None, None, None, None, None, None, None
        nz = row_weight != 0
        safe = torch.where(nz, row_weight, torch.ones_like(row_weight))
        ratio = grad_loss / safe
        # Rows of weight 0 hold a zero gradient, so any factor will do for them: where the others share
        # one (a scaled scalar loss, float16's normalised weights) it is a scalar multiply, no N x 1 operand.
        fill = ratio[nz][:1] if _plain_eager(grad) and bool(nz.any()) else torch.zeros_like(ratio[:1])
        grad_loss = torch.where(nz, ratio, fill)
    return scale_saved_grad(ctx, grad, grad_loss), None, None, None, None, None, None, None


def _backward_topk(ctx, grad_loss, _grad_unused):
    if grad_loss is None:
        return None, None, None, None, None, None, None, None
    check_not_reused(ctx)
    check_once_differentiable(grad_loss, "distill_loss_topk")
    (grad,) = ctx.saved_tensors
    return scale_saved_grad(ctx, grad, grad_loss), None, None, None, None, None, None, None


torch.library.register_autograd("sdft_kernels::distill_dense", _backward_dense,
                                setup_context=_setup_context_dense)
torch.library.register_autograd("sdft_kernels::distill_topk", _backward_topk, setup_context=_setup_context)


# ---------------------------------------------------------------- argument checks (before any work)
def _check_logits(name, x, last="V"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name}: expected float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name}: expected shape [..., {last}] with {last} >= 1, got {tuple(x.shape)}")


def _real(x) -> bool:
    """A plain real number (NumPy scalars included), not a bool."""
    return isinstance(x, (int, float, numbers.Real)) and not isinstance(x, bool)


def check_reverse_mode_only(name, t):
    """The kernels give reverse-mode gradients through loss.backward() / torch.autograd.grad only. torch.func's
    differentiating transforms (grad, jacrev, jvp, ...) need autograd.Functions with setup_context, which
    ops registered by torch.library.register_autograd lack (PyTorch's own error does not say which call
    is at fault), and forward-mode AD (dual tensors) would silently get a zero tangent. vmap of the
    forward works, one sample at a time."""
    if torch.compiler.is_compiling():  # dynamo cannot trace the checks (pybind builtins)
        return
    if not isinstance(t, torch.Tensor):
        return
    if torch._C._functorch.is_gradtrackingtensor(t):
        raise RuntimeError(f"{name}: torch.func transforms that differentiate (grad, jacrev, jvp, ...) are not "
                           "supported by the fused kernels; use torch.autograd.grad or loss.backward()")
    if fwAD._current_level >= 0 and fwAD.unpack_dual(t).tangent is not None:
        raise RuntimeError(f"{name}: forward-mode AD (a dual tensor) is not supported by the fused kernels; "
                           "use reverse mode (loss.backward() or torch.autograd.grad)")


def check_options(divergence, beta, temperature, reduction):
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence: expected one of {sorted(DIVERGENCES)}, got {divergence!r}")
    if not _real(beta) or not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta: expected a number in [0, 1], got {beta!r}")
    # chained comparison, not math.isfinite: a SymFloat under torch.compile(dynamic=True) supports it
    if not _real(temperature) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")


def valid_rows(lead, vocab, device, labels, ignore_index, mask) -> torch.Tensor:
    """Bool [N] of rows that count (label != ignore_index and mask True), checked against `lead`. Labels
    are range-checked only where they count (a padding label under mask False may be anything)."""
    lead = tuple(lead)
    valid = torch.ones(lead, dtype=torch.bool, device=device)
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask: expected a bool tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != lead:
            raise ValueError(f"mask: expected shape {lead} (the logits without the vocabulary dim), "
                             f"got {tuple(mask.shape)}")
        if mask.device != device:
            raise ValueError(f"mask: expected a tensor on {device}, got one on {mask.device}")
        valid = valid & (mask if mask.dtype == torch.bool else mask != 0)
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels: expected an integer tensor, got "
                            f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}")
        if tuple(labels.shape) != lead:
            raise ValueError(f"labels: expected shape {lead} (the logits without the vocabulary dim), "
                             f"got {tuple(labels.shape)}")
        if labels.device != device:
            raise ValueError(f"labels: expected a tensor on {device}, got one on {labels.device}")
        valid = valid & (labels != ignore_index)  # a label under mask False is never read: not checked
        if not torch.compiler.is_compiling():  # data-dependent check: eager only
            bad = valid & ((labels < 0) | (labels >= vocab))
            if bool(bad.any()):
                raise ValueError(f"labels: expected values in [0, {vocab}) or ignore_index={ignore_index}, "
                                 f"got {labels[bad].flatten()[0].item()}")
    return valid.reshape(-1)


def row_weights(valid, reduction, batch, temperature, scale_by_t2, dtype):
    """Per-row weights w such that the scalar reduction is sum(w * rows)."""
    w = valid.to(dtype)
    if reduction == "mean":
        w = w / valid.sum().clamp_min(1).to(dtype)
    elif reduction == "batchmean":
        w = w / max(int(batch), 1)
    return w * (temperature * temperature) if scale_by_t2 else w


def kernel_row_weights(row_w, dtype):
    """(weights the kernel folds into the gradient it writes, the factor backward multiplies in).

    float16 gets the weights divided by their largest value (1 for "mean"): a gradient pre-scaled by
    1 / N in forward underflows float16 before a loss scale (GradScaler) can reach it in backward, which
    then multiplies the factor in, in float32. Other dtypes have exponent range enough: weights as given."""
    if row_w is None or dtype != torch.float16:
        return row_w, None
    top = row_w.max().clamp_min(torch.finfo(row_w.dtype).tiny)
    return row_w / top, top


def reduce_rows(rows, valid, reduction, batch, temperature, scale_by_t2):
    """rows: per-token losses [...] (0 where not valid); valid: bool [N]."""
    if reduction == "none":
        out = rows
    elif reduction == "sum":
        out = rows.sum()
    elif reduction == "mean":  # over valid tokens; 0 (not NaN) when none is valid
        out = rows.sum() / valid.sum().clamp_min(1).to(rows.dtype)
    else:  # batchmean: like torch.nn.KLDivLoss, divide by the first dimension of the logits
        out = rows.sum() / max(int(batch), 1)
    return out * (temperature * temperature) if scale_by_t2 else out


def report_bad_rows(rows, names, what="contains NaN or +inf, or has no finite entry"):
    """The CUDA kernel marks bad rows (NaN / +inf, no finite entry; for top-k also bad indices or listed
    probabilities above 1) by a NaN loss (the CPU kernel raises itself, naming the case); report them in
    eager mode rather than propagate them."""
    if rows.is_cuda and not torch.compiler.is_compiling() and bool(torch.isnan(rows).any()):
        r = int(torch.isnan(rows).nonzero()[0, 0])
        raise ValueError(f"{names}: row {r} {what}")


# ---------------------------------------------------------------- public API
def distill_loss(student_logits, teacher_logits, *, divergence="forward_kl", beta=0.5, temperature=1.0,
                 scale_by_t2=False, labels=None, ignore_index=-100, mask=None, reduction="mean"):
    """Fused distillation divergence between teacher_logits and student_logits ([..., V], float32,
    bfloat16, float16 or float64, same shape/dtype/device). See the module docstring for the formulas.

    labels ([...], integer): tokens whose label equals ignore_index are ignored (the values otherwise
    only need to lie in [0, V)); mask ([...], bool): False tokens are ignored. reduction: "none" gives
    the per-token loss [...] (0 at ignored tokens), "sum", "mean" (over valid tokens, 0 if there is
    none) or "batchmean" (sum / student_logits.shape[0], like torch.nn.KLDivLoss; 1-D logits [V] are one
    row, divided by 1). scale_by_t2
    multiplies the loss by temperature**2 (Hinton et al.). Gradients flow to student_logits only.
    """
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    check_reverse_mode_only("student_logits", student_logits)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits: expected shape {tuple(student_logits.shape)} like student_logits, "
                         f"got {tuple(teacher_logits.shape)}")
    if teacher_logits.dtype != student_logits.dtype:
        raise TypeError(f"teacher_logits: expected dtype {student_logits.dtype} like student_logits, "
                        f"got {teacher_logits.dtype}")
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"teacher_logits: expected a tensor on {student_logits.device} like student_logits, "
                         f"got one on {teacher_logits.device}")
    check_options(divergence, beta, temperature, reduction)
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    valid = valid_rows(lead, vocab, student_logits.device, labels, ignore_index, mask)
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    batch = student_logits.shape[0] if student_logits.dim() > 1 else 1
    acc = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    # Scalar reductions are a weighted sum of the rows; the kernel folds the weights into the gradient.
    row_w = None if reduction == "none" else row_weights(valid, reduction, batch, temperature, scale_by_t2, acc)
    kernel_w, _ = kernel_row_weights(row_w, student_logits.dtype)  # backward finds the factor as loss grad / w
    rows, _ = torch.ops.sdft_kernels.distill_dense(
        student_logits.reshape(-1, vocab), teacher_logits.detach().reshape(-1, vocab), valid, kernel_w,
        DIVERGENCES[divergence], float(beta), float(temperature), compute_grad)
    report_bad_rows(rows, "student_logits or teacher_logits")
    if row_w is not None:
        return (rows * row_w).sum()
    return reduce_rows(rows.reshape(lead), valid, reduction, batch, temperature, scale_by_t2)


def distill_loss_topk(student_logits, teacher_topk_logprobs, teacher_topk_indices, *, divergence="forward_kl",
                      beta=0.5, temperature=1.0, scale_by_t2=False, labels=None, ignore_index=-100, mask=None,
                      reduction="mean"):
    """Distillation from a sparse teacher: its top-k log-probabilities teacher_topk_logprobs [..., k] at
    vocabulary indices teacher_topk_indices [..., k] (distinct within a row, in [0, V)).

    The divergence is taken between two distributions over k + 1 buckets: the k listed entries plus
    one tail bucket. Teacher: exp(teacher_topk_logprobs) and tail mass max(0, 1 - sum exp(topk)).
    Student: softmax(student_logits / T) at the k indices and its total mass outside them (summed
    directly, no 1 - x cancellation). The teacher log-probs are used as given: temperature applies to
    the student only (produce the teacher's log-probs at the temperature you want). When k = V the
    tail bucket is dropped and the loss equals distill_loss with the full teacher. The tail gradient is
    shared among the student's non-listed entries in proportion to their probabilities.
    Conditioning: the teacher's tail mass is known only to the rounding of its listed log-probs (~1e-16
    of 1 in float64, ~1e-7 in float32). Forward KL weights the tail term by that mass, so it stays
    accurate; reverse KL and JSD weight it by the student's tail mass times log(student / teacher tail),
    which is noise (and can be large) when the listed entries already hold the teacher's mass to within
    rounding. Prefer forward KL for top-k teachers, or a k whose tail the teacher resolves.
    Other arguments as in distill_loss.
    """
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_topk_logprobs", teacher_topk_logprobs, last="k")
    check_reverse_mode_only("student_logits", student_logits)
    idx = teacher_topk_indices
    if not isinstance(idx, torch.Tensor) or idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise TypeError("teacher_topk_indices: expected an integer tensor")
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    k = teacher_topk_logprobs.shape[-1]
    if tuple(teacher_topk_logprobs.shape[:-1]) != tuple(lead) or not 1 <= k <= vocab:
        raise ValueError(f"teacher_topk_logprobs: expected shape {tuple(lead)} + [k] with 1 <= k <= {vocab}, "
                         f"got {tuple(teacher_topk_logprobs.shape)}")
    if idx.shape != teacher_topk_logprobs.shape:
        raise ValueError(f"teacher_topk_indices: expected shape {tuple(teacher_topk_logprobs.shape)} like "
                         f"teacher_topk_logprobs, got {tuple(idx.shape)}")
    for name, t in (("teacher_topk_logprobs", teacher_topk_logprobs), ("teacher_topk_indices", idx)):
        if t.device != student_logits.device:
            raise ValueError(f"{name}: expected a tensor on {student_logits.device} like student_logits, "
                             f"got one on {t.device}")
    check_options(divergence, beta, temperature, reduction)
    valid = valid_rows(lead, vocab, student_logits.device, labels, ignore_index, mask)
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    acc = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    rows, _ = torch.ops.sdft_kernels.distill_topk(
        student_logits.reshape(-1, vocab), teacher_topk_logprobs.detach().reshape(-1, k).to(acc),
        idx.reshape(-1, k).to(torch.int64), valid, DIVERGENCES[divergence], float(beta), float(temperature),
        compute_grad)
    report_bad_rows(rows, "student_logits, teacher_topk_logprobs or teacher_topk_indices",
                     "is invalid (NaN or +inf, no finite logit, an index outside [0, V) or repeated, or "
                     "listed probabilities summing above 1)")
    batch = student_logits.shape[0] if student_logits.dim() > 1 else 1
    return reduce_rows(rows.reshape(lead), valid, reduction, batch, temperature, scale_by_t2)
