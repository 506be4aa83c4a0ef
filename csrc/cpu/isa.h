// Run-time choice of the widest x86 instruction set a CPU kernel's inner loops were compiled for, shared
// by the distillation and CKA CPU kernels.
#pragma once
#include <cstdlib>
#include <string>
#include <type_traits>

namespace sdft::cpu {

// The widest instruction set the row loops were compiled for that this CPU runs (checked once).
// SDFT_CPU_ISA=base|avx2 caps it, so that the tests can run every variant on one machine. Only x86
// builds have the AVX clones (SDFT_X86_CLONES); elsewhere the baseline loops are the only ones.
#if defined(__x86_64__) || defined(__i386__)
#define SDFT_X86_CLONES 1
#else
#define SDFT_X86_CLONES 0
#endif
// GCC widens the loops to 512 bits only when asked; clang takes no such target option.
#if defined(__clang__)
#define SDFT_AVX512_TARGET "avx512f,avx512bw,avx512dq,avx512vl,fma,f16c"
#else
#define SDFT_AVX512_TARGET "avx512f,avx512bw,avx512dq,avx512vl,fma,f16c,prefer-vector-width=512"
#endif
enum class Isa { kBase, kAvx2, kAvx512 };
// Whether the baseline loops may convert fp16 with the compiler's _Float16 (hardware on AArch64).
#if defined(__aarch64__)
constexpr bool kBaseHwHalf = true;
#else
constexpr bool kBaseHwHalf = false;
#endif
inline Isa cpu_isa() {
  static const Isa isa = [] {
#if SDFT_X86_CLONES
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
    const bool avx2 = false, avx512 = false;
#endif
    const char* cap = std::getenv("SDFT_CPU_ISA");
    const std::string want = cap ? cap : "";
    if (want == "base") return Isa::kBase;
    if (want == "avx2") return avx2 ? Isa::kAvx2 : Isa::kBase;
    return avx512 ? Isa::kAvx512 : (avx2 ? Isa::kAvx2 : Isa::kBase);
  }();
  return isa;
}

// Runs rows(hw_half), one thread's loop, compiled for the widest ISA cpu_isa() allows: rows is a
// lambda marked SDFT_INLINE_ROWS taking std::integral_constant<bool, HW_HALF> (whether fp16 may convert
// with _Float16 in hardware). Forced inline into each target clone below, it is compiled once per ISA.
#define SDFT_INLINE_ROWS __attribute__((always_inline))
#if SDFT_X86_CLONES
template <typename F>
__attribute__((target(SDFT_AVX512_TARGET))) void rows_avx512(const F& rows) { rows(std::true_type{}); }
template <typename F>
__attribute__((target("avx2,fma,f16c"))) void rows_avx2(const F& rows) { rows(std::true_type{}); }
#endif
template <typename F>
void on_widest_isa(const F& rows) {
#if SDFT_X86_CLONES
  const Isa isa = cpu_isa();
  if (isa == Isa::kAvx512) return rows_avx512(rows);
  if (isa == Isa::kAvx2) return rows_avx2(rows);
#endif
  rows(std::integral_constant<bool, kBaseHwHalf>{});
}

}  // namespace sdft::cpu
