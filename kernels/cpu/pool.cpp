#include "pool.h"

#include <chrono>
#include <cstdlib>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
#elif defined(__aarch64__)
static inline void cpu_relax() { asm volatile("yield"); }
#else
static inline void cpu_relax() {}
#endif

namespace edgeai {

namespace {
int default_threads() {
  if (const char* env = std::getenv("EDGEAI_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  unsigned n = std::thread::hardware_concurrency();
  return n ? int(n) : 1;
}
// Workers spin a while after a run before sleeping (Pool::spin_us_): decode issues a matmul
// every few tens of microseconds, and a futex wake-up costs about as much as a small matmul.
// 200 us by default (one stream: Qwen2.5-Coder-1.5B decode 42-44 tok/s, 38-42 at 30 us); a
// server decoding batches asks for 30 (kernels.cpu.batch_mode): on 2 cores a spinning worker
// takes the core the Python thread needs to build the next step (SmolLM2-135M, a 16-request
// batch 3.4 -> 2.7 CPU ms a token).
}  // namespace

Pool& Pool::get() {
  static Pool* pool = [] {
    auto* p = new Pool();  // leaked on purpose: no joining threads at interpreter exit
    p->resize(default_threads());
    return p;
  }();
  return *pool;
}

Pool::~Pool() { stop_workers(); }

void Pool::stop_workers() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
  stop_ = false;
}

void Pool::resize(int n) {
  std::lock_guard<std::mutex> run(run_mu_);
  stop_workers();
  nthreads_ = n < 1 ? 1 : n;
  uint32_t g = gen_.load();
  for (int i = 1; i < nthreads_; i++) workers_.emplace_back([this, g] { worker(g); });
}

void Pool::work() {
  for (;;) {
    uint64_t s = state_.fetch_add(1);
    uint64_t t = tasks_.load();
    if ((s >> 32) != (t >> 32) || (s & 0xffffffffu) >= (t & 0xffffffffu)) return;
    (*job_.load())(int(s & 0xffffffffu));
    done_.fetch_add(1, std::memory_order_release);
  }
}

void Pool::worker(uint32_t seen) {
  for (;;) {
    auto t0 = std::chrono::steady_clock::now();
    int spins = 0;
    while (gen_.load(std::memory_order_acquire) == seen) {
      cpu_relax();
      if (++spins % 64 == 0 && std::chrono::steady_clock::now() - t0 >
                                    std::chrono::microseconds(spin_us_.load(std::memory_order_relaxed))) {
        // Idle long enough: sleep until the next run.
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_ || gen_.load() != seen; });
        break;
      }
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (stop_) return;
    }
    seen = gen_.load();
    work();
  }
}

void Pool::run(int n, const std::function<void(int)>& f) {
  if (n <= 0) return;
  if (nthreads_ <= 1 || n == 1) {
    for (int i = 0; i < n; i++) f(i);
    return;
  }
  std::lock_guard<std::mutex> run(run_mu_);
  uint64_t g = uint64_t(gen_.load() + 1);
  job_.store(&f);
  done_.store(0);
  tasks_.store((g << 32) | uint32_t(n));
  state_.store(g << 32);
  {
    std::lock_guard<std::mutex> lk(mu_);
    gen_.store(uint32_t(g), std::memory_order_release);
  }
  cv_.notify_all();
  work();
  // Tasks are short; a worker still running one was most likely preempted (shared or
  // oversubscribed CPUs), so after a brief spin give the core away instead of burning it.
  for (int spins = 0; done_.load(std::memory_order_acquire) < n; spins++) {
    if (spins < 2000) cpu_relax();
    else std::this_thread::yield();
  }
}

}  // namespace edgeai
