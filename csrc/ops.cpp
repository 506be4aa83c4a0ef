// Every op's schema, once. Kernels live per backend: csrc/cpu/<op>.cpp registers the CPU
// implementation, csrc/cuda/<op>.cu the CUDA one; the dispatcher picks by the tensors' device, so no
// #ifdef is needed here and a CPU-only build simply has no CUDA kernels registered.
#include <Python.h>
#include <torch/library.h>

#include "cpu/isa.h"

// _C.cpu_isa(): the instruction set the CPU kernels' row loops run with here ("avx512", "avx2" or "base"),
// after SDFT_CPU_ISA's cap, so runs and benchmarks can record it (float sums differ between variants).
static PyObject* cpu_isa(PyObject*, PyObject*) {
  switch (sdft::cpu::cpu_isa()) {
    case sdft::cpu::Isa::kAvx512: return PyUnicode_FromString("avx512");
    case sdft::cpu::Isa::kAvx2: return PyUnicode_FromString("avx2");
    default: return PyUnicode_FromString("base");
  }
}

// `import sdft_kernels._C` loads this shared object, which runs the registrations below.
extern "C" {
PyObject* PyInit__C(void) {
  static PyMethodDef methods[] = {{"cpu_isa", cpu_isa, METH_NOARGS, "ISA of the CPU kernels' row loops"},
                                  {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(sdft_kernels, m) {
  // ---- distillation divergence (csrc/cpu/distill*.cpp, csrc/cuda/distill*.cu) ----
  // Per-row divergence between teacher and student distributions and, in the same pass, its gradient
  // w.r.t. the student logits (backward only scales it). divergence: 0 forward KL, 1 reverse KL,
  // 2 JSD(beta). valid: bool [N], rows to compute (others get loss 0 and gradient 0). Returns
  // (loss [N] float32 (float64 for float64 logits), grad [N, V] in the logits' dtype, or [0, 0] when
  // compute_grad is false). Python API: sdft_kernels.distill_loss / distill_loss_topk /
  // fused_linear_distill_loss (sdft_kernels/ops/distill.py, ops/fused_linear.py).
  // row_weight: None or [N] (loss dtype), multiplies row r's gradient (not its loss): the reduction's weight.
  m.def("distill_dense(Tensor student_logits, Tensor teacher_logits, Tensor valid, Tensor? row_weight, "
        "int divergence, float beta, float temperature, bool compute_grad) -> (Tensor, Tensor)");
  // The same with the gradient written over student_logits (contiguous; a scratch buffer the caller
  // owns, e.g. fused_linear_distill_loss's chunk logits): no gradient-sized allocation. Returns loss [N].
  // CPU and CUDA.
  m.def("distill_dense_inplace_(Tensor(a!) student_logits, Tensor teacher_logits, Tensor valid, "
        "Tensor? row_weight, int divergence, float beta, float temperature) -> Tensor");
  // Top-k teacher: teacher_topk_logprobs [N, k] (float32, float64 for float64 logits) and
  // teacher_topk_indices [N, k] (int64); the teacher's missing mass is one tail bucket.
  m.def("distill_topk(Tensor student_logits, Tensor teacher_topk_logprobs, Tensor teacher_topk_indices, "
        "Tensor valid, int divergence, float beta, float temperature, bool compute_grad) -> (Tensor, Tensor)");

  // ---- CKA (csrc/cpu/cka*.cpp, csrc/cuda/cka*.cu) ----
  // (section owned by the CKA kernels)
  // Chan merge of one batch's shifted co-moment `raw` [dx, dy] into the float64 accumulator `acc`;
  // upper=True: raw is a self-moment of which only the upper triangle was computed; only acc's upper
  // triangle is merged (its lower one is left as it was).
  m.def("cka_comoment_merge_(Tensor(a!) acc, Tensor raw, Tensor r_x, Tensor r_y, float n_b, Tensor d_x, "
        "Tensor d_y, float w, bool upper=False) -> ()");
  // The passes over each layer's features x [n, d] (float32/float64/bf16/fp16, unit column stride)
  // (csrc/cpu/cka_columns.cpp, csrc/cuda/cka_columns.cu):
  // (float64 column sums [d], float64 max |x| []) in one read; NaN/Inf make their column's sum non-finite.
  m.def("cka_column_stats(Tensor x) -> (Tensor, Tensor)");
  // out [n, d] (float32/float64) = x - shift (shift [d] in out's dtype); returns out's float64 column sums.
  m.def("cka_shift(Tensor x, Tensor shift, Tensor(a!) out) -> Tensor");
  // U-centring, in place, of a contiguous stack of Gram matrices [L, b, b] (zero diagonal; unbiased
  // HSIC = <U(K),U(L)>/(b(b-3))); upper=True: only the upper triangles are valid on input (read
  // mirrored); on output the matrices are full.
  m.def("cka_ucentre_(Tensor(a!) gram, bool upper=False) -> ()");
  // Tiled kernel-HSIC statistics of x [n, d], y [n, e]: (sums [3], row sums [2, n], diagonals [2, n]),
  // sums and row sums without the diagonal; shift_x [d] / shift_y [e] are subtracted from every row first
  // (the column means; no copy on CPU); minus_one_x / _y: an RBF Gram formed as K - 1 (expm1).
  m.def("kernel_hsic_stats(Tensor x, Tensor y, int kernel, float gamma_x, float gamma_y, int tile, "
        "Tensor? shift_x=None, Tensor? shift_y=None, bool minus_one_x=False, bool minus_one_y=False) "
        "-> (Tensor, Tensor, Tensor)");
}
