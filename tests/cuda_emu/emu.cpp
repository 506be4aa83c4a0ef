// The emulator's scheduler and runtime (see emu.h for what it checks). One fiber per CUDA thread, all
// on one OS thread; a block runs alone, or with the other blocks of its cluster.
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <signal.h>
#include <sys/mman.h>
#include <torch/library.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <stdexcept>

#include "emu.h"

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace emu {
namespace {

struct Config {
  int64_t order = 0;                 // 0: the first ready fiber runs next (greedy), 1: the last
  int64_t sm_major = 9;              // cudaDevAttrComputeCapabilityMajor
  int64_t ptx_version = 90;          // cudaFuncAttributes::ptxVersion
  int64_t max_active_clusters = 1;   // cudaOccupancyMaxActiveClusters
} config;

constexpr size_t kStack = 128 * 1024;  // per fiber; the first page is a guard
constexpr size_t kRedZone = 64;        // bytes of 0xFF after every shared variable
constexpr unsigned char kPoison = 0xFF;
constexpr int kStaticLimit = 48 * 1024;  // shared memory per block without opting in
constexpr int kOptin = 227 * 1024;       // H100 / H200 cudaDevAttrMaxSharedMemoryPerBlockOptin
const char kDynamicKey = 0;

std::string launch_log;
std::map<const void*, int> dyn_attr;      // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel
std::map<const void*, size_t> static_of;  // static shared bytes a kernel was seen to use

struct Violation : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Fiber;
struct Block;
struct Group;

struct Barrier {
  const char* what = "";
  int expected = 0, arrived = 0;
  const char* file = nullptr;
  int line = 0;
  int acc = 0, result = 0;      // __syncthreads_or
  bool copies = false;          // cooperative_groups::wait: the block's pending copies land at release
  struct Warp* warp = nullptr;  // a shuffle: the lanes' values are snapshot at release
  Fiber** scope = nullptr;      // the fibers it synchronises
  size_t scope_n = 0;
};

struct Warp {
  Barrier bar;
  unsigned char slot[32][16], snap[32][16];
};

struct Alloc {
  const void* key;
  unsigned char* p;
  size_t bytes;
  const char* file;
  int line;
};

struct Block {
  uint3 idx;
  unsigned rank = 0;
  Group* group = nullptr;
  std::vector<Fiber*> fibers;
  Barrier bar;
  std::vector<Warp> warps;
  std::vector<Alloc> allocs;  // allocs[0]: the dynamic shared memory
  struct Copy {
    void* dst;
    const void* src;
    size_t bytes;
  };
  std::vector<Copy> pending;
  size_t done = 0;
  bool alive = true;
};

struct Group {
  std::vector<std::unique_ptr<Block>> blocks;
  std::vector<Fiber*> fibers;
  Barrier bar;
};

enum State { kReady, kWaiting, kDone };

// Switching fibers: on x86-64 a few instructions that save the callee-saved registers and swap stacks
// (glibc's swapcontext also saves the signal mask, a system call per switch: the emulated tests took
// 10x longer with it); elsewhere ucontext.
#if defined(__x86_64__)
extern "C" void emu_switch(void** save_sp, void* next_sp);
asm(R"(
.text
.globl emu_switch
.hidden emu_switch
.type emu_switch, @function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size emu_switch, .-emu_switch
)");
struct Context {
  void* sp = nullptr;
};
#else
struct Context {
  ucontext_t uc;
};
#endif

struct Fiber {
  Context ctx;
  void* stack = nullptr;
  uint3 tid;
  unsigned linear = 0;
  Block* blk = nullptr;
  State st = kReady;
  Barrier* on = nullptr;
  size_t copies = 0;
  size_t pos = 0;  // in the schedule order
};

Context sched_ctx;
Fiber* cur = nullptr;
size_t rewind = SIZE_MAX;  // the earliest schedule position a barrier release made ready
size_t finished = 0;       // fibers of the running group that have exited
std::string failure;  // the first violation of the running launch, with where it happened
Body cur_body = nullptr;
void* cur_call = nullptr;
const void* cur_func = nullptr;
size_t cur_smem = 0;
std::vector<void*> stack_pool;
std::set<uintptr_t> stack_guards;  // the first page of every fiber stack

std::string where(const Fiber* f) {
  std::ostringstream o;
  o << "block (" << f->blk->idx.x << "," << f->blk->idx.y << "," << f->blk->idx.z << ") thread (" << f->tid.x << ","
    << f->tid.y << "," << f->tid.z << ")";
  return o.str();
}

std::string site(const char* file, int line) {
  std::string f = file ? file : "?";
  const auto slash = f.rfind('/');
  return (slash == std::string::npos ? f : f.substr(slash + 1)) + ":" + std::to_string(line);
}

void* take_stack() {
  if (!stack_pool.empty()) {
    void* s = stack_pool.back();
    stack_pool.pop_back();
    return s;
  }
  void* s = mmap(nullptr, kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  TORCH_CHECK(s != MAP_FAILED, "emulator: out of memory for fiber stacks");
  mprotect(s, 4096, PROT_NONE);  // a stack overflow faults instead of corrupting its neighbour
  stack_guards.insert(reinterpret_cast<uintptr_t>(s));
  return s;
}

void trampoline();

#if defined(__x86_64__)
void switch_to(Context& from, Context& to) { emu_switch(&from.sp, to.sp); }
[[noreturn]] void fiber_entry() {
  trampoline();
  emu_switch(&cur->ctx.sp, sched_ctx.sp);  // a finished fiber is never resumed
  __builtin_unreachable();
}
// A new fiber's stack as emu_switch leaves a suspended one: mxcsr / x87 control word, six registers,
// and fiber_entry as the return address (16-byte aligned, so the entry sees a call's alignment).
void start_context(Context& c, void* stack, size_t size) {
  auto* top = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t(15));
  *--top = 0;  // fiber_entry's (never used) return address
  *--top = reinterpret_cast<uint64_t>(&fiber_entry);
  for (int i = 0; i < 6; ++i) *--top = 0;
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  --top;
  std::memcpy(top, &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(top) + 4, &fpucw, 2);
  c.sp = top;
}
#else
void switch_to(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
void start_context(Context& c, void* stack, size_t size) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = &sched_ctx.uc;
  makecontext(&c.uc, trampoline, 0);
}
#endif

void yield() { switch_to(cur->ctx, sched_ctx); }

void land_copies(Block& b) {
  for (Fiber* f : b.fibers)
    if (f->copies != b.pending.size())
      throw Violation("cooperative_groups::memcpy_async called " + std::to_string(f->copies) + " times by " +
                      where(f) + " but " + std::to_string(b.pending.size()) + " times by another thread");
  for (const auto& c : b.pending) std::memcpy(c.dst, c.src, c.bytes);
  b.pending.clear();
  for (Fiber* f : b.fibers) f->copies = 0;
}

void release(Barrier& b) {
  b.arrived = 0;
  b.result = b.acc;
  b.acc = 0;
  if (b.warp) std::memcpy(b.warp->snap, b.warp->slot, sizeof b.warp->slot);
  if (b.copies) land_copies(*cur->blk);
  b.copies = false;
  for (size_t i = 0; i < b.scope_n; ++i)
    if (b.scope[i]->on == &b) {
      b.scope[i]->on = nullptr;
      b.scope[i]->st = kReady;
      rewind = std::min(rewind, b.scope[i]->pos);
    }
}

void arrive(Barrier& b, const char* file, int line) {
  if (b.arrived == 0) {
    b.file = file;
    b.line = line;
  } else if (b.line != line || std::strcmp(b.file, file) != 0) {
    throw Violation(std::string(b.what) + " reached at " + site(file, line) + " while other threads wait at " +
                    site(b.file, b.line));
  }
  cur->st = kWaiting;
  cur->on = &b;
  if (++b.arrived == b.expected) release(b);
  yield();
}

Warp& warp_of(Fiber* f) { return f->blk->warps[f->linear / 32]; }

// (Violations thrown in a fiber are prefixed with where() it happened by trampoline.)
void check_exit(const Barrier& b) {
  if (b.arrived > 0)
    throw Violation("exited while " + std::to_string(b.arrived) + " threads wait at " + b.what + " (" +
                    site(b.file, b.line) + ")");
}

void end_block(Block& b) {
  size_t static_bytes = 0;
  for (size_t i = 0; i < b.allocs.size(); ++i) {
    const Alloc& a = b.allocs[i];
    if (i > 0) static_bytes += a.bytes;
    for (size_t k = a.bytes; k < a.bytes + kRedZone; ++k)
      if (a.p[k] != kPoison) {
        std::ostringstream o;
        o << "shared memory written " << (k - a.bytes) << " bytes past the end of "
          << (i == 0 ? std::string("the dynamic shared memory") : "the variable declared at " + site(a.file, a.line))
          << " (" << a.bytes << " bytes) by this block";
        throw Violation(o.str());
      }
    std::memset(a.p, kPoison, a.bytes + kRedZone);  // what a block that exited leaves to its cluster
  }
  auto& s = static_of[cur_func];
  s = std::max(s, static_bytes);
  const auto attr = dyn_attr.find(cur_func);
  const size_t dyn_limit = attr != dyn_attr.end() ? attr->second
                           : static_bytes < size_t(kStaticLimit) ? kStaticLimit - static_bytes
                                                                 : 0;
  if (cur_smem > dyn_limit || static_bytes + cur_smem > size_t(kOptin))
    throw Violation(std::to_string(cur_smem) + " bytes of dynamic shared memory (+ " + std::to_string(static_bytes) +
                    " static) exceed what the kernel may use (" + std::to_string(dyn_limit) +
                    " dynamic: above 48 KiB needs cudaFuncSetAttribute)");
  b.alive = false;
}

void on_exit(Fiber* f) {
  f->st = kDone;
  ++finished;
  Block& b = *f->blk;
  check_exit(b.bar);
  check_exit(warp_of(f).bar);
  check_exit(b.group->bar);
  if (++b.done == b.fibers.size()) end_block(b);
}

void trampoline() {
  Fiber* f = cur;
  try {
    cur_body(cur_call);
    on_exit(f);
  } catch (const std::exception& e) {
    if (failure.empty()) failure = where(f) + ": " + e.what();
    if (f->st != kDone) {  // (on_exit may have marked it before its checks threw)
      f->st = kDone;
      ++finished;
    }
  }
}

std::string deadlock(const std::vector<Fiber*>& all) {
  std::map<std::string, int> at;
  for (Fiber* f : all)
    if (f->st != kDone && f->on) ++at[std::string(f->on->what) + " at " + site(f->on->file, f->on->line)];
  std::ostringstream o;
  o << "deadlock:";
  for (const auto& [k, n] : at) o << " " << n << " threads wait at " << k << ";";
  o << " " << finished << " exited";
  return o.str();
}

void free_group(Group& g, std::vector<std::unique_ptr<Fiber>>& fibers) {
  for (auto& b : g.blocks)
    for (auto& a : b->allocs) std::free(a.p);
  for (auto& f : fibers) stack_pool.push_back(f->stack);
}

Alloc make_alloc(const void* key, size_t bytes, const char* file, int line) {
  const size_t total = (bytes + kRedZone + 63) / 64 * 64;
  auto* p = static_cast<unsigned char*>(std::aligned_alloc(64, total));
  TORCH_CHECK(p, "emulator: out of memory for shared memory");
  std::memset(p, kPoison, bytes + kRedZone);
  return {key, p, bytes, file, line};
}

void run_group(const std::vector<uint3>& idx, dim3 block) {
  const unsigned nt = block.x * block.y * block.z;
  Group g;
  std::vector<std::unique_ptr<Fiber>> fibers;
  for (size_t r = 0; r < idx.size(); ++r) {
    auto b = std::make_unique<Block>();
    b->idx = idx[r];
    b->rank = static_cast<unsigned>(r);
    b->group = &g;
    b->allocs.push_back(make_alloc(&kDynamicKey, cur_smem, nullptr, 0));
    b->warps.resize((nt + 31) / 32);
    for (unsigned t = 0; t < nt; ++t) {
      auto f = std::make_unique<Fiber>();
      f->tid = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
      f->linear = t;
      f->blk = b.get();
      f->stack = take_stack();
      start_context(f->ctx, f->stack, kStack);
      b->fibers.push_back(f.get());
      g.fibers.push_back(f.get());
      fibers.push_back(std::move(f));
    }
    b->bar = {"__syncthreads", static_cast<int>(nt)};
    b->bar.scope = b->fibers.data();
    b->bar.scope_n = nt;
    for (size_t w = 0; w < b->warps.size(); ++w) {
      Warp& wp = b->warps[w];
      const int lanes = static_cast<int>(std::min<size_t>(32, nt - 32 * w));
      wp.bar = {"a warp shuffle", lanes};
      wp.bar.warp = &wp;
      wp.bar.scope = b->fibers.data() + 32 * w;
      wp.bar.scope_n = lanes;
    }
    g.blocks.push_back(std::move(b));
  }
  g.bar = {"cluster.sync", static_cast<int>(g.fibers.size())};
  g.bar.scope = g.fibers.data();
  g.bar.scope_n = g.fibers.size();
  // Greedy: the first ready fiber in schedule order always runs next, so after a barrier the first
  // warp (or, reversed, the last) runs ahead as far as the next barrier it cannot pass alone, as a
  // warp may on a GPU; a lockstep round-robin would hide a missing barrier behind the shuffles.
  std::vector<Fiber*> order = g.fibers;
  if (config.order) std::reverse(order.begin(), order.end());
  for (size_t i = 0; i < order.size(); ++i) order[i]->pos = i;
  finished = 0;
  size_t i = 0;
  while (failure.empty()) {
    while (i < order.size() && order[i]->st != kReady) ++i;
    if (i == order.size()) {
      if (finished < order.size()) failure = deadlock(order);
      break;
    }
    Fiber* f = order[i];
    cur = f;
    threadIdx = f->tid;
    blockIdx = f->blk->idx;
    rewind = SIZE_MAX;
    switch_to(sched_ctx, f->ctx);
    if (rewind < i) i = rewind;
  }
  cur = nullptr;
  free_group(g, fibers);
}

// ---- global-memory bounds: a guard-page CPU allocator and a SIGSEGV handler ----
// While guard(mode) is on, every CPU tensor allocation lies between two PROT_NONE pages and touches one
// of them: mode 1 ends it (to 16 bytes) where the upper page begins, mode 2 starts it where the lower
// page ends. A kernel that reads or writes past the end (mode 1) or before the start (mode 2) of an
// output or input allocated then faults; the tests run one schedule under each mode. The handler turns
// that fault, or a fiber's stack overflow, into the launch's failure (the fiber is abandoned, as on any
// other violation). Other faults go to the handler that was there before.
constexpr size_t kPage = 4096;
std::set<uintptr_t> lower_guards, upper_guards;  // guard pages of live guarded allocations
int guard_mode = 0;                 // 0 off, 1 end at the upper guard, 2 start at the lower one

struct Guarded {
  void* base;
  size_t total;
};

void free_guarded(void* ctx) {
  auto* g = static_cast<Guarded*>(ctx);
  lower_guards.erase(reinterpret_cast<uintptr_t>(g->base));
  upper_guards.erase(reinterpret_cast<uintptr_t>(g->base) + g->total - kPage);
  munmap(g->base, g->total);
  delete g;
}

struct GuardAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, nullptr, nullptr, c10::Device(c10::DeviceType::CPU)};
    const size_t body = (n + 15) / 16 * 16, pages = (body + kPage - 1) / kPage, total = (pages + 2) * kPage;
    void* base = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(base != MAP_FAILED, "emulator: out of memory for a guarded allocation of ", n, " bytes");
    auto* lower = static_cast<char*>(base);
    auto* upper = lower + (pages + 1) * kPage;
    mprotect(lower, kPage, PROT_NONE);
    mprotect(upper, kPage, PROT_NONE);
    lower_guards.insert(reinterpret_cast<uintptr_t>(lower));
    upper_guards.insert(reinterpret_cast<uintptr_t>(upper));
    char* data = guard_mode == 2 ? lower + kPage : upper - body;
    return {data, new Guarded{base, total}, &free_guarded, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }
};

GuardAllocator guard_allocator;
c10::Allocator* saved_allocator = nullptr;
struct sigaction saved_segv;
std::vector<char> alt_stack(64 * 1024);

bool in_page(const std::set<uintptr_t>& pages, uintptr_t a) {
  auto it = pages.upper_bound(a);
  return it != pages.begin() && a - *std::prev(it) < kPage;
}

void on_segv(int, siginfo_t* si, void*) {
  const auto a = reinterpret_cast<uintptr_t>(si->si_addr);
  // which page was hit says what happened (in either mode an access can reach either guard)
  const bool before = in_page(lower_guards, a), past = in_page(upper_guards, a);
  const bool stack = in_page(stack_guards, a);
  if (cur && (before || past || stack)) {
    // (not async-signal-safe in general; this fault is synchronous, in kernel code, on this thread)
    if (failure.empty())
      failure = where(cur) + (before ? ": accessed global memory before the start of a tensor allocation"
                              : past ? ": accessed global memory past the end of a tensor allocation"
                                     : ": overflowed its fiber stack");
    cur->st = kDone;
    ++finished;
    sigset_t m;
    sigemptyset(&m);
    sigaddset(&m, SIGSEGV);
    sigprocmask(SIG_UNBLOCK, &m, nullptr);
    switch_to(cur->ctx, sched_ctx);  // never resumed
  }
  sigaction(SIGSEGV, &saved_segv, nullptr);  // not ours: the fault recurs under the previous handler
}

void guard(int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 2, "emulator: guard mode must be 0 (off), 1 (end) or 2 (start), got ", mode);
  guard_mode = static_cast<int>(mode);
  const bool on = mode != 0;
  if (on == (saved_allocator != nullptr)) return;
  if (on) {
    saved_allocator = c10::GetCPUAllocator();
    c10::SetCPUAllocator(&guard_allocator, 255);
    stack_t ss{};
    ss.ss_sp = alt_stack.data();
    ss.ss_size = alt_stack.size();
    sigaltstack(&ss, nullptr);
    struct sigaction sa {};
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &saved_segv);
  } else {
    c10::SetCPUAllocator(saved_allocator, 255);
    saved_allocator = nullptr;
    sigaction(SIGSEGV, &saved_segv, nullptr);
  }
}

Block& block_of_cur() {
  if (!cur) throw Violation("a device function called outside a kernel");
  return *cur->blk;
}

}  // namespace

void run_grid(const char* name, const void* func, dim3 grid, dim3 block, size_t smem, unsigned cluster_x, Body body,
              void* call) {
  const uint64_t nt = uint64_t(block.x) * block.y * block.z;
  TORCH_CHECK(nt >= 1 && nt <= 1024 && block.z <= 64, "emulated launch of ", name, ": invalid block (", block.x,
              ",", block.y, ",", block.z, ")");
  TORCH_CHECK(grid.x >= 1 && grid.x <= 0x7fffffffu && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 &&
                  grid.z <= 65535,
              "emulated launch of ", name, ": invalid grid (", grid.x, ",", grid.y, ",", grid.z, ")");
  TORCH_CHECK(cluster_x >= 1 && cluster_x <= 8 && grid.x % cluster_x == 0, "emulated launch of ", name,
              ": a cluster of ", cluster_x, " blocks needs a grid divisible by it (grid.x = ", grid.x, ")");
  TORCH_CHECK(cluster_x == 1 || config.sm_major >= 9, "emulated launch of ", name, ": clusters need sm_90");
  std::ostringstream log;
  log << name << " grid=(" << grid.x << "," << grid.y << "," << grid.z << ") block=(" << block.x << "," << block.y
      << "," << block.z << ") smem=" << smem << " cluster=" << cluster_x << "\n";
  launch_log += log.str();
  gridDim = grid;
  blockDim = block;
  cur_body = body;
  cur_call = call;
  cur_func = func;
  cur_smem = smem;
  failure.clear();
  std::vector<std::vector<uint3>> groups;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; x += cluster_x) {
        std::vector<uint3> g;
        for (unsigned r = 0; r < cluster_x; ++r) g.push_back({x + r, y, z});
        groups.push_back(std::move(g));
      }
  if (config.order) std::reverse(groups.begin(), groups.end());
  for (const auto& g : groups) {
    run_group(g, block);
    if (!failure.empty()) break;
  }
  const std::string f = failure;
  failure.clear();
  TORCH_CHECK(f.empty(), "emulated kernel ", name, ": ", f);
}

void* shared_var(const void* key, size_t bytes, const char* file, int line) {
  Block& b = block_of_cur();
  for (const Alloc& a : b.allocs)
    if (a.key == key) return a.p;
  b.allocs.push_back(make_alloc(key, bytes, file, line));
  return b.allocs.back().p;
}

void* dynamic_shared() { return block_of_cur().allocs[0].p; }

void* map_shared_rank(const void* p, unsigned rank) {
  Block& b = block_of_cur();
  const auto* q = static_cast<const unsigned char*>(p);
  const Alloc* src = nullptr;
  for (const Alloc& a : b.allocs)
    if (q >= a.p && q < a.p + a.bytes) src = &a;
  if (!src) throw Violation("map_shared_rank of a pointer that is not into this block's shared memory");
  Group& g = *b.group;
  if (rank >= g.blocks.size())
    throw Violation("map_shared_rank to rank " + std::to_string(rank) + " of a cluster of " +
                    std::to_string(g.blocks.size()));
  Block& t = *g.blocks[rank];
  if (!t.alive) throw Violation("map_shared_rank to block rank " + std::to_string(rank) + ", which has exited");
  for (const Alloc& a : t.allocs)
    if (a.key == src->key) return a.p + (q - src->p);
  t.allocs.push_back(make_alloc(src->key, src->bytes, src->file, src->line));
  return t.allocs.back().p + (q - src->p);
}

void syncthreads(const char* file, int line) { arrive(block_of_cur().bar, file, line); }

int syncthreads_or(int pred, const char* file, int line) {
  Barrier& b = block_of_cur().bar;
  b.acc |= pred != 0;
  arrive(b, file, line);
  return b.result;
}

void warp_exchange(const void* v, size_t bytes, void* out, int x, int down, unsigned mask, const char* file,
                   int line) {
  block_of_cur();  // inside a kernel
  if (mask != 0xffffffffu) throw Violation("the emulator supports full-warp shuffle masks only");
  Warp& w = warp_of(cur);
  if (w.bar.expected != 32) throw Violation("a full-mask shuffle in a warp of fewer than 32 threads");
  const unsigned lane = cur->linear % 32;
  std::memcpy(w.slot[lane], v, bytes);
  arrive(w.bar, file, line);
  unsigned src = x >= 0 ? lane ^ unsigned(x) : lane + unsigned(down);
  if (src >= 32) src = lane;  // __shfl_down_sync past the last lane returns the caller's own value
  std::memcpy(out, w.snap[src], bytes);
}

void cluster_sync(const char* file, int line) { arrive(block_of_cur().group->bar, file, line); }
unsigned cluster_rank() { return block_of_cur().rank; }
unsigned cluster_size() { return static_cast<unsigned>(block_of_cur().group->blocks.size()); }

void copy_async(void* dst, const void* src, size_t bytes) {
  Block& b = block_of_cur();
  const auto* d = static_cast<unsigned char*>(dst);
  bool shared = false;
  for (const Alloc& a : b.allocs) shared |= d >= a.p && d + bytes <= a.p + a.bytes;
  if (!shared) throw Violation("memcpy_async destination is not inside one of this block's shared variables");
  const size_t k = cur->copies++;
  if (k < b.pending.size()) {
    const auto& c = b.pending[k];
    if (c.dst != dst || c.src != src || c.bytes != bytes)
      throw Violation("memcpy_async called with different arguments by threads of one block");
  } else {
    b.pending.push_back({dst, src, bytes});
  }
}

void copy_wait(const char* file, int line) {
  Barrier& b = block_of_cur().bar;
  b.copies = true;
  arrive(b, file, line);
}

cudaError_t device_attribute(int* v, cudaDeviceAttr a) {
  switch (a) {
    case cudaDevAttrComputeCapabilityMajor: *v = static_cast<int>(config.sm_major); return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *v = 0; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = kStaticLimit; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = kOptin; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *v = 132; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

cudaError_t func_attributes(cudaFuncAttributes* a, const void* func) {
  *a = {};
  const auto s = static_of.find(func);
  a->sharedSizeBytes = s != static_of.end() ? s->second : 1024;  // before a first run: an estimate
  a->maxThreadsPerBlock = 1024;
  a->numRegs = 32;
  a->ptxVersion = static_cast<int>(config.ptx_version);
  a->binaryVersion = static_cast<int>(config.ptx_version);
  return cudaSuccess;
}

cudaError_t set_func_attribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > kOptin) return cudaErrorInvalidValue;
  dyn_attr[func] = value;
  return cudaSuccess;
}

cudaError_t max_active_clusters(int* n, const void*, const cudaLaunchConfig_t* cfg) {
  if (config.sm_major < 9) return cudaErrorInvalidValue;
  for (unsigned i = 0; i < cfg->numAttrs; ++i)
    if (cfg->attrs[i].id == cudaLaunchAttributeClusterDimension && cfg->attrs[i].val.clusterDim.x > 8)
      return cudaErrorInvalidValue;
  *n = static_cast<int>(config.max_active_clusters);
  return cudaSuccess;
}

namespace {

// configure(): the schedule order and the device the launchers see; resets the launch log.
void configure(int64_t order, int64_t sm_major, int64_t ptx_version, int64_t max_active_clusters) {
  config = {order, sm_major, ptx_version, max_active_clusters};
  launch_log.clear();
  dyn_attr.clear();
}

std::string launches() { return launch_log; }

}  // namespace
}  // namespace emu

TORCH_LIBRARY(sdft_emu_ctl, m) {
  m.def("configure(int order, int sm_major, int ptx_version, int max_active_clusters) -> ()", &emu::configure);
  m.def("launches() -> str", &emu::launches);
  m.def("guard(int mode) -> ()", &emu::guard);
}
