// Every op's schema, once. Kernels live per backend: csrc/cpu/<op>.cpp registers the CPU
// implementation, csrc/cuda/<op>.cu the CUDA one; the dispatcher picks by the tensors' device, so no
// #ifdef is needed here and a CPU-only build simply has no CUDA kernels registered.
#include <Python.h>
#include <torch/library.h>

// `import sdft_kernels._C` loads this shared object, which runs the registrations below.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(sdft_kernels, m) {
  // ---- distillation divergence (csrc/cpu/distill*.cpp, csrc/cuda/distill*.cu) ----
  // (section owned by the distillation kernels)

  // ---- CKA (csrc/cpu/cka*.cpp, csrc/cuda/cka*.cu) ----
  // (section owned by the CKA kernels)
  // Chan merge of one batch's shifted co-moment `raw` [dx, dy] into the float64 accumulator `acc`.
  m.def("cka_comoment_merge_(Tensor(a!) acc, Tensor raw, Tensor r_x, Tensor r_y, float n_b, Tensor d_x, "
        "Tensor d_y, float w) -> ()");
  // U-centring of a stack of Gram matrices [L, b, b] (zero diagonal; unbiased HSIC = <U(K),U(L)>/(b(b-3))).
  m.def("cka_ucentre(Tensor gram) -> Tensor");
  // Tiled kernel-HSIC statistics of x [n, d], y [n, e]: (sums [3], row sums [2, n], diagonals [2, n]).
  m.def("kernel_hsic_stats(Tensor x, Tensor y, int kernel, float gamma_x, float gamma_y, int tile) -> "
        "(Tensor, Tensor, Tensor)");
}
