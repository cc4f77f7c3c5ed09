// Shared by the CPU kernels: work sharing over XLA's intra-op thread pool, and per-ISA builds.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

// Each kernel's hot loop is compiled for AVX-512, AVX2 and plain x86-64, and the loader picks the
// best one the CPU has. The build passes -ffp-contract=off, so no variant fuses a multiply and an
// add: every variant does the same float operations in the same order and gives the same bits.
// The kernels call no libm function whose result could depend on the host (attention has its own exp).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define JAXLORA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define JAXLORA_CLONES
#endif

namespace jaxlora {

// Runs body(i) for every i in [0, n), each exactly once, on the calling thread and on helpers
// from XLA's intra-op pool. Items are claimed from a shared counter, so the caller never waits
// for a helper that has not started: with a busy pool (or none) the caller simply does every item.
// The caller waits only for items already claimed, which their claimers are running. A helper
// that starts late finds nothing left and touches nothing. Which thread runs an item never
// changes its result (items write disjoint outputs).
template <typename Body>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, const Body& body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto run = [state, n, body]() {
    for (int64_t i = state->next.fetch_add(1); i < n; i = state->next.fetch_add(1)) {
      body(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([run]() { run(); });
  run();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

}  // namespace jaxlora
