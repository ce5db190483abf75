// The threads of a whole decode step (`decode_step`): one OpenMP region for the whole step, in which the
// calling thread runs the step and the other threads of the region are helpers that spin between its
// parallel products and, while the calling thread runs the serial parts (norms, router, Mamba bookkeeping,
// ATen calls), read ahead the weights of the next product into their caches.
//
// Why: a batch-1 step is bound by reading the weights from DRAM, and with an OpenMP region per product every
// serial part left the memory idle: on the 2-core VM of docs/benchmarks.md the second thread waited 12-15 %
// of small's step in libgomp. Here a helper spends that time streaming the first part of the product it will
// run next (`Team::hint`), and a product starts and ends with a few atomic operations. The helpers are
// libgomp's own workers (an earlier version ran its own threads; a worker still spinning after generate's
// OpenMP ops between steps then shared a core with them, and tiny batch 8 went from 7.8 to 12.3 ms a token).
// Inside the region ATen's parallel_for runs inline, so no ATen call inside the step competes either.
//
// `with_team` opens it; NEMOTRON3_DECODE_TEAM=0 turns it off (each product then opens its own region, as
// before). A product never waits for a helper that has not started on it (`Team::run`).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>

#include <omp.h>

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

  // The team the calling thread leads (inside `with_team`), or nullptr.
  static Team*& current() {
    static thread_local Team* team = nullptr;
    return team;
  }

  // Off when NEMOTRON3_DECODE_TEAM=0.
  static bool enabled() {
    static const bool on = [] {
      const char* v = std::getenv("NEMOTRON3_DECODE_TEAM");
      return v == nullptr || std::string(v) != "0";
    }();
    return on;
  }

  Team() = default;
  Team(const Team&) = delete;
  Team& operator=(const Team&) = delete;

  int size() const { return size_; }
  void set_size(int size) { size_ = std::max(1, std::min(size, kMaxThreads)); }  // before any job or helper

  // fn(t) on the caller (t = 0) and on each helper t that joins before the caller is done with fn(0); returns
  // when every thread that joined is done. A helper the OS has not scheduled in time is not waited for, so fn
  // must let any thread finish the work: `parallel_rows` hands out chunks to whoever asks.
  template <typename F>
  void run(const F& fn) {
    call_ = [](const void* f, int t) { (*static_cast<const F*>(f))(t); };
    ctx_ = &fn;
    error_ = nullptr;
    const uint64_t job = seq_.fetch_add(1) + 1;
    std::exception_ptr mine;
    try {
      fn(0);
    } catch (...) {
      mine = std::current_exception();
    }
    closed_.store(job);  // helpers that have not joined yet stay out (seq_cst: see helper)
    while (joined_.load() != 0) NEMOTRON3_PAUSE();  // fn must outlive every helper inside it
    if (mine) std::rethrow_exception(mine);
    if (error_) std::rethrow_exception(error_);
  }

  // Helper t (1 <= t < size()) is about to run [part_begin(t), end) of the next product: start reading it now
  // (at most kHintBytes of it).
  template <typename PartBegin>
  void hint(const PartBegin& part_begin, const char* end) {
    for (int t = 1; t < size_; ++t) {
      const char* p = part_begin(t);
      Slot& s = slots_[t];
      s.end.store(std::min(end, p + kHintBytes), std::memory_order_relaxed);
      s.next.store(p, std::memory_order_release);
    }
  }

  // Helper t: joins each job it sees before the caller closes it (joined_ is raised before closed_ is read,
  // and the caller stores closed_ before reading joined_, all seq_cst: either the caller waits for this
  // helper or the helper sees the job closed and stays out), and reads ahead its hint while there is no job;
  // returns when the caller stops the team.
  void helper(int t) {
    if (t >= size_) return;
    Slot& slot = slots_[t];
    uint64_t seen = 0;
    while (!stop_.load(std::memory_order_acquire)) {
      const uint64_t s = seq_.load();
      if (s != seen) {
        seen = s;
        joined_.fetch_add(1);
        if (closed_.load() < s) {  // job s is still open, so call_ / ctx_ are its own
          try {
            call_(ctx_, t);
          } catch (...) {
            std::lock_guard<std::mutex> lock(error_mutex_);
            if (!error_) error_ = std::current_exception();
          }
        }
        joined_.fetch_sub(1);
        continue;
      }
      const char* p = slot.next.load(std::memory_order_acquire);
      const char* e = slot.end.load(std::memory_order_relaxed);
      if (p != nullptr && p < e) {  // read 1 KB of the hinted weights, then look for work again
        for (int i = 0; i < 16; ++i) NEMOTRON3_PREFETCH_LINE(p + 64 * i);
        slot.next.compare_exchange_strong(p, p + 1024, std::memory_order_relaxed);
        continue;
      }
      NEMOTRON3_PAUSE();
    }
  }

  void stop() { stop_.store(true, std::memory_order_release); }

 private:
  struct alignas(64) Slot {
    std::atomic<const char*> next{nullptr};
    std::atomic<const char*> end{nullptr};
  };

  int size_ = 1;
  alignas(64) std::atomic<uint64_t> seq_{0};     // the last job published
  alignas(64) std::atomic<uint64_t> closed_{0};  // the last job the caller finished
  alignas(64) std::atomic<int> joined_{0};       // helpers inside a job
  std::atomic<bool> stop_{false};
  void (*call_)(const void*, int) = nullptr;
  const void* ctx_ = nullptr;
  std::mutex error_mutex_;
  std::exception_ptr error_;  // the first exception a helper's part threw in the current job
  Slot slots_[kMaxThreads];
};

// body() on the calling thread, leading a team of this OpenMP region's threads; body() alone where there is
// no team to have (one thread, already inside a parallel region or a team, switched off).
template <typename Body>
void with_team(const Body& body) {
  if (!Team::enabled() || Team::current() != nullptr || omp_in_parallel() || at::get_num_threads() < 2) {
    body();
    return;
  }
  Team team;  // outlives the region: helpers leave it only at its end
  std::atomic<bool> ready{false};
  std::exception_ptr error;
#pragma omp parallel
  {
    if (omp_get_thread_num() == 0) {
      team.set_size(omp_get_num_threads());
      ready.store(true, std::memory_order_release);
      Team::current() = &team;
      try {
        body();
      } catch (...) {
        error = std::current_exception();
      }
      Team::current() = nullptr;
      team.stop();
    } else {
      while (!ready.load(std::memory_order_acquire)) NEMOTRON3_PAUSE();
      team.helper(omp_get_thread_num());
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace nemotron3
