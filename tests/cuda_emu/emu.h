// A CPU emulator of the CUDA execution model, just wide enough to run this project's kernels
// (csrc/cuda/*.cu) unmodified on CPU tensors, so their logic is proven where no GPU is lent.
// Force-included (g++ -include) before every translation unit of the emulated build
// (tests/cuda_emu/build.py, which also rewrites the three constructs C++ cannot parse: `<<<...>>>`
// launches, `__shared__` declarations and `__CUDA_ARCH__`).
//
// Every CUDA thread is a fiber (its own stack); a block's (or a cluster's) fibers run on one OS thread
// and switch only at barriers, so a kernel runs deterministically, and strictly:
// - __syncthreads / __syncthreads_or, warp shuffles (full mask only) and cluster.sync are barriers that
//   every thread of the block / warp / cluster must reach from the same source line; a thread that
//   exits while others wait, or threads waiting at different lines, is an error, not a hang;
// - shared memory starts as 0xFF bytes (NaN in every float type) and each variable has a 0xFF red zone
//   checked when its block ends; it is poisoned again when the block ends (distributed shared memory
//   read after the owner exited reads NaN); cooperative_groups::memcpy_async lands only at
//   cooperative_groups::wait (a read before the wait sees the poison);
// - scheduling is greedy: the first ready thread in index order (configure(order=1): the last) always
//   runs next, so one warp runs ahead of the others as far as the barriers let it, as warps may on a
//   GPU; the tests run every case in both orders, and a result that differs between them is a race;
// - launches are checked as the driver does: block <= 1024 threads, grid limits, dynamic shared memory
//   above 48 KiB only after cudaFuncSetAttribute, a grid divisible by the cluster size;
// - with guard(mode) (emu.cpp), tensors allocated meanwhile end at (mode 1) or start at (mode 2) a
//   PROT_NONE page: an access past the end or before the start of a kernel's output is the launch's
//   error (the tests run one schedule in each mode, and pad their inputs with NaN rows).
// Not emulated: the memory model beyond barriers, timing, and
// the device math library (the host math of csrc/common is used, as the CPU kernels do).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define EMU_CUDA_ARCH 900  // what `__CUDA_ARCH__` in csrc/cuda becomes: the sm_90 code paths are compiled

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The built-in variables: globals that the scheduler sets before it switches to a fiber (kernels read
// them between switches only, and every switch is an opaque call, so no stale copy survives one).
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

// ---- runtime API (what csrc/cuda calls) ----
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
  cudaDevAttrMultiProcessorCount = 16,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct cudaFuncAttributes {
  size_t sharedSizeBytes, constSizeBytes, localSizeBytes;
  int maxThreadsPerBlock, numRegs, ptxVersion, binaryVersion;
};
enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension = 4 };
struct cudaLaunchAttributeValue {
  struct {
    unsigned x, y, z;
  } clusterDim;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};

namespace emu {

using Body = void (*)(void*);  // runs the kernel for the current fiber; the argument: its bound call

// Runs a grid: every block (clusters of cluster_x consecutive blocks together) with every thread.
// Throws c10::Error (a Python RuntimeError) naming the kernel on any violation.
void run_grid(const char* name, const void* func, dim3 grid, dim3 block, size_t smem, unsigned cluster_x,
              Body body, void* call);

void* shared_var(const void* key, size_t bytes, const char* file, int line);  // 64-byte aligned
void* dynamic_shared();
void* map_shared_rank(const void* p, unsigned rank);
void syncthreads(const char* file, int line);
int syncthreads_or(int pred, const char* file, int line);
void warp_exchange(const void* v, size_t bytes, void* out, int src_lane_xor, int src_lane_down, unsigned mask,
                   const char* file, int line);
void cluster_sync(const char* file, int line);
unsigned cluster_rank();
unsigned cluster_size();
void copy_async(void* dst, const void* src, size_t bytes);
void copy_wait(const char* file, int line);

cudaError_t device_attribute(int* value, cudaDeviceAttr attr);
cudaError_t func_attributes(cudaFuncAttributes* a, const void* func);
cudaError_t set_func_attribute(const void* func, cudaFuncAttribute attr, int value);
cudaError_t max_active_clusters(int* n, const void* func, const cudaLaunchConfig_t* cfg);

template <class T>
T& shared(const void* key, const char* file, int line) {
  static_assert(alignof(T) <= 64, "emu: shared variables are 64-byte aligned");
  return *static_cast<T*>(shared_var(key, sizeof(T), file, line));
}
template <class T>
T* dynamic_shared_as() {
  return static_cast<T*>(dynamic_shared());
}

// A launch: the kernel's parameters copied by value, as a launch copies them.
template <class... P>
struct Call {
  void (*kernel)(P...);
  std::tuple<P...> args;
  static void run(void* self) {
    auto* c = static_cast<Call*>(self);
    std::apply(c->kernel, c->args);
  }
};

template <class... P>
struct Launch {
  const char* name;
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  template <class... A>
  void operator()(A&&... a) const {
    Call<P...> c{kernel, std::tuple<P...>(std::forward<A>(a)...)};
    run_grid(name, reinterpret_cast<const void*>(kernel), grid, block, smem, 1, &Call<P...>::run, &c);
  }
};

// `name<<<grid, block, smem, stream>>>(args)` is rewritten to `emu::launch("name", name, grid, ...)(args)`.
template <class... P>
Launch<P...> launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem = 0,
                    cudaStream_t = nullptr) {
  return {name, kernel, grid, block, smem};
}

}  // namespace emu

template <class... P, class... A>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* cfg, void (*kernel)(P...), A&&... a) {
  unsigned cx = 1;
  for (unsigned i = 0; i < cfg->numAttrs; ++i)
    if (cfg->attrs[i].id == cudaLaunchAttributeClusterDimension) {
      if (cfg->attrs[i].val.clusterDim.y != 1 || cfg->attrs[i].val.clusterDim.z != 1) return cudaErrorInvalidValue;
      cx = cfg->attrs[i].val.clusterDim.x;
    }
  emu::Call<P...> c{kernel, std::tuple<P...>(std::forward<A>(a)...)};
  emu::run_grid("cudaLaunchKernelEx", reinterpret_cast<const void*>(kernel), cfg->gridDim, cfg->blockDim,
                cfg->dynamicSmemBytes, cx, &emu::Call<P...>::run, &c);
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) { return emu::device_attribute(v, a); }
template <class F>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, F* f) {
  return emu::func_attributes(a, reinterpret_cast<const void*>(f));
}
template <class F>
cudaError_t cudaFuncSetAttribute(F* f, cudaFuncAttribute attr, int value) {
  return emu::set_func_attribute(reinterpret_cast<const void*>(f), attr, value);
}
template <class F>
cudaError_t cudaOccupancyMaxActiveClusters(int* n, F* f, const cudaLaunchConfig_t* cfg) {
  return emu::max_active_clusters(n, reinterpret_cast<const void*>(f), cfg);
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated CUDA error"; }

// ---- device functions ----
#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
#define __syncthreads_or(p) ::emu::syncthreads_or((p), __FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, o, ...) ::emu::shfl(mask, v, o, -1, __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, o, ...) ::emu::shfl(mask, v, -1, o, __FILE__, __LINE__)

namespace emu {
template <class T>
T shfl(unsigned mask, T v, int x, int down, const char* file, int line) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable_v<T>, "emu: shuffles of at most 16 bytes");
  T r;
  warp_exchange(&v, sizeof(T), &r, x, down, mask, file, line);
  return r;
}
}  // namespace emu

// Shared memory: fibers of a block run one at a time on one OS thread, so a plain read-modify-write is
// atomic here.
inline unsigned atomicOr(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old | v;
  return old;
}
inline int atomicOr(int* p, int v) {
  const int old = *p;
  *p = old | v;
  return old;
}
