// The CPU kernels' thread pool (parallel.h says why it is not OpenMP).
//
// One job at a time. `state` packs the job's generation, whether it is open,
// and how many workers are inside it; a worker enters with one
// compare-and-swap that succeeds only while that generation is open, and reads
// the job only once inside. The caller closes the job when every chunk is
// claimed, then waits for the workers inside (each finishing the chunk it
// claimed): none can enter after, so the job, on the caller's stack, is never
// read once parallel_for returns.
#include "parallel.h"

#include <ATen/Parallel.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <thread>

namespace adm_fast_cpu {
namespace {

// Chunks per thread: enough that the caller can take over a late worker's
// share, few enough that a chunk's setup stays small.
constexpr int64_t kChunksPerThread = 4;
// Polls before a worker sleeps: a few microseconds, then out of the way of
// whatever else wants the core (as GOMP_SPINCOUNT=10000 for OpenMP's).
constexpr int kSpins = 2000;

constexpr uint64_t kUsers = (1u << 16) - 1, kOpen = 1u << 16;
constexpr int kGenShift = 17;
inline uint64_t gen_of(uint64_t s) { return s >> kGenShift; }
inline bool open_of(uint64_t s) { return (s & kOpen) != 0; }
inline uint64_t users_of(uint64_t s) { return s & kUsers; }

inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

thread_local bool t_in_task = false;

struct Pool {
  std::mutex caller;  // one job at a time; a second caller runs its range serially
  std::mutex m;
  std::condition_variable cv;
  std::atomic<uint64_t> state{0};
  std::atomic<int> sleepers{0};
  int workers = 0;  // started (guarded by caller)

  // the job, written before it opens, read by workers only inside it
  c10::function_ref<void(int64_t, int64_t)>* fn = nullptr;
  int64_t end = 0, chunk = 1;
  int helpers = 0;  // workers 1..helpers take part
  std::atomic<int64_t> next{0};
  std::mutex error_m;
  std::exception_ptr error;

  void run_chunks() {
    for (;;) {
      const int64_t b = next.fetch_add(chunk, std::memory_order_relaxed);
      if (b >= end) return;
      try {
        (*fn)(b, std::min(end, b + chunk));
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_m);
        if (!error) error = std::current_exception();
        next.store(end, std::memory_order_relaxed);  // the others stop at their next claim
        return;
      }
    }
  }

  void worker(int index) {
    t_in_task = true;  // a kernel's nested parallel_for runs serially here
    uint64_t seen = 0;
    for (;;) {
      uint64_t s = state.load(std::memory_order_acquire);
      for (int spins = 0; gen_of(s) == seen || !open_of(s); ++spins) {
        if (spins < kSpins) {
          relax();
          s = state.load(std::memory_order_acquire);
          continue;
        }
        std::unique_lock<std::mutex> lock(m);
        sleepers.fetch_add(1);
        cv.wait(lock, [&] {
          s = state.load();
          return gen_of(s) != seen && open_of(s);
        });
        sleepers.fetch_sub(1);
        break;
      }
      seen = gen_of(s);
      bool inside = false;
      while (gen_of(s) == seen && open_of(s)) {
        if (state.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) {
          inside = true;
          break;
        }
      }
      if (!inside) continue;  // closed before this worker got there
      if (index <= helpers) run_chunks();
      state.fetch_sub(1, std::memory_order_release);
    }
  }

  void start_workers(int n) {
    for (; workers < n; ++workers) std::thread([this, i = workers + 1] { worker(i); }).detach();
  }

  // Open a job for `threads` threads in all; the caller runs chunks, then close().
  void open(c10::function_ref<void(int64_t, int64_t)>* f, int64_t b, int64_t e, int64_t c,
            int threads) {
    fn = f;
    end = e;
    chunk = c;
    helpers = threads - 1;
    next.store(b, std::memory_order_relaxed);
    error = nullptr;
    const uint64_t s = state.load(std::memory_order_relaxed);  // closed, no users
    state.store(((gen_of(s) + 1) << kGenShift) | kOpen);  // seq_cst: against sleepers
    if (sleepers.load() > 0) {
      { std::lock_guard<std::mutex> lock(m); }  // a worker checking its predicate finishes first
      cv.notify_all();
    }
  }

  void close() {
    uint64_t s = state.load(std::memory_order_relaxed);
    while (!state.compare_exchange_weak(s, s & ~kOpen, std::memory_order_acq_rel)) {
    }
    for (int spins = 0; users_of(state.load(std::memory_order_acquire)) != 0; ++spins) {
      if (spins < kSpins) {
        relax();
      } else {
        std::this_thread::yield();  // a worker inside was preempted: let it finish its chunk
      }
    }
  }
};

// Never destroyed: detached workers wait on it until the process exits.
Pool* g_pool = new Pool();

void after_fork_in_child() {
  // The child has the caller's thread only; a fresh pool starts its own workers.
  g_pool = new Pool();
}

const bool g_registered = [] {
  pthread_atfork(nullptr, nullptr, after_fork_in_child);
  return true;
}();

}  // namespace

// ADM_FAST_CPU_POOL=0: OpenMP's regions instead (at::parallel_for), read once.
bool pool_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("ADM_FAST_CPU_POOL");
    return !(v && std::string(v) == "0");
  }();
  return enabled;
}

void parallel_for(int64_t begin, int64_t end, int64_t grain,
                  c10::function_ref<void(int64_t, int64_t)> fn) {
  if (begin >= end) return;
  if (!pool_enabled()) {
    at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { fn(b, e); });
    return;
  }
  const int64_t range = end - begin;
  const int threads = at::get_num_threads();
  if (threads <= 1 || range <= std::max<int64_t>(grain, 1) || t_in_task ||
      at::in_parallel_region()) {
    fn(begin, end);
    return;
  }
  Pool& pool = *g_pool;
  std::unique_lock<std::mutex> lock(pool.caller, std::try_to_lock);
  if (!lock.owns_lock()) {
    fn(begin, end);
    return;
  }
  const int64_t per = (range + threads * kChunksPerThread - 1) / (threads * kChunksPerThread);
  const int64_t chunk = std::max<int64_t>(std::max<int64_t>(grain, 1), per);
  pool.start_workers(threads - 1);
  pool.open(&fn, begin, end, chunk, threads);
  struct Closer {
    Pool& p;
    ~Closer() { p.close(); }
  };
  {
    Closer closer{pool};
    t_in_task = true;
    pool.run_chunks();
    t_in_task = false;
  }
  if (pool.error) std::rethrow_exception(pool.error);
}

}  // namespace adm_fast_cpu
