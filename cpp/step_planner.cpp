#include "step_planner.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>

namespace lockstep {

namespace {

constexpr std::int64_t kInt32Max = std::numeric_limits<std::int32_t>::max();

[[noreturn]] void fail(const char* name, const std::string& what) {
  throw std::invalid_argument(std::string(name) + ": " + what);
}

std::string entry(std::int64_t s) { return "entry " + std::to_string(s) + " "; }

}  // namespace

StepPlanner::StepPlanner(const BlockAllocator& allocator, StepArrays arrays,
                         std::int64_t null_block)
    : allocator_(allocator), a_(arrays), block_size_(allocator.block_size()) {
  if (null_block < allocator.num_blocks() || null_block > kInt32Max) {
    fail("null_block", "must be a block outside the allocator's [0, " +
                           std::to_string(allocator.num_blocks()) +
                           ") that fits int32 (the arena's scratch block), got " +
                           std::to_string(null_block));
  }
  null_block_ = static_cast<std::int32_t>(null_block);
  // query_start and seq_lens are int32: every row index must fit.
  if (a_.max_tokens > kInt32Max) fail("token_ids", "more rows than int32 indexes");
  if (a_.max_seqs < 1) fail("seq_lens", "needs at least one row");
  if (a_.max_blocks_per_seq < 1) fail("block_tables", "needs at least one column");
}

void StepPlanner::check(const std::int64_t* handles, const std::int64_t* starts,
                        const std::int64_t* counts, std::int64_t S, std::int64_t T,
                        std::int64_t num_seqs_padded, std::int64_t num_tokens_padded) const {
  if (num_seqs_padded < S || num_seqs_padded > a_.max_seqs) {
    fail("num_seqs_padded", "is " + std::to_string(num_seqs_padded) + ", outside [" +
                                std::to_string(S) + " sequences, " +
                                std::to_string(a_.max_seqs) + " rows of seq_lens]");
  }
  std::int64_t rows = 0;
  for (std::int64_t s = 0; s < S; ++s) {
    if (!allocator_.has_sequence(handles[s])) {
      fail("handles", entry(s) + "is " + std::to_string(handles[s]) + ", not a live sequence");
    }
    if (counts[s] < 1) fail("counts", entry(s) + "is " + std::to_string(counts[s]) + ", not >= 1");
    if (starts[s] < 0) fail("starts", entry(s) + "is " + std::to_string(starts[s]) + ", not >= 0");
    const std::int64_t held = allocator_.num_tokens(handles[s]);
    if (counts[s] > held - starts[s]) {
      fail("counts", entry(s) + "reaches token " + std::to_string(starts[s] + counts[s]) +
                         " (starts + counts), but the allocator holds " +
                         std::to_string(held) + " for handle " + std::to_string(handles[s]));
    }
    const std::int64_t blocks = (starts[s] + counts[s] - 1) / block_size_ + 1;
    if (blocks > a_.max_blocks_per_seq) {
      fail("counts", entry(s) + "needs " + std::to_string(blocks) +
                         " blocks, more than block_tables' " +
                         std::to_string(a_.max_blocks_per_seq) + " columns");
    }
    if (starts[s] + counts[s] > kInt32Max) fail("counts", entry(s) + "makes seq_len overflow int32");
    rows += counts[s];
  }
  if (rows != T) {
    fail("tokens", "holds " + std::to_string(T) + " tokens, but counts add up to " +
                       std::to_string(rows));
  }
  const std::int64_t needed = T + num_seqs_padded - S;
  if (num_tokens_padded < needed || num_tokens_padded > a_.max_tokens) {
    fail("num_tokens_padded", "is " + std::to_string(num_tokens_padded) + ", outside [" +
                                  std::to_string(needed) + " = tokens + padded sequences, " +
                                  std::to_string(a_.max_tokens) + " rows of token_ids]");
  }
}

void StepPlanner::plan(const std::int64_t* handles, const std::int64_t* starts,
                       const std::int64_t* counts, std::int64_t S, const std::int64_t* tokens,
                       std::int64_t T, std::int64_t num_seqs_padded,
                       std::int64_t num_tokens_padded) {
  check(handles, starts, counts, S, T, num_seqs_padded, num_tokens_padded);
  const std::int64_t bs = block_size_, W = a_.max_blocks_per_seq;
  std::int64_t row = 0;
  for (std::int64_t s = 0; s < S; ++s) {
    const std::int64_t start = starts[s], end = start + counts[s];
    std::int32_t* table = a_.block_tables + s * W;
    allocator_.write_block_table(handles[s], end, table);
    a_.query_start[s] = static_cast<std::int32_t>(row);
    a_.seq_lens[s] = static_cast<std::int32_t>(end);
    std::copy_n(tokens + row, end - start, a_.token_ids + row);
    for (std::int64_t p = start; p < end; ++p, ++row) {
      a_.positions[row] = p;
      a_.slot_mapping[row] = table[p / bs] * bs + p % bs;
    }
  }
  // Padded sequences take one row each, then padded rows fill the bucket; all point at the
  // scratch block.
  const std::int64_t null_slot = std::int64_t{null_block_} * bs;
  for (std::int64_t s = S; s < num_seqs_padded; ++s, ++row) {
    a_.query_start[s] = static_cast<std::int32_t>(row);
    a_.seq_lens[s] = 1;
    a_.block_tables[s * W] = null_block_;
  }
  a_.query_start[num_seqs_padded] = static_cast<std::int32_t>(row);
  std::fill(a_.token_ids + T, a_.token_ids + num_tokens_padded, 0);
  std::fill(a_.positions + T, a_.positions + num_tokens_padded, 0);
  std::fill(a_.slot_mapping + T, a_.slot_mapping + num_tokens_padded, null_slot);
}

}  // namespace lockstep
