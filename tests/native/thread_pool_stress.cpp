// Stress test for lockstep::cpu::ThreadPool (cpp/cpu/thread_pool.cpp), built and run by
// tests/test_thread_pool.py.
//
// Runs many back-to-back jobs of a few chunks each, the shape of a decode step's small
// matmuls, with chunk counts that change from job to job (a stale worker that mistook the
// next job's chunk count for its own once ran a chunk before the job was published). After
// every run() it checks that each chunk ran exactly once and had finished: run() returning
// while a worker still ran a chunk shows up as a count below 1, a chunk run twice as 2.
//
// Usage: thread_pool_stress JOBS THREADS. Prints one line; exits 1 on any miscount.
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <memory>

#include "cpu/thread_pool.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s JOBS THREADS\n", argv[0]);
    return 2;
  }
  const long jobs = std::atol(argv[1]);
  const int threads = std::atoi(argv[2]);
  auto& pool = lockstep::cpu::ThreadPool::instance();
  pool.set_num_threads(threads);
  constexpr int kMostChunks = 9;
  long miscounted = 0;
  for (long j = 0; j < jobs; ++j) {
    const int chunks = 2 + static_cast<int>(j % (kMostChunks - 1));
    // A fresh array per job, as a kernel's outputs: a late writer hits memory that is gone.
    auto runs = std::make_unique<std::atomic<int>[]>(chunks);
    for (int c = 0; c < chunks; ++c) runs[c].store(0);
    pool.run(chunks, [&](int c) { runs[c].fetch_add(1); }, /*wake=*/j % 2 == 0);
    for (int c = 0; c < chunks; ++c) miscounted += runs[c].load() != 1;
  }
  std::printf("%ld jobs on %d threads: %ld chunks not run exactly once when run() returned\n",
              jobs, threads, miscounted);
  return miscounted == 0 ? 0 : 1;
}
