// A small persistent thread pool: MLX's CPU backend runs a primitive on one stream
// thread, so parallelism inside a kernel must come from our own workers.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace edgeai {

class Pool {
 public:
  static Pool& get();
  ~Pool();
  int threads() const { return nthreads_; }
  // Restart with n threads in all (the caller counts as one).
  void resize(int n);
  // Run f(0..n-1) across the pool and the calling thread; returns when all are done.
  void run(int n, const std::function<void(int)>& f);
  // How long idle workers spin before sleeping (see pool.cpp).
  void set_spin_us(int us) { spin_us_.store(us, std::memory_order_relaxed); }
  int spin_us() const { return spin_us_.load(std::memory_order_relaxed); }

 private:
  void stop_workers();
  void worker(uint32_t seen);
  void work();

  int nthreads_ = 1;
  std::atomic<int> spin_us_{200};
  std::vector<std::thread> workers_;
  std::mutex mu_, run_mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  // (generation << 32 | next ticket) and (generation << 32 | ticket count): a worker that
  // wakes late can never take a ticket of a later run by mistake.
  std::atomic<uint64_t> state_{0}, tasks_{0};
  std::atomic<uint32_t> gen_{0};
  std::atomic<int> done_{0};
  std::atomic<const std::function<void(int)>*> job_{nullptr};
};

}  // namespace edgeai
