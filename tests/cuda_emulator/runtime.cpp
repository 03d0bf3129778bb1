// The emulated launch (runtime.h): the threads of a block as fibers (ucontext) on the
// launching thread, the blocks in order, barriers that report rather than hang when a
// thread can never arrive.
#include "runtime.h"

#include <algorithm>
#include <mutex>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <vector_functions.h>

#include <ucontext.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace emu {
namespace {

std::mutex error_mutex;
cudaError_t last_error = cudaSuccess;
std::string last_message;

void record(cudaError_t code, const std::string& what) {
  std::lock_guard<std::mutex> lock(error_mutex);
  if (last_error == cudaSuccess) {
    last_error = code;
    last_message = what;
  }
}

// AddressSanitizer must be told when the stack changes, or it reports the fibers' frames as
// overflows of the OS thread's stack.
#if defined(__SANITIZE_ADDRESS__)
void start_switch(void** fake_stack, const void* bottom, size_t size) {
  __sanitizer_start_switch_fiber(fake_stack, bottom, size);
}
void finish_switch(void* fake_stack, const void** bottom, size_t* size) {
  __sanitizer_finish_switch_fiber(fake_stack, bottom, size);
}
void unpoison(void* p, size_t n) { __asan_unpoison_memory_region(p, n); }
#else
void start_switch(void**, const void*, size_t) {}
void finish_switch(void*, const void**, size_t*) {}
void unpoison(void*, size_t) {}
#endif

constexpr size_t kStackBytes = 128 * 1024;

struct Fiber;

// A barrier over a fixed set of threads. A thread that has returned from the kernel can never
// arrive: a barrier that one of its threads waits at while another has returned (in either
// order) is recorded as a failure and opened, so the launch finishes and reports it.
struct Barrier {
  int size = 0, arrived = 0, exited = 0;
  bool broken = false;
  const char* name = "";
  std::vector<Fiber*> waiters;
  void reset(int n, const char* what) {
    size = n;
    name = what;
    arrived = exited = 0;
    broken = false;
    waiters.clear();
  }
};

enum class State { ready, waiting, done };

struct Fiber {
  ucontext_t context;
  char* stack = nullptr;  // kStackBytes of the launch's stacks
  unsigned id = 0;
  State state = State::ready;
};

struct Warp {
  Barrier barrier;
  unsigned char lanes[32][8];
  int size = 32;
};

// The threads of one block, as fibers on the launching OS thread: each runs until it waits at
// a barrier or returns, then the next; a barrier opens when its last thread arrives.
struct Block {
  ucontext_t scheduler;
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_size = 0;
  std::unique_ptr<char[]> stacks;  // every fiber's, in one piece: the race detector skips them
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  unsigned linear_block = 0;
  uint64_t epoch = 0;  // __syncthreads passed in this block: what orders its threads' accesses
  Barrier sync;
  std::vector<Warp> warps;
  const std::function<void()>* body = nullptr;
};

thread_local Block* block = nullptr;

void open(Barrier& b) {
  for (Fiber* f : b.waiters) f->state = State::ready;
  b.waiters.clear();
  b.arrived = 0;
  if (block && &b == &block->sync) ++block->epoch;
}

void break_barrier(Barrier& b, const char* why) {
  record(cudaErrorLaunchFailure, std::string(b.name) + " " + why + " (undefined on a GPU; a hang or garbage there)");
  b.broken = true;
  open(b);
}

// From a fiber back to the scheduler (for good when the fiber is done).
void yield_to_scheduler(bool done) {
  Block& blk = *block;
  void* fake = nullptr;
  start_switch(done ? nullptr : &fake, blk.scheduler_stack, blk.scheduler_stack_size);
  if (done) {
    setcontext(&blk.scheduler);
  } else {
    swapcontext(&blk.current->context, &blk.scheduler);
    finish_switch(fake, nullptr, nullptr);
  }
}

void wait(Barrier& b) {
  if (b.broken) return;
  if (b.exited > 0) return break_barrier(b, "reached after another thread of the same group returned");
  if (++b.arrived == b.size) return open(b);
  b.waiters.push_back(block->current);
  block->current->state = State::waiting;
  yield_to_scheduler(false);
}

void leave(Barrier& b) {
  ++b.exited;
  if (b.arrived > 0 && !b.broken) break_barrier(b, "waited at by some threads while another returned");
}

void fiber_main() {
  Block& blk = *block;
  finish_switch(nullptr, &blk.scheduler_stack, &blk.scheduler_stack_size);
  (*blk.body)();
  leave(blk.sync);
  leave(blk.warps[blk.current->id / 32].barrier);
  blk.current->state = State::done;
  yield_to_scheduler(true);
}

// The order the scheduler resumes a block's ready threads in, pass after pass: by thread
// index (the default), the reverse, or a fresh random order each pass. A kernel that is
// right only in one order is missing a barrier. AIAAS_FAST_EMULATOR_SCHEDULE=forward |
// reverse | random:SEED, read at each launch.
struct Schedule {
  enum { forward, reverse, random } kind = forward;
  std::mt19937 rng;
  Schedule() {
    const char* env = std::getenv("AIAAS_FAST_EMULATOR_SCHEDULE");
    const std::string s = env ? env : "forward";
    if (s == "reverse") {
      kind = reverse;
    } else if (s.rfind("random:", 0) == 0) {
      kind = random;
      rng.seed(std::stoul(s.substr(7)));
    } else if (s != "forward") {
      record(cudaErrorInvalidValue, "AIAAS_FAST_EMULATOR_SCHEDULE: forward, reverse or random:SEED, not " + s);
    }
  }
  // The order of a launch's blocks: as the grid lists them, reversed, or shuffled.
  std::vector<unsigned> blocks(unsigned count) {
    std::vector<unsigned> order(count);
    for (unsigned i = 0; i < count; ++i) order[i] = i;
    if (kind == reverse) std::reverse(order.begin(), order.end());
    if (kind == random) std::shuffle(order.begin(), order.end(), rng);
    return order;
  }
  void next_pass(std::vector<unsigned>& order) {
    std::sort(order.begin(), order.end());
    if (kind == reverse) std::reverse(order.begin(), order.end());
    if (kind == random) std::shuffle(order.begin(), order.end(), rng);
  }
};

}  // namespace

void fail(const char* what) { record(cudaErrorLaunchFailure, what); }

void sync_block() { wait(block->sync); }

void exchange_warp(const void* mine, void* lanes, size_t bytes, unsigned mask) {
  Block& blk = *block;
  const unsigned id = blk.current->id;
  Warp& warp = blk.warps[id / 32];
  const unsigned full = warp.size == 32 ? 0xffffffffu : (1u << warp.size) - 1u;
  if (mask != full) fail("a warp shuffle whose mask is not the warp's full set of lanes (not emulated)");
  std::memcpy(warp.lanes[id % 32], mine, bytes);
  wait(warp.barrier);
  std::memcpy(lanes, warp.lanes, sizeof(warp.lanes));
  wait(warp.barrier);  // nobody writes the next exchange before every lane has read this one
}

void execute(dim3 grid, dim3 block_dim, size_t shared_bytes, size_t argument_bytes, unsigned max_threads,
             const std::function<void()>& body) {
  const uint64_t threads = uint64_t(block_dim.x) * block_dim.y * block_dim.z;
  const std::string config = "grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
                             std::to_string(grid.z) + "), block (" + std::to_string(block_dim.x) + ", " +
                             std::to_string(block_dim.y) + ", " + std::to_string(block_dim.z) + ")";
  if (grid.x < 1 || grid.x > 0x7fffffffu || grid.y < 1 || grid.y > 65535 || grid.z < 1 || grid.z > 65535 ||
      block_dim.x < 1 || block_dim.x > 1024 || block_dim.y < 1 || block_dim.y > 1024 || block_dim.z < 1 ||
      block_dim.z > 64 || threads > 1024) {
    record(cudaErrorInvalidConfiguration, "launch configuration out of range: " + config);
    return;
  }
  if (max_threads != 0 && threads > max_threads) {
    record(cudaErrorInvalidConfiguration, "launch of " + config + ": more threads than the kernel's __launch_bounds__ (" +
                                              std::to_string(max_threads) + ")");
    return;
  }
  if (shared_bytes != 0) {
    record(cudaErrorNotSupported, "dynamic shared memory is not emulated");
    return;
  }
  if (argument_bytes > 4096) {
    record(cudaErrorInvalidValue, "kernel arguments of " + std::to_string(argument_bytes) + " bytes (over 4 KiB)");
    return;
  }
  const char* dry = std::getenv("AIAAS_FAST_EMULATOR_DRY_RUN");
  if (dry && *dry && std::string(dry) != "0") return;  // the configuration checked, nothing run
  Schedule schedule;
  std::vector<unsigned> order(threads);
  for (unsigned id = 0; id < threads; ++id) order[id] = id;
  Block blk;
  blk.body = &body;
  blk.stacks.reset(new char[threads * kStackBytes]);
  blk.fibers = std::vector<Fiber>(threads);
  for (unsigned id = 0; id < threads; ++id) blk.fibers[id].stack = blk.stacks.get() + id * kStackBytes;
  blk.warps = std::vector<Warp>((threads + 31) / 32);
  Block* outer = block;
  block = &blk;
  blockDim = block_dim;
  gridDim = grid;
  race_launch_begins(blk.stacks.get(), threads * kStackBytes);
  device_memory_for_kernels(true);
  for (unsigned linear : schedule.blocks(grid.x * grid.y * grid.z)) {
    blk.linear_block = linear;
    blk.epoch = 0;
    blockIdx = make_uint3(linear % grid.x, linear / grid.x % grid.y, linear / (grid.x * grid.y));
    blk.sync.reset(int(threads), "__syncthreads");
    for (size_t w = 0; w < blk.warps.size(); ++w) {
      blk.warps[w].size = int(std::min<uint64_t>(32, threads - w * 32));
      blk.warps[w].barrier.reset(blk.warps[w].size, "a warp shuffle");
    }
    for (unsigned id = 0; id < threads; ++id) {
      Fiber& f = blk.fibers[id];
      f.id = id;
      f.state = State::ready;
      unpoison(f.stack, kStackBytes);  // frames a fiber of the last block never returned from
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack;
      f.context.uc_stack.ss_size = kStackBytes;
      f.context.uc_link = nullptr;
      makecontext(&f.context, fiber_main, 0);
    }
    for (size_t finished = 0; finished < threads;) {
      bool ran = false;
      finished = 0;
      schedule.next_pass(order);
      for (unsigned id : order) {
        Fiber& f = blk.fibers[id];
        if (f.state == State::done) ++finished;
        if (f.state != State::ready) continue;
        ran = true;
        blk.current = &f;
        threadIdx = make_uint3(f.id % block_dim.x, f.id / block_dim.x % block_dim.y, f.id / (block_dim.x * block_dim.y));
        start_switch(&blk.scheduler_fake_stack, f.stack, kStackBytes);
        swapcontext(&blk.scheduler, &f.context);
        finish_switch(blk.scheduler_fake_stack, nullptr, nullptr);
      }
      if (!ran && finished < threads) {  // every thread left waits, at barriers that cannot all open
        record(cudaErrorLaunchFailure, "threads of one block wait at different barriers (a deadlock on a GPU)");
        break_barrier(blk.sync, "deadlocked");
        for (Warp& w : blk.warps) break_barrier(w.barrier, "deadlocked");
      }
    }
  }
  device_memory_for_kernels(false);
  blk.current = nullptr;
  block = outer;
}

bool in_thread(Where& where) {
  if (!block || !block->current) return false;
  where = Where{block->linear_block, block->current->id, block->epoch};
  return true;
}

void report(cudaError_t code, const std::string& what) { record(code, what); }

}  // namespace emu

// The runtime API's error query, as the kernels' launchers call it after each launch.
cudaError_t cudaGetLastError(void) {
  std::lock_guard<std::mutex> lock(emu::error_mutex);
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}

// The message behind the last error cudaGetLastError returned or will return (api.cpp).
const char* emu_last_message() {
  std::lock_guard<std::mutex> lock(emu::error_mutex);
  return emu::last_message.c_str();
}
