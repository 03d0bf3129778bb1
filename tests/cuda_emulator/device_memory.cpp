// "Device" memory for the emulated kernels: page-aligned mappings that only kernels may touch.
// While a launcher (host code) runs, every mapping is inaccessible, so host code that reads
// or writes through a device pointer (a device scalar read on the host, say) stops with a
// segmentation fault, as it would on a GPU; execute() opens them around the kernel's blocks.
#include <execinfo.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>

#include <cstddef>
#include <cstdint>
#include <map>

#include "runtime.h"

namespace emu {
namespace {

std::map<void*, size_t> mappings;  // base -> bytes
bool host_side = false;             // inside a launcher, outside its kernels

size_t round_up(size_t n) {
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  return (n + page - 1) / page * page;
}

void protect(int mode) {
  for (auto& [base, bytes] : mappings) mprotect(base, bytes, mode);
}

struct sigaction previous;

// A fault inside a device mapping while host code runs: say so, with the host code's stack.
void on_fault(int sig, siginfo_t* info, void* context) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(info->si_addr);
  for (auto& [base, bytes] : mappings) {
    const uintptr_t b = reinterpret_cast<uintptr_t>(base);
    if (host_side && addr >= b && addr < b + bytes) {
      std::fprintf(stderr, "\ncuda emulator: host code read or wrote device memory at %p, outside any kernel "
                           "(a crash or garbage on a GPU). Host stack:\n", info->si_addr);
      void* frames[32];
      backtrace_symbols_fd(frames, backtrace(frames, 32), 2);
      std::_Exit(70);
    }
  }
  sigaction(SIGSEGV, &previous, nullptr);  // not ours: the previous handler (Python's faulthandler) reports it
  (void)sig;
  (void)context;
}

void install_handler() {
  static bool installed = false;
  if (installed) return;
  installed = true;
  struct sigaction sa {};
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &previous);
}

}  // namespace

void device_memory_for_kernels(bool kernels_running) {
  if (host_side) protect(kernels_running ? PROT_READ | PROT_WRITE : PROT_NONE);
}

}  // namespace emu

extern "C" {

void* emu_device_alloc(size_t bytes) {
  const size_t n = emu::round_up(bytes ? bytes : 1);
  void* p = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  emu::mappings[p] = n;
  return p;
}

void emu_device_free(void* p) {
  auto it = emu::mappings.find(p);
  if (it == emu::mappings.end()) return;
  munmap(it->first, it->second);
  emu::mappings.erase(it);
}

// Called by the API wrappers around each launcher: 1 entering (device memory closed to the
// host), 0 leaving (open again, for the test to copy results out).
void emu_host_side(int entering) {
  if (entering) emu::install_handler();
  emu::host_side = entering != 0;
  emu::protect(entering ? PROT_NONE : PROT_READ | PROT_WRITE);
}

}  // extern "C"
