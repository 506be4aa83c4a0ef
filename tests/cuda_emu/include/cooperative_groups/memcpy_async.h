// cooperative_groups::memcpy_async / wait as the emulator provides them: the copy lands at wait.
#pragma once
#include "../cooperative_groups.h"

namespace cooperative_groups {

inline void memcpy_async(const thread_block&, void* dst, const void* src, size_t bytes) {
  ::emu::copy_async(dst, src, bytes);
}
// A macro-free call site is what the barrier's line check sees: every thread calls wait from one line.
inline void wait(const thread_block&) { ::emu::copy_wait(__FILE__, __LINE__); }

}  // namespace cooperative_groups
