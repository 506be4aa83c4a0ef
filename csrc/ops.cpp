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
}
