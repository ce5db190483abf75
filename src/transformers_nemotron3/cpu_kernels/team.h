// The threads of a whole decode step (`decode_step`): the calling thread plus helper threads that spin
// between the step's parallel products and, while the calling thread runs the serial parts (norms, router,
// Mamba bookkeeping, ATen calls), read ahead the weights of the next product into their caches.
//
// Why: a batch-1 step is bound by reading the weights from DRAM, and with OpenMP every serial part left
// the memory idle: on the 2-core VM of docs/benchmarks.md the second thread waited 12-15 % of small's step
// in libgomp. Here the helper spends that time streaming the first part of the product it will run next
// (`Team::hint`), and a product starts and ends with a few atomic operations instead of an OpenMP region.
// Measured there (plan.run, same process kind, team vs NEMOTRON3_DECODE_TEAM=0): tiny fp32 batch 1
// 2.15 -> 2.01 ms, small bf16 12.6 -> 11.9 ms, small fp32 within noise (21.4 ms, at ~97 % of its DRAM floor).
//
// Only `decode_step` opens a team (`TeamScope`), one call at a time: another thread calling meanwhile, or
// a thread count other than the first one's, runs on OpenMP as before (NEMOTRON3_DECODE_TEAM=0: always).
// While it is open the calling thread's OpenMP team is 1, so ATen calls inside the step run inline instead
// of waking OpenMP workers onto the helpers' cores. Helpers spin for 5 ms after a step, so that the next one
// finds them awake, then sleep. After fork() a child starts without helpers and makes new ones.
#pragma once

#include <ATen/Parallel.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <omp.h>
#include <pthread.h>

#if defined(__AVX512F__) || defined(__SSE2__)
#include <immintrin.h>
#define NEMOTRON3_PAUSE() _mm_pause()
#define NEMOTRON3_PREFETCH_LINE(p) _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0)
#else
#define NEMOTRON3_PAUSE() ((void)0)
#define NEMOTRON3_PREFETCH_LINE(p) ((void)0)
#endif

namespace nemotron3 {

class Team {
 public:
  static constexpr int kMaxThreads = 64;
  static constexpr int64_t kHintBytes = 1 << 20;  // read ahead per helper and product (the L2 holds 2 MB)

  static Team& get() {
    static Team* team = new Team();  // never destroyed: helpers may still wait on it at exit
    return *team;
  }

  // Whether the calling thread has the team open (only then `run` and `hint` use it).
  static bool& owner() {
    static thread_local bool flag = false;
    return flag;
  }
  int size() const { return size_; }

  // fn(t) on thread t for t in [0, size()): t = 0 is the caller; returns when every thread is done.
  template <typename F>
  void run(const F& fn) {
    call_ = [](const void* f, int t) { (*static_cast<const F*>(f))(t); };
    ctx_ = &fn;
    error_ = nullptr;
    pending_.store(size_ - 1, std::memory_order_relaxed);
    seq_.fetch_add(1, std::memory_order_release);
    std::exception_ptr mine;
    try {
      fn(0);
    } catch (...) {
      mine = std::current_exception();
    }
    while (pending_.load(std::memory_order_acquire) != 0) NEMOTRON3_PAUSE();  // fn must outlive every helper's part
    if (mine) std::rethrow_exception(mine);
    if (error_) std::rethrow_exception(error_);
  }

  // Off when NEMOTRON3_DECODE_TEAM=0 (decode steps then run their products on OpenMP threads).
  static bool enabled() {
    static const bool on = [] {
      const char* v = std::getenv("NEMOTRON3_DECODE_TEAM");
      return v == nullptr || std::string(v) != "0";
    }();
    return on;
  }

  // Helper t (1 <= t < size()) is about to run [begin_t, end) of the next product: start reading it now.
  // `part_begin(t)` gives the first byte of helper t's part; at most kHintBytes are read ahead.
  template <typename PartBegin>
  void hint(const PartBegin& part_begin, const char* end) {
    for (int t = 1; t < size_; ++t) {
      const char* p = part_begin(t);
      Slot& s = slots_[t];
      s.end.store(std::min(end, p + kHintBytes), std::memory_order_relaxed);
      s.next.store(p, std::memory_order_release);
    }
  }

  // Open the team for the calling thread. False where it cannot: someone else has it open, one thread only,
  // or a thread count other than the one the helpers were started for (the first open of the process, or of
  // a forked child, fixes it: helpers are never retired, so a job can never reach a helper it did not count).
  bool open(int threads) {
    if (threads < 2 || threads > kMaxThreads || !mutex_.try_lock()) return false;
    if (!started_) {
      start(threads);
    } else if (threads != size_) {
      mutex_.unlock();
      return false;
    }
    owner() = true;
    {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      active_.store(true, std::memory_order_release);
    }
    wake_.notify_all();
    return true;
  }

  void close() {
    for (int t = 1; t < size_; ++t) slots_[t].end.store(nullptr, std::memory_order_relaxed);
    active_.store(false, std::memory_order_release);
    last_close_.store(now_ns(), std::memory_order_relaxed);
    owner() = false;
    mutex_.unlock();
  }

 private:
  struct alignas(64) Slot {
    std::atomic<const char*> next{nullptr};
    std::atomic<const char*> end{nullptr};
  };

  Team() {
    pthread_atfork(nullptr, nullptr, [] { Team::get().after_fork(); });
  }

  static int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }

  // Starts the helpers 1 .. threads - 1 (once per process; they live as long as it).
  void start(int threads) {
    size_ = threads;
    started_ = true;
    const uint64_t seen = seq_.load(std::memory_order_acquire);  // no job of this team has been published yet
    for (int t = 1; t < threads; ++t) std::thread([this, t, seen] { helper(t, seen); }).detach();
  }

  void after_fork() {  // in the child: the helpers did not survive, and nobody holds the team
    new (&mutex_) std::mutex();
    new (&sleep_mutex_) std::mutex();
    new (&error_mutex_) std::mutex();
    new (&wake_) std::condition_variable();
    active_.store(false);
    pending_.store(0);
    started_ = false;
    owner() = false;
  }

  // Helper t: runs each job once (jobs come one at a time: `run` waits for all), reads ahead its hint while
  // there is none, and sleeps a while after the team closes.
  [[noreturn]] void helper(int t, uint64_t seen) {
    Slot& slot = slots_[t];
    while (true) {
      const uint64_t s = seq_.load(std::memory_order_acquire);
      if (s != seen) {
        seen = s;
        try {
          call_(ctx_, t);
        } catch (...) {
          std::lock_guard<std::mutex> lock(error_mutex_);
          if (!error_) error_ = std::current_exception();
        }
        pending_.fetch_sub(1, std::memory_order_release);
        continue;
      }
      const char* p = slot.next.load(std::memory_order_acquire);
      const char* e = slot.end.load(std::memory_order_relaxed);
      if (p != nullptr && p < e) {  // read 1 KB of the hinted weights, then look for work again
        for (int i = 0; i < 16; ++i) NEMOTRON3_PREFETCH_LINE(p + 64 * i);
        slot.next.compare_exchange_strong(p, p + 1024, std::memory_order_relaxed);
        continue;
      }
      if (!active_.load(std::memory_order_acquire) &&
          now_ns() - last_close_.load(std::memory_order_relaxed) > kSpinAfterStepNs) {
        std::unique_lock<std::mutex> lock(sleep_mutex_);
        wake_.wait(lock, [&] { return active_.load(std::memory_order_acquire); });
        continue;
      }
      NEMOTRON3_PAUSE();
    }
  }

  static constexpr int64_t kSpinAfterStepNs = 5'000'000;  // a generate loop's next step comes well within this

  std::mutex mutex_;  // held by the thread that has the team open
  std::mutex sleep_mutex_;
  std::mutex error_mutex_;
  std::condition_variable wake_;
  std::exception_ptr error_;  // the first exception a helper's part threw in the current job
  int size_ = 1;
  bool started_ = false;
  alignas(64) std::atomic<uint64_t> seq_{0};
  alignas(64) std::atomic<int> pending_{0};
  void (*call_)(const void*, int) = nullptr;
  const void* ctx_ = nullptr;
  std::atomic<bool> active_{false};
  std::atomic<int64_t> last_close_{0};
  Slot slots_[kMaxThreads];
};

// Opens the team for one decode step (the caller's OpenMP threads: see Team); a no-op when it cannot.
class TeamScope {
 public:
  TeamScope() : threads_(at::get_num_threads()) {
    open_ = !Team::owner() && Team::enabled() && Team::get().open(threads_);
    if (open_) omp_set_num_threads(1);  // this thread's OpenMP team only (at::set_num_threads is global)
  }
  ~TeamScope() {
    if (!open_) return;
    omp_set_num_threads(threads_);
    Team::get().close();
  }
  TeamScope(const TeamScope&) = delete;
  TeamScope& operator=(const TeamScope&) = delete;

 private:
  int threads_;
  bool open_ = false;
};

}  // namespace nemotron3
