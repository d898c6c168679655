// A persistent pool of CPU worker threads for the kernels in this folder.
//
// run(chunks, fn) calls fn(0), ..., fn(chunks - 1), each exactly once, and returns when all
// have returned. The calling thread works too. Chunks are claimed one at a time by whichever
// thread is free, so a worker that is slow to wake (tens of microseconds on a VM) costs only
// the chunks it does not take: the caller never waits for a worker that has not started.
// Which thread runs a chunk is therefore not fixed; fn must not depend on it.
//
// Between jobs the workers spin for about kSpinMicros, so the back-to-back matmuls of a
// decode step do not each pay a wake-up, then sleep on a condition variable, so they leave
// the cores to torch's own threads while the kernels are idle. Only jobs the caller marks
// as worth it wake sleeping workers; shorter ones would be over before a woken worker
// arrived. Sleeping workers also look for work after each nap (1 ms, doubling to 16 ms).
//
// One job runs at a time. A caller that finds the pool busy (another Python thread's matmul,
// with the GIL released) runs all its chunks itself instead of waiting.
//
// After fork() the child has no workers; an atfork handler gives it a fresh pool state, and
// workers start again on its first job.
#pragma once

#include <functional>

namespace lockstep::cpu {

struct PoolState;  // thread_pool.cpp

class ThreadPool {
 public:
  static constexpr int kMaxThreads = 1024;
  static constexpr int kMaxChunks = 1 << 20;
  static constexpr int kSpinMicros = 100;
  static constexpr int kFirstNapMicros = 1000;
  static constexpr int kLongestNapMicros = 16000;

  // The process-wide pool, first sized to the CPUs this process may run on.
  static ThreadPool& instance();

  // Threads that take part in a job, the caller included. Throws std::invalid_argument
  // unless 1 <= n <= kMaxThreads. Waits for a running job to finish.
  void set_num_threads(int n);
  int num_threads() const;

  // Calls fn(c) once for each c in [0, chunks), chunks <= kMaxChunks, spread over the
  // threads. Rethrows the first exception a chunk threw, after all chunks have finished.
  // `wake`: whether the job is long enough to wake workers that have gone to sleep. Spinning
  // workers join either way; waking a sleeping one costs the caller a futex wake (~8 us on
  // the 2-vCPU VM this was tuned on) and the worker ~30 us or more to arrive.
  void run(int chunks, const std::function<void(int)>& fn, bool wake = true);

  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

 private:
  ThreadPool();
  static void after_fork_in_child();

  PoolState* state_;  // never freed: the pool lives as long as the process
};

// CPUs this process may run on (sched_getaffinity), at least 1.
int available_cpus();

}  // namespace lockstep::cpu
