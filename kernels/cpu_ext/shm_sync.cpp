// Flags for braid's shared-memory collectives (braid/engine/shm_comm.py): a rank
// publishes "my slot holds operation `seq`" with a release store and waits for
// its peers' flags with acquire loads, so the data copied before a post is
// visible to whoever sees the flag (x86 and Arm alike). The wait spins briefly,
// then yields the core, then sleeps in short naps (ranks may share cores), with
// the GIL released, a deadline, and a watch on the peers' processes: a dead peer
// fails the call within milliseconds, never hangs it.
#include <torch/extension.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <chrono>
#include <vector>

#include <sched.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
#elif defined(__aarch64__)
static inline void cpu_relax() { asm volatile("yield" ::: "memory"); }
#else
static inline void cpu_relax() {}
#endif

static std::atomic<int64_t>* flag_at(const torch::Tensor& flags, int64_t index) {
  TORCH_CHECK(flags.scalar_type() == torch::kInt64 && flags.is_contiguous(), "flags: contiguous int64");
  TORCH_CHECK(index >= 0 && index < flags.numel(), "flag index out of range");
  return reinterpret_cast<std::atomic<int64_t>*>(flags.data_ptr<int64_t>() + index);
}

void shm_post(torch::Tensor flags, int64_t index, int64_t seq) {
  flag_at(flags, index)->store(seq, std::memory_order_release);
}

// A peer process that is gone, or a zombie nobody has reaped yet. Without /proc
// (not Linux) only the deadline tells.
static bool process_dead(int64_t pid) {
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/%lld/stat", static_cast<long long>(pid));
  std::FILE* f = std::fopen(path, "r");
  if (f == nullptr) return errno == ENOENT;
  char buf[512];
  size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
  std::fclose(f);
  buf[n] = 0;
  const char* close = std::strrchr(buf, ')');  // the command name may hold spaces and parentheses
  return close != nullptr && close[1] == ' ' && (close[2] == 'Z' || close[2] == 'X');
}

// -1 once every flags[indices[k]] is >= seq; -2 at the deadline; k when the process
// pids[k] is gone first (pids: one per index, 0 = do not watch).
int64_t shm_wait(torch::Tensor flags, std::vector<int64_t> indices, std::vector<int64_t> pids, int64_t seq,
                 double timeout_s) {
  TORCH_CHECK(pids.size() == indices.size(), "shm_wait: one pid per flag");
  std::vector<std::atomic<int64_t>*> ptrs;
  for (int64_t i : indices) ptrs.push_back(flag_at(flags, i));
  pybind11::gil_scoped_release no_gil;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  for (size_t k = 0; k < ptrs.size(); ++k) {
    for (int64_t spins = 0; ptrs[k]->load(std::memory_order_acquire) < seq; ++spins) {
      if (spins < 4096) {
        cpu_relax();
      } else if (spins < 8192) {
        sched_yield();
      } else {
        if ((spins & 127) == 0) {  // every ~128 naps: the clock and the peers
          if (std::chrono::steady_clock::now() > deadline) return -2;
          for (size_t j = 0; j < pids.size(); ++j)
            if (pids[j] > 0 && ptrs[j]->load(std::memory_order_acquire) < seq && process_dead(pids[j]))
              return static_cast<int64_t>(j);
        }
        struct timespec nap = {0, 20000};  // 20 us
        nanosleep(&nap, nullptr);
      }
    }
  }
  return -1;
}
