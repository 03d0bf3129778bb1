// Kernels that check the emulator itself (kernel_checks.py): that its barriers, shared
// memory and warp shuffles behave as the hardware's, and that it reports what a GPU would
// refuse or leave undefined instead of hanging. Built with the kernels by build_kernels.py.
#include <cuda_runtime.h>

namespace {

// Each thread reads what the mirror thread wrote before the barrier, in every block.
__global__ void mirror_through_shared(int* out) {
  __shared__ int s[256];
  s[threadIdx.x] = int(threadIdx.x + 1000 * blockIdx.x);
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = s[blockDim.x - 1 - threadIdx.x];
}

__global__ void shuffle_down(const float* in, float* out, unsigned delta) {
  const unsigned i = threadIdx.x;
  out[i] = __shfl_down_sync(0xffffffffu, in[i], delta);
}

// Undefined on a GPU: thread 3 never reaches the barrier the others wait at.
__global__ void return_before_barrier(int* out) {
  __shared__ int s[64];
  if (threadIdx.x == 3) return;
  s[threadIdx.x] = int(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 1) % 64];
}

}  // namespace

extern "C" {

int emu_selftest_mirror(int* out, unsigned blocks, unsigned threads) {
  mirror_through_shared<<<blocks, threads>>>(out);
  return cudaGetLastError();
}

int emu_selftest_shuffle_down(const float* in, float* out, unsigned threads, unsigned delta) {
  shuffle_down<<<1, threads>>>(in, out, delta);
  return cudaGetLastError();
}

int emu_selftest_return_before_barrier(int* out) {
  return_before_barrier<<<1, 64>>>(out);
  return cudaGetLastError();
}

}  // extern "C"

// For the race-detecting build (race.cpp): each is wrong on a GPU, and must be reported.
namespace {

__global__ void unsynchronized_increment(int* counter) { *counter += 1; }  // lost updates: not atomicAdd

__global__ void read_unwritten_shared(int* out) {
  __shared__ int s[64];
  if (threadIdx.x > 0) s[threadIdx.x] = int(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 63) % 64];  // thread 1 reads s[0], which nobody wrote
}

__global__ void write_after_read(int* out) {
  int seen = 0;
  if (threadIdx.x == 0) seen = out[0];  // thread 1's write may land before or after this read
  if (threadIdx.x == 1) out[0] = 7;
  out[1 + threadIdx.x] = seen;
}

__global__ void blocks_write_one_place(int* out) {
  if (threadIdx.x == 0) out[0] = int(blockIdx.x);  // blocks are not ordered: the last wins, any of them
}

}  // namespace

extern "C" {

int emu_selftest_race_detecting() {
#if defined(__SANITIZE_THREAD__)
  return 1;
#else
  return 0;
#endif
}

int emu_selftest_unsynchronized_increment(int* counter, unsigned threads) {
  unsynchronized_increment<<<1, threads>>>(counter);
  return cudaGetLastError();
}

int emu_selftest_read_unwritten_shared(int* out) {
  read_unwritten_shared<<<1, 64>>>(out);
  return cudaGetLastError();
}

int emu_selftest_write_after_read(int* out) {
  write_after_read<<<1, 32>>>(out);
  return cudaGetLastError();
}

int emu_selftest_blocks_write_one_place(int* out, unsigned blocks) {
  blocks_write_one_place<<<blocks, 32>>>(out);
  return cudaGetLastError();
}

}  // extern "C"

extern "C" {

// Host code reading through a device pointer (a launcher bug): the race-detecting build's
// device memory stops it (device_memory.cpp).
int emu_selftest_host_reads(const float* device) { return int(*device); }

}  // extern "C"
