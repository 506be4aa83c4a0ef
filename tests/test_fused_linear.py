"""fused_linear_distill_loss: chunked lm_head + fused divergence equals the unfused loss, with grads."""
import pytest
import torch

from sdft_kernels import DistillationLoss, distill_loss, fused_linear_distill_loss
from sdft_kernels.reference.distill import distill_loss_ref, fused_linear_distill_loss_ref


def _inputs(n=23, hs=16, ht=12, v=50, vt=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return dict(student_hidden=r(n, hs), student_weight=r(v, hs) * 0.5, teacher_hidden=r(n, ht),
                teacher_weight=r(vt or v, ht) * 0.5, student_bias=r(v), teacher_bias=r(vt or v))


def _grads(fn, x, w, **kw):
    leaves = {k: x[k].detach().clone().requires_grad_(k.startswith("student")) for k in x}
    out = fn(**leaves, **kw)
    (out * w).sum().backward() if out.dim() else (out * w).backward()
    return out.detach(), [leaves[k].grad for k in ("student_hidden", "student_weight", "student_bias")]


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_equals_unfused(divergence, reduction, chunk_size):
    x = _inputs()
    labels = torch.arange(23) % 50
    labels[4:7] = -100
    kw = dict(divergence=divergence, reduction=reduction, temperature=1.5, scale_by_t2=True, labels=labels, beta=0.3)
    w = torch.randn(23, dtype=torch.float64) if reduction == "none" else torch.tensor(0.7, dtype=torch.float64)
    out, g = _grads(fused_linear_distill_loss, x, w, chunk_size=chunk_size, **kw)
    ref, g_ref = _grads(fused_linear_distill_loss_ref, x, w, **kw)
    assert torch.allclose(out, ref, atol=1e-12, rtol=1e-10)
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
def test_no_grad_gives_the_same_reduced_value(reduction):
    """Evaluation without gradients (torch.no_grad, frozen inputs) reduces exactly like training does."""
    x = _inputs()
    with torch.no_grad():
        out = fused_linear_distill_loss(**x, reduction=reduction, chunk_size=5)
    ref = fused_linear_distill_loss_ref(**x, reduction=reduction)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-12, rtol=1e-10)


def test_float32_and_bf16_match_unfused_kernel():
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        x = _inputs(n=40, v=300, dtype=dtype)
        w = torch.tensor(1.0)
        out, g = _grads(fused_linear_distill_loss, x, w, chunk_size=16, divergence="jsd")
        x64 = {k: v.double() for k, v in x.items()}
        ref, g_ref = _grads(fused_linear_distill_loss_ref, x64, w.double(), divergence="jsd")
        assert abs(float(out) - float(ref)) <= tol * abs(float(ref)) + 1e-6
        for a, b in zip(g, g_ref):
            assert a.dtype == dtype
            assert float((a.double() - b).abs().max()) <= tol * float(b.abs().max()) + 1e-6


def test_float16_mean_under_loss_scaling_as_accurate_as_plain_pytorch():
    # As for distill_loss: "mean"'s 1 / N must not be folded into the float16 chunk gradients before a loss
    # scale (GradScaler) can reach them (that gave 6-7x the error of the unfused float16 computation).
    g = torch.Generator().manual_seed(5)
    sh = torch.randn(2048, 32, generator=g).half()
    sw = (torch.randn(512, 32, generator=g) * 0.3).half()
    tw = (sw.float() + 0.02 * torch.randn(512, 32, generator=g)).half()
    sh64, sw64 = sh.double().requires_grad_(), sw.double().requires_grad_()
    ref = torch.autograd.grad(distill_loss_ref(sh64 @ sw64.t(), sh.double() @ tw.double().t()) * 65536,
                              (sh64, sw64))
    errs = {}
    for name, fn in (("ours", lambda h, w: fused_linear_distill_loss(h, w, sh, tw)),
                     ("torch", lambda h, w: distill_loss_ref((h @ w.t()).float(), (sh @ tw.t()).float()))):
        h, w = sh.clone().requires_grad_(), sw.clone().requires_grad_()
        got = torch.autograd.grad(fn(h, w) * 65536, (h, w))
        errs[name] = [float((a.double() - b).norm() / b.norm()) for a, b in zip(got, ref)]
    assert all(o <= 1.3 * t for o, t in zip(errs["ours"], errs["torch"])), errs


def test_shared_prefix_checks_labels_against_the_student_vocabulary():
    x = _inputs(n=4, v=9)
    x["teacher_weight"] = x["teacher_weight"][:6]
    x["teacher_bias"] = x["teacher_bias"][:6]
    labels = torch.tensor([8, 7, -100, 0])  # student tokens past the shared prefix are valid labels
    got = fused_linear_distill_loss(**x, vocab_alignment="shared_prefix", labels=labels)
    assert got == fused_linear_distill_loss(**x, vocab_alignment="shared_prefix", mask=labels != -100)
    with pytest.raises(ValueError, match="labels"):
        fused_linear_distill_loss(**x, vocab_alignment="shared_prefix", labels=torch.tensor([9, 0, 0, 0]))


def test_shared_prefix_and_leading_dims():
    x = _inputs(v=50, vt=43)
    with pytest.raises(ValueError, match="vocab_alignment"):
        fused_linear_distill_loss(**x)
    x3 = {k: (v.reshape(23, 1, -1) if "hidden" in k else v) for k, v in x.items()}
    w = torch.tensor(1.0, dtype=torch.float64)
    out, g = _grads(fused_linear_distill_loss, x3, w, vocab_alignment="shared_prefix", chunk_size=7)
    ref, g_ref = _grads(fused_linear_distill_loss_ref, x3, w, vocab_alignment="shared_prefix")
    assert torch.allclose(out, ref, atol=1e-12)
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, atol=1e-12)
    assert not bool(g[1][43:].any())  # student rows outside the shared prefix get no gradient


def test_frozen_weight_and_module_from_hidden():
    x = _inputs()
    head_s = torch.nn.Linear(16, 50, dtype=torch.float64)
    head_t = torch.nn.Linear(12, 50, dtype=torch.float64)
    head_s.weight.requires_grad_(False)
    h = x["student_hidden"].clone().requires_grad_()
    mod = DistillationLoss(divergence="reverse_kl", chunk_size=6)
    loss = mod.from_hidden(h, head_s, x["teacher_hidden"], head_t)
    loss.backward()
    h2 = x["student_hidden"].clone().requires_grad_()
    ref = distill_loss(head_s(h2), head_t(x["teacher_hidden"]), divergence="reverse_kl")
    ref.backward()
    assert torch.allclose(loss, ref, atol=1e-12) and torch.allclose(h.grad, h2.grad, atol=1e-12)
    assert head_s.weight.grad is None and head_s.bias.grad is not None and head_t.weight.grad is None


def test_all_ignored_is_zero():
    x = _inputs()
    out, g = _grads(fused_linear_distill_loss, x, torch.tensor(1.0, dtype=torch.float64),
                    mask=torch.zeros(23, dtype=torch.bool))
    assert float(out) == 0.0 and all(not bool(t.any()) for t in g)


def test_bad_inputs():
    x = _inputs()
    for change, match in [
        (dict(student_weight=x["student_weight"][:, :15]), "student_weight"),
        (dict(teacher_weight=x["teacher_weight"][:, :11]), "teacher_weight"),
        (dict(teacher_hidden=x["teacher_hidden"][:20]), "teacher_hidden"),
        (dict(student_weight=x["student_weight"].float()), "student_weight"),
        (dict(student_bias=x["student_bias"][:10]), "student_bias"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(vocab_alignment="pad"), "vocab_alignment"),
        (dict(temperature=-2.0), "temperature"),
        (dict(student_hidden=x["student_hidden"][0, 0]), "student_hidden"),  # 0-d: no IndexError
        (dict(student_weight=x["student_weight"][:0], student_bias=None), "student_weight"),  # V = 0
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            fused_linear_distill_loss(**{**x, **change})


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_equals_unfused(dtype):
    x = {k: v.cuda() for k, v in _inputs(n=300, v=5000, dtype=dtype).items()}
    w = torch.tensor(1.0, device="cuda")
    out, g = _grads(fused_linear_distill_loss, x, w, chunk_size=64, divergence="forward_kl")
    x64 = {k: v.double() for k, v in x.items()}
    ref, g_ref = _grads(fused_linear_distill_loss_ref, x64, w.double(), divergence="forward_kl")
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert abs(float(out) - float(ref)) <= tol * abs(float(ref)) + 1e-6
    for a, b in zip(g, g_ref):
        assert float((a.double() - b).abs().max()) <= tol * float(b.abs().max()) + 1e-6


def test_hugging_face_training_step():
    """DistillationLoss plugs into an HF causal LM step without touching model code: logits form and
    the fused form (base model hidden states + lm_head) give the same loss and student gradients."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    student, teacher = transformers.LlamaForCausalLM(cfg), transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 97, (2, 11))
    attn = torch.ones(2, 11, dtype=torch.long)
    attn[1, 8:] = 0
    loss_fn = DistillationLoss(divergence="jsd", beta=0.3, temperature=2.0, chunk_size=8, shift_labels=True)
    labels = ids.masked_fill(attn == 0, -100)
    with torch.no_grad():
        t_out = teacher(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    loss = loss_fn(student(input_ids=ids, attention_mask=attn).logits, t_out.logits, labels=labels)
    loss.backward()
    grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    s_h = student.model(input_ids=ids, attention_mask=attn).last_hidden_state
    fused = loss_fn.from_hidden(s_h, student.get_output_embeddings(), t_out.hidden_states[-1],
                                teacher.get_output_embeddings(), labels=labels)
    fused.backward()
    assert torch.allclose(loss, fused, atol=1e-6, rtol=1e-5)
    for g, p in zip(grads, student.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6, rtol=1e-4)
    assert all(p.grad is None for p in teacher.parameters())


def test_backward_twice_and_double_backward_are_refused_clearly():
    x = _inputs(n=6, hs=8, ht=8, v=9, dtype=torch.float32)
    h = x["student_hidden"].requires_grad_()
    loss = fused_linear_distill_loss(h, x["student_weight"], x["teacher_hidden"], x["teacher_weight"])
    loss.backward(retain_graph=True)
    g = h.grad.clone()
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()
    torch.testing.assert_close(h.grad, g)  # the first gradient is left as it was
    loss = fused_linear_distill_loss(h, x["student_weight"], x["teacher_hidden"], x["teacher_weight"])
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, h, create_graph=True)
    rows = fused_linear_distill_loss(h, x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
                                     reduction="none")  # recomputes in backward: refused before that
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(rows.sum(), h, create_graph=True)
    x64 = _inputs(n=6, hs=8, ht=8, v=9)  # float64 (the gradcheck dtype) may go back several times
    h64 = x64["student_hidden"].requires_grad_()
    loss = fused_linear_distill_loss(h64, x64["student_weight"], x64["teacher_hidden"], x64["teacher_weight"])
    grads = [torch.autograd.grad(loss, h64, retain_graph=True)[0] for _ in range(3)]
    torch.testing.assert_close(grads[0], grads[2], rtol=0, atol=0)


def test_bad_row_is_named_by_its_token_not_its_chunk_row():
    x = _inputs(n=9, dtype=torch.float32)
    x["student_hidden"][5, 0] = float("nan")
    for chunk in (2, 4, None):
        with pytest.raises(ValueError, match="student_hidden / student_weight: the logits of token row 5 "):
            fused_linear_distill_loss(**x, chunk_size=chunk)


@pytest.mark.cuda
def test_cuda_bad_row_is_reported_not_a_silent_nan():
    # the CUDA kernel marks the row by a NaN loss instead of raising: the wrapper must still raise
    x = {k: v.cuda() for k, v in _inputs(n=9, dtype=torch.float32).items()}
    x["student_hidden"][5, 0] = float("nan")
    for chunk in (2, None):
        with pytest.raises(ValueError, match="token row 5 "):
            fused_linear_distill_loss(**x, chunk_size=chunk)


def test_compile_fullgraph_default_reduction():
    x = _inputs(n=4, hs=6, ht=6, v=9, dtype=torch.float32)
    f = torch.compile(lambda a, b, c, d: fused_linear_distill_loss(a, b, c, d), fullgraph=True, backend="aot_eager")
    a, b = x["student_hidden"].clone().requires_grad_(), x["student_weight"].clone().requires_grad_()
    f(a, b, x["teacher_hidden"], x["teacher_weight"]).backward()
    a2, b2 = x["student_hidden"].clone().requires_grad_(), x["student_weight"].clone().requires_grad_()
    fused_linear_distill_loss(a2, b2, x["teacher_hidden"], x["teacher_weight"]).backward()
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


def test_chunk_size_accepts_numpy_ints_not_bools():
    import numpy as np
    x = _inputs(n=5)
    torch.testing.assert_close(fused_linear_distill_loss(**x, chunk_size=np.int64(2)), fused_linear_distill_loss(**x))
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_distill_loss(**x, chunk_size=True)


def _capped_ref(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
                caps, **kw):
    """The soft-capped logits formed in full, then the dense float64 reference (autograd through tanh)."""
    s = student_hidden @ student_weight.T + student_bias
    t = teacher_hidden @ teacher_weight.T + teacher_bias
    cs, ct = caps
    s = s if cs is None else cs * torch.tanh(s / cs)
    t = t if ct is None else ct * torch.tanh(t / ct)
    return distill_loss_ref(s, t, **kw)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("caps", [(3.0, 3.0), (2.0, None), (None, 1.5)])
def test_soft_capped_logits_equal_the_float64_reference(divergence, reduction, caps):
    """Gemma 2's c * tanh(logits / c), applied per chunk with the cap's derivative in the gradient."""
    x = _inputs()
    x["student_weight"] = x["student_weight"] * 4  # logits of several units: the cap bends them
    kw = dict(divergence=divergence, reduction=reduction, temperature=1.3, beta=0.4)
    w = torch.randn(23, dtype=torch.float64) if reduction == "none" else torch.tensor(0.7, dtype=torch.float64)
    out, g = _grads(fused_linear_distill_loss, x, w, chunk_size=5, student_softcap=caps[0],
                    teacher_softcap=caps[1], **kw)
    ref, g_ref = _grads(_capped_ref, x, w, caps=caps, **kw)
    uncapped, _ = _grads(fused_linear_distill_loss, x, w, chunk_size=5, **kw)
    assert not torch.allclose(out, uncapped, rtol=1e-3)  # the cap changed the loss
    assert torch.allclose(out, ref, atol=1e-12, rtol=1e-10)
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), True, "30"])
def test_bad_softcap_is_refused(bad):
    with pytest.raises(ValueError, match="student_softcap"):
        fused_linear_distill_loss(**_inputs(), student_softcap=bad)


def test_a_lora_adapted_head_is_refused_and_a_quantized_one_is_read_quantized():
    """The fused loss reads a head module's weight: adapters on it would be silently ignored (refused);
    a QuantLinear head is read through its fake-quantized weight, like its forward."""
    from sdft_kernels.degrade.quantize import QuantLinear
    x = _inputs()
    lora_head = torch.nn.Linear(16, 50, dtype=torch.float64)
    lora_head.base_layer = torch.nn.Linear(16, 50, dtype=torch.float64)  # how peft's LoRA layers look
    with pytest.raises(ValueError, match="LoRA adapters"):
        DistillationLoss().from_hidden(x["student_hidden"], lora_head, x["teacher_hidden"], x["teacher_weight"])
    q = QuantLinear(x["student_weight"].clone(), None, 2, 8, True)
    got = DistillationLoss().from_hidden(x["student_hidden"], q, x["teacher_hidden"], x["teacher_weight"])
    ref = distill_loss_ref(q(x["student_hidden"]), x["teacher_hidden"] @ x["teacher_weight"].T)
    assert torch.allclose(got, ref, atol=1e-12, rtol=1e-10)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_soft_capped_logits_equal_the_float64_reference(dtype):
    x = {k: v.cuda() for k, v in _inputs(n=300, v=5000, dtype=dtype).items()}
    x["student_weight"] = x["student_weight"] * 4
    w = torch.tensor(1.0, device="cuda")
    out, g = _grads(fused_linear_distill_loss, x, w, chunk_size=64, divergence="jsd", student_softcap=3.0,
                    teacher_softcap=3.0)
    x64 = {k: v.double() for k, v in x.items()}
    ref, g_ref = _grads(_capped_ref, x64, w.double(), caps=(3.0, 3.0), divergence="jsd")
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert abs(float(out) - float(ref)) <= tol * abs(float(ref)) + 1e-6
    for a, b in zip(g, g_ref):
        assert float((a.double() - b).abs().max()) <= tol * float(b.abs().max()) + 1e-6
