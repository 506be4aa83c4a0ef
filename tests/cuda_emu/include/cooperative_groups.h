// cooperative_groups as the emulator provides it (tests/cuda_emu/emu.h): the thread block and the
// thread block cluster, with distributed shared memory.
#pragma once
#include "../emu.h"

namespace cooperative_groups {

struct thread_block {
  void sync() const { ::emu::syncthreads(__FILE__, __LINE__); }
  unsigned thread_rank() const { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
  unsigned size() const { return blockDim.x * blockDim.y * blockDim.z; }
};
inline thread_block this_thread_block() { return {}; }

struct cluster_group {
  void sync() const { ::emu::cluster_sync(__FILE__, __LINE__); }
  unsigned block_rank() const { return ::emu::cluster_rank(); }
  unsigned num_blocks() const { return ::emu::cluster_size(); }
  template <class T>
  T* map_shared_rank(T* p, unsigned rank) const {
    return static_cast<T*>(::emu::map_shared_rank(p, rank));
  }
};
inline cluster_group this_cluster() { return {}; }

}  // namespace cooperative_groups
