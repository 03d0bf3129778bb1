// A CPU stand-in for the parts of the CUDA runtime our element-wise and reduction kernels
// use, so that CI, which has no GPU, runs csrc/kernels/cuda's kernels and compares them with
// PyTorch (tests/test_cuda_kernels_emulated.py). Force-included (g++ -include) before a
// kernel file, which is compiled as ordinary C++ after build_kernels.py has rewritten each
// `kernel<<<grid, block, smem, stream>>>(args)` into `::emu::Launch(grid, block, smem,
// stream).run(kernel, args)`.
//
// The threads of a block are fibers on the launching thread, each running until it waits at
// a barrier or returns; the blocks of a launch run one after the other (in an order that
// AIAAS_FAST_EMULATOR_SCHEDULE can reverse or shuffle, as it can the threads').
// __shared__ variables are `static`: one copy for the whole launch, as blocks never overlap.
// __syncthreads and the warp shuffles are barriers over the block's (the warp's) threads.
// What a GPU would refuse or leave undefined is reported as the launch's error
// (cudaGetLastError), never a hang: a bad launch configuration or one over the kernel's
// __launch_bounds__, a kernel argument list over 4 KiB, a barrier that some thread of the
// block (or warp) will never reach because it has returned, a shuffle whose mask is not the
// warp's full set of lanes. Built with AddressSanitizer, a read or write outside a buffer
// stops the test with its place; built for race detection (race.cpp), so does a data race,
// and host code touching device memory (device_memory.cpp) outside a kernel.
// AIAAS_FAST_EMULATOR_DRY_RUN=1 checks each launch's configuration and runs nothing.
//
// Tensor cores, CUTLASS and the rest of CUDA are not emulated: a kernel file that uses them
// does not compile here, which is how we know what this covers.
#pragma once

// Before the CUDA headers, which define these as nvcc attributes only where they are not defined yet.
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __launch_bounds__(...)

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include <cuda_runtime_api.h>
#include <vector_types.h>

// The built-in variables, set by the emulator for the thread (fiber) it runs.
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

// The device math the kernels call, with the float overloads CUDA's math API has.
using std::pow;
using std::sqrt;

namespace emu {

// Records the first thing a launch did that a GPU would refuse or leave undefined.
void fail(const char* what);

void sync_block();                                  // __syncthreads
void exchange_warp(const void* mine, void* lanes, size_t bytes, unsigned mask);  // all lanes' values

// Runs body once per thread of every block of a grid; checks the configuration first
// (max_threads: the kernel's __launch_bounds__, 0 for none).
void execute(dim3 grid, dim3 block, size_t shared_bytes, size_t argument_bytes, unsigned max_threads,
             const std::function<void()>& body);

// Where the running kernel code is: block (linear), thread (linear) and how many __syncthreads
// the block has passed. False outside a kernel's thread.
struct Where {
  unsigned block, thread;
  uint64_t epoch;
};
bool in_thread(Where& where);
void report(cudaError_t code, const std::string& what);
// device_memory.cpp: kernels start (true) or have finished (false) running.
void device_memory_for_kernels(bool kernels_running);
// race.cpp: a launch starts (the accesses of earlier launches are ordered before it).
void race_launch_begins(const char* stacks, size_t stack_bytes);

struct Launch {
  dim3 grid, block;
  size_t shared_bytes;
  unsigned max_threads = 0;
  Launch(dim3 g, dim3 b, size_t smem = 0, cudaStream_t = nullptr) : grid(g), block(b), shared_bytes(smem) {}
  // The kernel's __launch_bounds__ (build_kernels.py adds the call where the kernel has them).
  Launch& bounds(unsigned threads) {
    max_threads = threads;
    return *this;
  }

  template <typename... P, typename... A>
  void run(void (*kernel)(P...), A&&... args) {
    static_assert(sizeof...(P) == sizeof...(A), "a kernel launched with the wrong number of arguments");
    // CUDA copies the arguments once, converted to the parameters' types; each thread reads the copy.
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    execute(grid, block, shared_bytes, sizeof(params), max_threads, [&] { std::apply(kernel, params); });
  }
};

}  // namespace emu

inline void __syncthreads() { emu::sync_block(); }

// The value of the lane `delta` above this one (this lane's own where that is past the
// warp), as the hardware does; every lane named in mask must make the same call.
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move 4- or 8-byte values");
  unsigned char lanes[32][8];
  emu::exchange_warp(&value, lanes, sizeof(T), mask);
  const unsigned lane = (threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y) % 32;
  const unsigned segment_end = (lane / unsigned(width) + 1) * unsigned(width);
  if (lane + delta < segment_end) std::memcpy(&value, lanes[lane + delta], sizeof(T));
  return value;
}

// Atomic as it stands: a fiber is never interrupted between its read and its write. Not
// instrumented in the race-detecting build: atomics do not race.
template <typename T>
__attribute__((no_sanitize_thread)) T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
