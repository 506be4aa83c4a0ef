"""The CUDA kernels of csrc/cuda, run unmodified on CPU by the emulator in tests/cuda_emu, against the
CPU kernels (themselves tested against float64 references) on the same inputs.

What this proves without a GPU: each kernel's indexing, reductions, barriers, warp shuffles, cluster
exchange through distributed shared memory, in-place aliasing and its launcher's choices (grid, shared
memory, which kernel) are right, and that they stay inside their outputs. Every case runs under two
greedy schedules (the first ready thread always runs next, then the last): a result that differs
between the two is a race. Not proven: speed, and what the emulator does not model (emu.h); the GPU
session's gpu_check.sh still runs the real thing.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_emu import build  # noqa: E402

E, C = None, torch.ops.sdft_kernels
FWD, REV, JSD = 0, 1, 2


@pytest.fixture(scope="module", autouse=True)
def emulated():
    global E
    build.load()
    E = torch.ops.sdft_emu
    yield
    build.configure()


def both_orders(fn, **device):
    """fn() under both schedule orders, with every tensor it allocates (the ops' outputs) ending at a
    guard page in the first and starting at one in the second; asserts the results are bitwise equal and
    returns one."""
    outs = []
    for order, at in ((0, "end"), (1, "start")):
        build.configure(order=order, **device)
        with build.guarded(at):
            outs.append(fn())
    a, b = outs
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), \
            "result depends on the thread order: a race"
    return a


def padded(x, pad=2):
    """x as the middle rows of a NaN-filled (integers: -1, an invalid index) buffer: a kernel reading past
    either end gets a value that makes its row NaN."""
    fill = float("nan") if x.is_floating_point() else -1
    big = torch.full((x.shape[0] + 2 * pad,) + x.shape[1:], fill, dtype=x.dtype)
    big[pad:-pad] = x
    return big[pad:-pad]


def logits(n, v, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return padded((scale * torch.randn(n, v, generator=g, dtype=torch.float64)).to(dtype))


def tol(dtype):
    # float32: losses are sums over up to V terms in another order than the CPU kernel's (f64 cases
    # compare the same code paths at 1e-12)
    return {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]


def assert_close(got, want, dtype, what, scale=None):
    got, want = got.double(), want.double()
    if scale is None:
        scale = want.abs().max().item() if want.numel() else 1.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    # relative to the largest value, with a floor for results that are 0 up to rounding (V = 1)
    assert err <= tol(dtype) * max(scale, 0.1), f"{what}: max error {err:.3g} (scale {scale:.3g})"


def kernels_run():
    return [line.split(" ")[0] for line in build.launches()]


def dense_vs_cpu(s, t, valid, w, div, beta, temperature, grad, what):
    """distill_dense emulated (both schedules) and on CPU: asserts loss and gradient agree; returns the
    emulated (loss, grad)."""
    le, ge = both_orders(lambda: E.distill_dense(s, t, valid, w, div, beta, temperature, grad))
    lc, gc = C.distill_dense(s, t, valid, w, div, beta, temperature, grad)
    assert_close(le, lc, torch.float64 if s.dtype == torch.float64 else torch.float32, f"loss {what}")
    assert ge.shape == gc.shape and ge.dtype == gc.dtype
    if grad:
        assert_close(ge, gc, s.dtype, f"grad {what}")
    return le, ge


# ---- distill_dense: the one-block kernel and (V >= 4096 on sm_90) the cluster kernel ----

DENSE = [(div, beta) for div, beta in ((FWD, 0.5), (REV, 0.5), (JSD, 0.5), (JSD, 0.1), (JSD, 0.0), (JSD, 1.0))]


@pytest.mark.parametrize("V,cluster", [(1, False), (7, False), (600, False), (4096, True), (5003, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_distill_dense_matches_cpu(V, cluster, dtype):
    N = 3
    s, t = logits(N, V, dtype, 1), logits(N, V, dtype, 2)
    valid = torch.tensor([True, False, True])
    weight = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    for div, beta in DENSE:
        for grad, w in ((False, None), (True, None), (True, weight)):
            _, ge = dense_vs_cpu(s, t, valid, w, div, beta, 1.7, grad, f"div={div} beta={beta}")
            if grad:
                assert torch.all(ge[1] == 0), "an invalid row gets gradient 0"
            expect = "cudaLaunchKernelEx" if cluster and dtype != torch.float64 else "distill_dense_kernel<DIV,"
            assert kernels_run() == [expect]


@pytest.mark.parametrize("V,dtype,kernel", [
    (50_000, torch.float32, "cudaLaunchKernelEx"),      # 50 KiB of slices: above 48 KiB, needs the opt-in
    (128_256, torch.bfloat16, "cudaLaunchKernelEx"),    # Llama 3's vocabulary: 64 KiB
    (262_144, torch.bfloat16, "cudaLaunchKernelEx"),    # 128 KiB
    (262_144, torch.float32, "distill_dense_kernel<DIV,"),  # 256 KiB: beyond the 227 KiB opt-in -> one block
])
def test_distill_dense_large_rows_and_the_shared_memory_opt_in(V, dtype, kernel):
    s, t = logits(1, V, dtype, 18), logits(1, V, dtype, 19)
    valid = torch.ones(1, dtype=torch.bool)
    for div in (FWD, JSD):
        dense_vs_cpu(s, t, valid, None, div, 0.5, 1.0, True, f"div={div}")
        assert kernels_run() == [kernel]


def test_distill_dense_extreme_rows():
    """-inf entries on both sides, +-1e4 logits, a row of one finite entry: as the CPU kernel computes."""
    for V in (600, 4100):
        s, t = logits(4, V, torch.float32, 3), logits(4, V, torch.float32, 4)
        s[0, ::3] = float("-inf")
        t[0, ::3] = float("-inf")
        s[1] *= 1e4 / 3
        t[1] *= 1e4 / 3
        s[2, 1:] = float("-inf")
        t[2, 1:] = float("-inf")
        valid = torch.ones(4, dtype=torch.bool)
        for div in (FWD, REV, JSD):
            dense_vs_cpu(s, t, valid, None, div, 0.5, 1.0, True, f"V={V} div={div}")


def test_distill_dense_bad_rows_get_nan_loss_and_gradient():
    """What the CPU kernel raises for (NaN, +inf, no finite student entry), CUDA reports as a NaN row,
    and every other row is unaffected."""
    for V in (600, 4100):
        s, t = logits(5, V, torch.float32, 5), logits(5, V, torch.float32, 6)
        s[0, V // 2] = float("nan")
        t[1, V - 1] = float("inf")
        s[2] = float("-inf")
        valid = torch.ones(5, dtype=torch.bool)
        for div in (FWD, REV, JSD):
            le, ge = both_orders(lambda: E.distill_dense(s, t, valid, None, div, 0.5, 1.0, True))
            assert torch.isnan(le[:3]).all() and torch.isnan(ge[:3]).all()
            lc, gc = C.distill_dense(s[3:], t[3:], valid[3:], None, div, 0.5, 1.0, True)
            assert_close(le[3:], lc, torch.float32, "good rows' loss")
            assert_close(ge[3:], gc, torch.float32, "good rows' gradient")


@pytest.mark.parametrize("V", [600, 5003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_distill_dense_inplace_writes_the_gradient_over_the_student_and_nothing_else(V, dtype):
    N = 4
    t = logits(N, V, dtype, 8)
    valid = torch.tensor([True, True, False, True])
    w = torch.tensor([1.0, 0.25, 1.0, 3.0])
    for div in (FWD, REV, JSD):
        big = torch.full((N + 2, V), 123.0, dtype=dtype)
        big[1:-1] = logits(N, V, dtype, 7)
        lc, gc = C.distill_dense(big[1:-1].clone(), t, valid, w, div, 0.5, 2.0, True)

        def run():
            b = big.clone()
            loss = E.distill_dense_inplace_(b[1:-1], t, valid, w, div, 0.5, 2.0)
            return loss, b

        le, b = both_orders(run)
        assert_close(le, lc, torch.float32, f"loss div={div}")
        assert_close(b[1:-1], gc, dtype, f"in-place gradient div={div}")
        assert torch.all(b[0] == 123.0) and torch.all(b[-1] == 123.0), "wrote outside the student's rows"


def test_cluster_kernel_is_chosen_only_where_it_applies(monkeypatch):
    s, t = logits(2, 4096, torch.bfloat16, 9), logits(2, 4096, torch.bfloat16, 10)
    valid = torch.ones(2, dtype=torch.bool)
    ref = C.distill_dense(s, t, valid, None, FWD, 0.5, 1.0, True)
    cases = [({}, "cudaLaunchKernelEx"),
             ({"sm_major": 8}, "distill_dense_kernel<DIV,"),  # A100: no clusters
             ({"ptx_version": 80}, "distill_dense_kernel<DIV,"),  # JIT from pre-sm_90 PTX: body compiled out
             ({"max_active_clusters": 0}, "distill_dense_kernel<DIV,")]  # cluster cannot be resident
    for device, kernel in cases:
        out = both_orders(lambda: E.distill_dense(s, t, valid, None, FWD, 0.5, 1.0, True), **device)
        assert kernels_run() == [kernel], device
        assert_close(out[1], ref[1], torch.bfloat16, f"gradient {device}")
    monkeypatch.setenv("SDFT_CUDA_NO_CLUSTER", "1")
    both_orders(lambda: E.distill_dense(s, t, valid, None, FWD, 0.5, 1.0, True))
    assert kernels_run() == ["distill_dense_kernel<DIV,"]
    small = logits(2, 4095, torch.bfloat16, 11)
    monkeypatch.delenv("SDFT_CUDA_NO_CLUSTER")
    both_orders(lambda: E.distill_dense(small, small, valid, None, FWD, 0.5, 1.0, True))
    assert kernels_run() == ["distill_dense_kernel<DIV,"], "rows below 4096 take the one-block kernel"


def test_distill_dense_no_rows():
    build.configure()
    s = torch.zeros(0, 10)
    loss, grad = E.distill_dense(s, s, torch.zeros(0, dtype=torch.bool), None, FWD, 0.5, 1.0, True)
    assert loss.shape == (0,) and grad.shape == (0, 10) and build.launches() == []


# ---- distill_topk ----

def topk_inputs(N, V, k, dtype, seed):
    s = logits(N, V, dtype, seed)
    teacher = torch.log_softmax(logits(N, V, torch.float64, seed + 1), -1)
    lp, idx = teacher.topk(k, -1)
    return s, padded(lp.to(torch.float64 if dtype == torch.float64 else torch.float32)), padded(idx)


@pytest.mark.parametrize("V,k", [(1, 1), (7, 3), (7, 7), (700, 1), (700, 64), (3000, 300), (3000, 3000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_distill_topk_matches_cpu(V, k, dtype):
    s, lp, idx = topk_inputs(3, V, k, dtype, 12)
    valid = torch.tensor([True, True, False])
    for div, beta in ((FWD, 0.5), (REV, 0.5), (JSD, 0.3)):
        for grad in (True, False):
            le, ge = both_orders(lambda: E.distill_topk(s, lp, idx, valid, div, beta, 1.3, grad))
            lc, gc = C.distill_topk(s, lp, idx, valid, div, beta, 1.3, grad)
            assert_close(le, lc, torch.float32 if dtype != torch.float64 else dtype, f"loss div={div}")
            if grad:
                assert_close(ge, gc, dtype, f"grad div={div}")
            assert kernels_run() == ["distill_topk_kernel<scalar_t,"]


def test_distill_topk_refuses_a_vocabulary_its_bitmap_cannot_hold():
    build.configure()
    s = torch.zeros(1, 400_000)
    with pytest.raises(RuntimeError, match="student_logits: the CUDA top-k kernel supports V <= "):
        E.distill_topk(s, torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.bool),
                       FWD, 0.5, 1.0, True)
    assert build.launches() == []


def test_distill_topk_bad_rows_get_nan():
    """Rows the CPU kernel rejects: a repeated index, an index out of range, listed mass above 1, NaN."""
    s, lp, idx = topk_inputs(6, 500, 20, torch.float32, 13)
    idx, lp = idx.clone(), lp.clone()
    idx[0, 5] = idx[0, 2]
    idx[1, 0] = 500
    lp[2] = torch.log(torch.full((20,), 0.06))  # 20 x 0.06 = 1.2 > 1.01
    lp[3, 4] = float("nan")
    valid = torch.ones(6, dtype=torch.bool)
    le, ge = both_orders(lambda: E.distill_topk(s, lp, idx, valid, FWD, 0.5, 1.0, True))
    assert torch.isnan(le[:4]).all() and torch.isnan(ge[:4]).all()
    lc, gc = C.distill_topk(s[4:], lp[4:], idx[4:], valid[4:], FWD, 0.5, 1.0, True)
    assert_close(le[4:], lc, torch.float32, "good rows' loss")
    assert_close(ge[4:], gc, torch.float32, "good rows' gradient")


# ---- CKA: column passes, Chan merge, U-centring, tiled kernel HSIC ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n,d", [(1, 1), (300, 40), (700, 33)])
def test_cka_column_passes_match_cpu(dtype, n, d):
    g = torch.Generator().manual_seed(14)
    wide = padded((torch.randn(n, d + 5, generator=g, dtype=torch.float64) * 50 + 100).to(dtype))
    x = wide[:, :d]  # row stride d + 5: the ld argument
    se, me = both_orders(lambda: E.cka_column_stats(x))
    sc, mc = C.cka_column_stats(x)
    assert_close(se, sc, torch.float64, "column sums")
    assert me.item() == mc.item()
    out_t = torch.float64 if dtype == torch.float64 else torch.float32
    shift = (sc / n).to(out_t)

    def shifted():
        out = torch.empty(n, d, dtype=out_t)
        return E.cka_shift(x, shift, out), out

    pe, oe = both_orders(shifted)
    oc = torch.empty(n, d, dtype=out_t)
    pc = C.cka_shift(x, shift, oc)
    assert torch.equal(oe, oc)
    # sums of centred values are rounding noise: compare to the size of what was summed
    assert_close(pe, pc, torch.float64, "shifted column sums", scale=oc.double().abs().sum(0).max().item())
    assert kernels_run() == ["shift_kernel<scalar_t,"]


def test_cka_column_stats_nan_makes_its_column_sum_nan():
    x = torch.randn(300, 40)
    x[123, 37] = float("nan")
    s, _ = both_orders(lambda: E.cka_column_stats(x))
    assert torch.isnan(s[37]) and torch.isfinite(s[:37]).all() and torch.isfinite(s[38:]).all()


@pytest.mark.parametrize("upper", [False, True])
@pytest.mark.parametrize("raw_dtype", [torch.float32, torch.float64])
def test_cka_comoment_merge_matches_cpu(upper, raw_dtype):
    g = torch.Generator().manual_seed(15)
    rows, cols = (37, 37) if upper else (37, 50)
    r64 = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    acc = r64(rows, cols)
    raw = r64(rows, cols).to(raw_dtype)
    args = (raw, r64(rows), r64(cols), 300.0, r64(rows), r64(cols), 0.37, upper)

    def merged():
        a = acc.clone()
        E.cka_comoment_merge_(a, *args)
        return a

    ae = both_orders(merged)
    ac = acc.clone()
    C.cka_comoment_merge_(ac, *args)
    assert torch.equal(ae, ac)


@pytest.mark.parametrize("upper", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b", [4, 37, 300])
def test_cka_ucentre_matches_cpu(upper, dtype, b):
    g = torch.Generator().manual_seed(16)
    x = torch.randn(3, b, 20, generator=g, dtype=torch.float64)
    gram = (x @ x.transpose(1, 2)).to(dtype)
    if upper:  # only the upper triangles are valid on input
        gram = gram.triu() + torch.full_like(gram, float("nan")).tril(-1)

    def centred():
        k = gram.clone()
        E.cka_ucentre_(k, upper)
        return k

    ke = both_orders(centred)
    kc = gram.clone()
    C.cka_ucentre_(kc, upper)
    assert_close(ke, kc, dtype, "U-centred Gram")
    assert kernels_run() == ["ucentre_rows_kernel<scalar_t>", "ucentre_total_kernel", "ucentre_apply_kernel<scalar_t>"]


@pytest.mark.parametrize("kernel,tile", [(0, 64), (1, 64), (1, 37), (1, 1000)])
def test_kernel_hsic_stats_matches_cpu(kernel, tile):
    g = torch.Generator().manual_seed(17)
    x, y = torch.randn(150, 12, generator=g), torch.randn(150, 20, generator=g)
    sx, sy = x.mean(0), y.mean(0)
    args = (kernel, 0.04, 0.03, tile, sx, sy, kernel == 1, False)
    got = both_orders(lambda: E.kernel_hsic_stats(x, y, *args))
    want = C.kernel_hsic_stats(x, y, *args)
    for a, b, what in zip(got, want, ("sums", "row sums", "diagonals")):
        assert_close(a, b, torch.float32, what)


# ---- the emulator itself: each kind of bug it claims to catch is caught ----

@pytest.mark.parametrize("bug,message", [
    ("missing_barrier", "depends on the thread order"),
    ("divergent_barrier", "reached at"),
    ("exit_before_barrier", "exited while"),
    ("shared_overflow", "past the end"),
    ("read_before_copy_wait", "depends on the thread order|nan"),
    ("map_exited_rank", "has exited"),
    ("big_dynamic_smem", "cudaFuncSetAttribute"),
    ("global_overflow", "past the end of a tensor"),
    ("global_underflow", "before the start of a tensor"),
])
def test_emulator_catches(bug, message):
    import re
    try:
        both_orders(lambda: torch.ops.sdft_emu_selftest.run(bug))
    except (AssertionError, RuntimeError) as e:
        assert re.search(message, str(e), re.I), str(e)
    else:
        pytest.fail(f"the emulator did not catch {bug}")


def test_emulator_selftest_correct_kernel_passes():
    out = both_orders(lambda: torch.ops.sdft_emu_selftest.run("correct"))
    assert torch.equal(out, torch.arange(64, dtype=torch.float32).sum().expand(64))
