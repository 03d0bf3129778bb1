// A data-race detector with CUDA's rules, for the race-detecting build (build_kernels.py
// mode "race"): the kernel files are compiled with -fsanitize=thread, which makes the
// compiler report every load and store to a __tsan_* function, and these are ours (libtsan
// is not linked). Each access by a kernel's thread is checked against the last ones to the
// same byte:
//   - two threads of one block conflict (one of them writing) between the same two
//     __syncthreads; a barrier orders everything before it against everything after;
//   - two blocks conflict (one of them writing) whatever they do: nothing orders blocks;
//   - a read of __shared__ memory that no thread of this block has written is reported too
//     (shared memory starts undefined in each block).
// Launches are ordered: the record starts empty at each. Atomics are not instrumented.
// Accesses to the fibers' stacks (a thread's own locals) are skipped.
#include <cxxabi.h>
#include <dlfcn.h>
#include <link.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <unordered_map>

#include "runtime.h"

namespace emu {
namespace {

struct Access {
  unsigned block = 0, thread = 0;
  uint64_t epoch = 0;
  bool valid = false;
};

struct Cell {
  Access write, read;             // the last write, and the last read since it
  bool reads_in_interval = false;  // two threads of read's block read it since read's last barrier
  bool reads_in_blocks = false;    // two blocks read it since the last write
};

std::unordered_map<uintptr_t, Cell> cells;
uintptr_t stacks_begin = 0, stacks_end = 0;
uintptr_t shared_begin = 0, shared_end = 0;  // this library's .bss: where `static` __shared__ lives
bool reported = false;

int find_bss(dl_phdr_info* info, size_t, void* self) {
  const uintptr_t me = reinterpret_cast<uintptr_t>(self);
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_LOAD) continue;
    const uintptr_t begin = info->dlpi_addr + ph.p_vaddr;
    if (me < begin || me >= begin + ph.p_memsz) continue;
    for (int j = 0; j < info->dlpi_phnum; ++j) {  // the object holding `self`: its zero-filled part
      const ElfW(Phdr)& q = info->dlpi_phdr[j];
      if (q.p_type == PT_LOAD && q.p_memsz > q.p_filesz) {
        shared_begin = info->dlpi_addr + q.p_vaddr + q.p_filesz;
        shared_end = info->dlpi_addr + q.p_vaddr + q.p_memsz;
      }
    }
    return 1;
  }
  return 0;
}

std::string describe(const Access& a) {
  return "block " + std::to_string(a.block) + " thread " + std::to_string(a.thread) + " (after " +
         std::to_string(a.epoch) + " __syncthreads)";
}

// The function holding pc where the library exports it; else library+offset, for
// `addr2line -f -C -e library offset` (the kernels have internal linkage).
std::string function_at(void* pc) {
  Dl_info info;
  if (!pc || !dladdr(pc, &info)) return "?";
  if (info.dli_sname && info.dli_saddr) {
    int status = 0;
    char* name = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string out = status == 0 && name ? name : info.dli_sname;
    std::free(name);
    if (out.rfind("emu::", 0) != 0 && out.rfind("__tsan", 0) != 0) return out.size() > 160 ? out.substr(0, 160) + "..." : out;
  }
  char offset[32];
  std::snprintf(offset, sizeof offset, "+0x%lx", static_cast<unsigned long>(reinterpret_cast<uintptr_t>(pc) -
                                                                         reinterpret_cast<uintptr_t>(info.dli_fbase)));
  return std::string(info.dli_fname ? info.dli_fname : "?") + offset;
}

void race(const char* what, uintptr_t addr, const Access& earlier, const Access& now, void* pc) {
  if (reported) return;
  reported = true;
  const bool shared = addr >= shared_begin && addr < shared_end;
  report(cudaErrorLaunchFailure, std::string("data race: ") + what + " on " + (shared ? "__shared__" : "global") +
                                     " memory at " + std::to_string(addr) + ", by " + describe(earlier) + " and " +
                                     describe(now) + ", in " + function_at(pc));
}

// Whether `a` and `b` may run at the same time on a GPU: other threads, and other blocks
// or the same block between the same barriers.
bool concurrent(const Access& a, const Access& b) {
  if (!a.valid) return false;
  if (a.block != b.block) return true;
  return a.thread != b.thread && a.epoch == b.epoch;
}

void access(uintptr_t addr, size_t size, bool write, void* pc) {
  Where where;
  if (!in_thread(where)) return;
  if (addr >= stacks_begin && addr < stacks_end) return;
  const Access now{where.block, where.thread, where.epoch, true};
  const bool shared = addr >= shared_begin && addr < shared_end;
  for (size_t i = 0; i < size; ++i) {
    Cell& c = cells[addr + i];
    // Each block has its own __shared__ memory: what another block did to this byte was done
    // to another copy (the emulator keeps one, the blocks never overlap).
    if (shared && ((c.write.valid && c.write.block != now.block) || (c.read.valid && c.read.block != now.block)))
      c = Cell{};
    if (concurrent(c.write, now)) race(write ? "a write after a write" : "a read of a write", addr + i, c.write, now, pc);
    if (write) {
      const bool others_read = concurrent(c.read, now) || c.reads_in_blocks ||
                               (c.reads_in_interval && c.read.block == now.block && c.read.epoch == now.epoch);
      if (c.read.valid && others_read) race("a write after a read", addr + i, c.read, now, pc);
      c = Cell{};
      c.write = now;
      continue;
    }
    if (shared && (!c.write.valid || c.write.block != now.block) && !reported) {
      reported = true;
      report(cudaErrorLaunchFailure, "a read of __shared__ memory no thread of this block has written, by " +
                                         describe(now) + ", in " + function_at(pc));
    }
    if (c.read.valid) {
      if (c.read.block != now.block) c.reads_in_blocks = true;
      else if (c.read.epoch != now.epoch) c.reads_in_interval = false;  // the earlier reads are ordered before
      else if (c.read.thread != now.thread) c.reads_in_interval = true;
    }
    c.read = now;
  }
}

}  // namespace

void race_launch_begins(const char* stacks, size_t stack_bytes) {
  cells.clear();
  reported = false;
  stacks_begin = reinterpret_cast<uintptr_t>(stacks);
  stacks_end = stacks_begin + stack_bytes;
  if (shared_end == 0) dl_iterate_phdr(find_bss, reinterpret_cast<void*>(&race_launch_begins));
}

}  // namespace emu

// The calls -fsanitize=thread puts into the kernel code (GCC's names).
#define EMU_ACCESS(n)                                                                                        \
  extern "C" void __tsan_read##n(void* p) { emu::access(reinterpret_cast<uintptr_t>(p), n, false, __builtin_return_address(0)); } \
  extern "C" void __tsan_write##n(void* p) { emu::access(reinterpret_cast<uintptr_t>(p), n, true, __builtin_return_address(0)); } \
  extern "C" void __tsan_unaligned_read##n(void* p) { emu::access(reinterpret_cast<uintptr_t>(p), n, false, __builtin_return_address(0)); } \
  extern "C" void __tsan_unaligned_write##n(void* p) { emu::access(reinterpret_cast<uintptr_t>(p), n, true, __builtin_return_address(0)); }
EMU_ACCESS(1)
EMU_ACCESS(2)
EMU_ACCESS(4)
EMU_ACCESS(8)
EMU_ACCESS(16)
#undef EMU_ACCESS

extern "C" void __tsan_read_range(void* p, unsigned long n) {
  emu::access(reinterpret_cast<uintptr_t>(p), n, false, __builtin_return_address(0));
}
extern "C" void __tsan_write_range(void* p, unsigned long n) {
  emu::access(reinterpret_cast<uintptr_t>(p), n, true, __builtin_return_address(0));
}
extern "C" void __tsan_init() {}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
extern "C" void __tsan_vptr_update(void**, void*) {}
extern "C" void __tsan_vptr_read(void**) {}
