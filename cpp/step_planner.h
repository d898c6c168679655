// Step planner: fills one step's metadata arrays for the whole batch in one call.
//
// The arrays are the model step's inputs (DESIGN.md, "Step planning"): allocated once at
// start-up at the largest bucket's size, owned by the caller, written in place every step, so
// a captured CUDA graph can replay over them. The planner keeps pointers to them.
//
// A step holds S real sequences, then padding up to the bucket's num_seqs_padded sequences
// and num_tokens_padded rows. With T = counts[0] + ... + counts[S - 1]:
//   real sequence s   rows query_start[s] .. + counts[s] - 1, consecutive and in order; row i
//                     holds tokens[...], position starts[s] + i and that position's cache slot
//                     block * block_size + offset; block_tables[s, :blocks] holds the
//                     sequence's blocks for its first starts[s] + counts[s] tokens, and
//                     seq_lens[s] = starts[s] + counts[s].
//   padded sequence   s in [S, num_seqs_padded): one row, T + s - S, with token 0, position 0,
//                     slot null_block * block_size; seq_lens[s] = 1, block_tables[s, 0] =
//                     null_block. So a padded sequence attends to one scratch slot.
//   padded rows       T + num_seqs_padded - S .. num_tokens_padded - 1: token 0, position 0,
//                     slot null_block * block_size, in no sequence.
// query_start gets num_seqs_padded + 1 entries. Columns of block_tables past a sequence's
// blocks, and rows past the padding, are left as they were: nothing reads them.
//
// null_block is the KV arena's one extra scratch block (>= the allocator's num_blocks), which
// padding may write and read freely. Every argument is checked before anything is written.
#pragma once

#include <cstdint>

#include "block_allocator.h"

namespace lockstep {

// The caller's arrays, C-contiguous.
struct StepArrays {
  std::int64_t* token_ids;     // [max_tokens]
  std::int64_t* positions;     // [max_tokens]
  std::int64_t* slot_mapping;  // [max_tokens]
  std::int32_t* block_tables;  // [max_seqs, max_blocks_per_seq]
  std::int32_t* seq_lens;      // [max_seqs]
  std::int32_t* query_start;   // [max_seqs + 1]
  std::int64_t max_tokens;
  std::int64_t max_seqs;
  std::int64_t max_blocks_per_seq;
};

class StepPlanner {
 public:
  // Throws std::invalid_argument unless null_block >= allocator.num_blocks() and every size
  // fits the int32 arrays.
  StepPlanner(const BlockAllocator& allocator, StepArrays arrays, std::int64_t null_block);

  // handles, starts, counts: [S]; tokens: [T]. Throws std::invalid_argument naming the
  // argument, having written nothing, if they do not fit the arrays or the allocator.
  void plan(const std::int64_t* handles, const std::int64_t* starts, const std::int64_t* counts,
            std::int64_t S, const std::int64_t* tokens, std::int64_t T,
            std::int64_t num_seqs_padded, std::int64_t num_tokens_padded);

 private:
  void check(const std::int64_t* handles, const std::int64_t* starts, const std::int64_t* counts,
             std::int64_t S, std::int64_t T, std::int64_t num_seqs_padded,
             std::int64_t num_tokens_padded) const;

  const BlockAllocator& allocator_;
  StepArrays a_;
  std::int64_t block_size_;
  std::int32_t null_block_;
};

}  // namespace lockstep
