#include "thread_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define LOCKSTEP_HAVE_PTHREAD_ATFORK 1
#endif

namespace lockstep::cpu {

// How a job is shared out. `ticket` packs the job's generation (high bits) with the number
// of chunks claimed so far (low kChunkBits). A thread claims chunk c by moving the ticket
// from (g, c) to (g, c + 1) with a compare-exchange, after reading fn and chunks.
//
// Success must prove that the fn and chunk count it read belong to job g. The caller of
// the next job therefore first closes generation g (the ticket moves to g + 1 with every
// chunk claimed, kClosed) and only then writes the new fn and chunks, with release, then
// opens generation g + 2. A worker whose acquire load saw the new fn or chunks also sees
// the close, so its compare-exchange against (g, c) fails. Without the close, a worker
// holding (g, chunks of g) could read the next job's larger chunk count, claim a chunk
// before the job was published, run it early (and again when it was claimed properly) and
// count it done, so the caller returned while a worker still ran its fn: a crash on a
// worker thread, seen once in a few full test runs.
struct PoolState {
  static constexpr int kChunkBits = 24;
  static constexpr std::uint64_t kChunkMask = (std::uint64_t{1} << kChunkBits) - 1;
  // A closed generation's claim count: more than any job's chunks (kMaxChunks).
  static constexpr std::uint64_t kClosed = kChunkMask;
  static_assert(ThreadPool::kMaxChunks < kClosed, "a closed generation must look fully claimed");

  explicit PoolState(int n) : num_threads(n) {}

  std::mutex submit;  // held by the one running job, or by a resize
  int num_threads;
  std::vector<std::thread> workers;  // num_threads - 1 of them once started

  std::atomic<std::uint64_t> ticket{0};
  std::atomic<const std::function<void(int)>*> fn{nullptr};
  std::atomic<int> chunks{0};
  std::atomic<int> done{0};
  std::mutex error_mu;
  std::exception_ptr error;

  std::mutex mu;  // sleeping workers wait on cv; a new ticket is published under mu
  std::condition_variable cv;
  std::atomic<bool> stop{false};
};

namespace {

using Clock = std::chrono::steady_clock;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

inline std::uint64_t generation_of(std::uint64_t ticket) {
  return ticket >> PoolState::kChunkBits;
}

// Claims and runs chunks of job `generation` until none are left or the job is over.
void work_on(PoolState& s, std::uint64_t generation) {
  std::uint64_t t = s.ticket.load(std::memory_order_acquire);
  for (;;) {
    if (generation_of(t) != generation) return;
    const auto* fn = s.fn.load(std::memory_order_acquire);
    const int chunks = s.chunks.load(std::memory_order_acquire);
    const auto chunk = static_cast<int>(t & PoolState::kChunkMask);
    if (chunk >= chunks) return;
    if (!s.ticket.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel,
                                        std::memory_order_acquire)) {
      continue;  // t now holds the current ticket
    }
    try {
      (*fn)(chunk);
    } catch (...) {
      std::lock_guard<std::mutex> lock(s.error_mu);
      if (!s.error) s.error = std::current_exception();
    }
    s.done.fetch_add(1, std::memory_order_acq_rel);
    t = s.ticket.load(std::memory_order_acquire);
  }
}

// Spins for about kSpinMicros, then sleeps, until a job newer than `seen` is published or
// the pool stops; returns the newest generation. Sleep comes in naps that double from
// kFirstNapMicros to kLongestNapMicros: jobs too short to be worth a wake-up do not notify,
// so a napping worker finds out about them at the end of its nap, after which it spins again
// and catches the jobs that follow. In a decode step that brings it back within a nap.
std::uint64_t await_job(PoolState& s, std::uint64_t seen) {
  const auto newer = [&] {
    return generation_of(s.ticket.load(std::memory_order_acquire)) != seen ||
           s.stop.load(std::memory_order_acquire);
  };
  const auto deadline = Clock::now() + std::chrono::microseconds(ThreadPool::kSpinMicros);
  for (unsigned spins = 1; !newer(); ++spins) {
    cpu_relax();
    if (spins % 128 == 0 && Clock::now() > deadline) {
      auto nap = std::chrono::microseconds(ThreadPool::kFirstNapMicros);
      std::unique_lock<std::mutex> lock(s.mu);
      while (!s.cv.wait_for(lock, nap, newer)) {
        nap = std::min(nap * 2, std::chrono::microseconds(ThreadPool::kLongestNapMicros));
      }
      break;
    }
  }
  return generation_of(s.ticket.load(std::memory_order_acquire));
}

void worker_loop(PoolState* s, std::uint64_t seen) {
  for (;;) {
    seen = await_job(*s, seen);
    if (s->stop.load(std::memory_order_acquire)) return;
    work_on(*s, seen);
  }
}

// Caller holds s.submit.
void stop_workers(PoolState& s) {
  {
    std::lock_guard<std::mutex> lock(s.mu);
    s.stop.store(true, std::memory_order_release);
  }
  s.cv.notify_all();
  for (auto& t : s.workers) t.join();
  s.workers.clear();
  s.stop.store(false, std::memory_order_release);
}

// Caller holds s.submit, so no job is running and the generation is stable.
void start_workers(PoolState& s) {
  const std::uint64_t now = generation_of(s.ticket.load(std::memory_order_acquire));
  s.workers.reserve(static_cast<std::size_t>(s.num_threads - 1));
  for (int i = 1; i < s.num_threads; ++i) s.workers.emplace_back(worker_loop, &s, now);
}

ThreadPool* g_pool = nullptr;

}  // namespace

int available_cpus() {
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

ThreadPool::ThreadPool() : state_(new PoolState(std::min(available_cpus(), kMaxThreads))) {}

ThreadPool& ThreadPool::instance() {
  // Leaked on purpose: joining workers from a static destructor at interpreter exit buys
  // nothing and risks running after the runtime they need is gone.
  static ThreadPool* pool = [] {
    g_pool = new ThreadPool();
#if LOCKSTEP_HAVE_PTHREAD_ATFORK
    pthread_atfork(nullptr, nullptr, &ThreadPool::after_fork_in_child);
#endif
    return g_pool;
  }();
  return *pool;
}

void ThreadPool::after_fork_in_child() {
  // The child has only the forking thread: the workers are gone and the old state's mutexes
  // may be held by threads that no longer exist. Start over with a fresh, worker-less state
  // (leaking the old one, which cannot be safely destroyed).
  g_pool->state_ = new PoolState(g_pool->state_->num_threads);
}

void ThreadPool::set_num_threads(int n) {
  if (n < 1 || n > kMaxThreads) {
    throw std::invalid_argument("n: the thread count must be in [1, " +
                                std::to_string(kMaxThreads) + "], got " + std::to_string(n));
  }
  PoolState& s = *state_;
  std::lock_guard<std::mutex> lock(s.submit);
  if (n == s.num_threads) return;
  stop_workers(s);
  s.num_threads = n;  // workers start on the next job
}

int ThreadPool::num_threads() const { return state_->num_threads; }

void ThreadPool::run(int chunks, const std::function<void(int)>& fn, bool wake) {
  if (chunks < 0 || chunks > kMaxChunks) {
    throw std::invalid_argument("ThreadPool::run: chunks must be in [0, " +
                                std::to_string(kMaxChunks) + "], got " +
                                std::to_string(chunks));
  }
  PoolState& s = *state_;
  std::unique_lock<std::mutex> submit(s.submit, std::try_to_lock);
  if (chunks <= 1 || s.num_threads == 1 || !submit.owns_lock()) {
    for (int c = 0; c < chunks; ++c) fn(c);
    return;
  }
  if (static_cast<int>(s.workers.size()) != s.num_threads - 1) start_workers(s);

  // Close the last job's generation before touching fn and chunks (see PoolState). Workers
  // that see the closed generation find nothing to claim and wait for the next one.
  const std::uint64_t closed = generation_of(s.ticket.load(std::memory_order_relaxed)) + 1;
  s.ticket.store((closed << PoolState::kChunkBits) | PoolState::kClosed,
                 std::memory_order_seq_cst);
  s.fn.store(&fn, std::memory_order_release);
  s.chunks.store(chunks, std::memory_order_release);
  s.done.store(0, std::memory_order_relaxed);
  s.error = nullptr;
  const std::uint64_t generation = closed + 1;
  if (wake) {
    {
      std::lock_guard<std::mutex> lock(s.mu);
      s.ticket.store(generation << PoolState::kChunkBits, std::memory_order_release);
    }
    s.cv.notify_all();
  } else {
    // Spinning workers see this; sleeping ones may sleep through it, which is the point.
    s.ticket.store(generation << PoolState::kChunkBits, std::memory_order_release);
  }

  work_on(s, generation);
  // Every chunk is claimed; wait for the ones still running on workers.
  for (unsigned spins = 1; s.done.load(std::memory_order_acquire) < chunks; ++spins) {
    if (spins % 1024 == 0) {
      std::this_thread::yield();  // a descheduled worker needs this core more
    } else {
      cpu_relax();
    }
  }
  if (s.error) std::rethrow_exception(s.error);
}

}  // namespace lockstep::cpu
