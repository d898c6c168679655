// KV block allocator: hands out the blocks of one fixed arena to sequences, shares them
// between forks, and says which shared blocks must be copied before they are written.
//
// Design
// ------
// Every allocated block is also a node of a tree. A node never changes after it is made:
// it remembers the block before it in its sequence (`prev_`), its position in the block
// table (`depth_`) and a jump pointer (`jump_`, below). A sequence is then just a pointer
// to its last node plus a token count; its block table is the chain `last, prev, prev...`
// read backwards. All per-node state lives in flat arrays indexed by block id, sized once
// in the constructor, so the allocator does no heap work per block after start-up.
//
//   fork      The child points at the parent's last node and that node's refcount goes up
//             by one. Nothing is copied or walked: O(1) whatever the length.
//   append    Fresh blocks become new nodes chained after the last one. If the last block
//             is partial and shared, a copy is made first: a new node in the same position,
//             with the same predecessor, which only this sequence points at.
//   truncate  Walks back from the tail, dropping the sequence's hold on each node.
//   free      Truncate to zero, then forget the handle.
//
// Two counts must not be confused:
//   node_refs_[b]  references to node b: sequences whose last node is b, plus nodes whose
//                  `prev_` is b. A node is freed when this reaches zero; this count is what
//                  makes fork O(1), since forking touches only the tail node.
//   refcount(b)    what callers see: the number of live sequences whose block table holds b.
//                  It is computed on demand by asking each sequence for its node at
//                  depth_[b]; the jump pointers make that O(log length), so the query costs
//                  O(sequences * log length).
// The two agree on the question copy-on-write asks: "is my tail shared?" is
// node_refs_[tail] > 1, because any other sequence holding the tail either points at it
// or reaches it through a child node.
//
// Jump pointers are the skew-binary scheme of Myers (1983), "An applicative random-access
// stack": each node's jump is fixed from its predecessor in O(1), and any ancestor at a
// given depth is reached in O(log depth) hops.
//
// Determinism: the free list is a LIFO stack that starts as 0, 1, 2, ... from the top, so a
// fresh allocator hands out block 0 first; the last block freed is the first reused. One
// append takes its copy-on-write block first, then its fresh blocks in table order.
// truncate and free release blocks from the tail backwards. The same sequence of calls
// therefore yields the same block ids on every run.
//
// Not thread-safe: the runtime drives it from one scheduler thread (under the GIL).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace lockstep {

// The arena cannot supply the blocks one call needs. The call changed nothing.
class ArenaExhausted : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class BlockAllocator {
 public:
  using Block = std::int32_t;
  using Handle = std::int64_t;
  using Copy = std::pair<Block, Block>;  // (src, dst): copy src into dst before writing dst

  // Throws std::invalid_argument unless num_blocks >= 1 and block_size >= 1.
  BlockAllocator(std::int64_t num_blocks, std::int64_t block_size);

  std::int64_t num_blocks() const { return num_blocks_; }
  std::int64_t block_size() const { return block_size_; }

  // A new, empty sequence: zero tokens and zero blocks.
  Handle new_sequence();

  // Fresh blocks append(h, n) would take, counting a copy-on-write copy if it needs one.
  std::int64_t blocks_needed(Handle h, std::int64_t n) const;

  // Grows h by n token slots. Returns the copies the caller must do before it writes.
  // Throws ArenaExhausted, changing nothing, if the free list is too short.
  std::vector<Copy> append(Handle h, std::int64_t n);

  // A new sequence sharing all of h's blocks and tokens. O(1).
  Handle fork(Handle h);

  // Shrinks h to n_tokens (0 <= n_tokens <= num_tokens(h)), releasing the blocks it no
  // longer needs from the tail backwards.
  void truncate(Handle h, std::int64_t n_tokens);

  // Releases all of h's blocks, tail first, and forgets the handle.
  void free(Handle h);

  std::int64_t num_tokens(Handle h) const;
  std::vector<Block> block_table(Handle h) const;  // O(length)
  std::int64_t refcount(std::int64_t block) const;  // O(sequences * log length)
  std::int64_t num_free_blocks() const { return static_cast<std::int64_t>(free_.size()); }
  std::int64_t num_sequences() const { return static_cast<std::int64_t>(seqs_.size()); }

 private:
  static constexpr Block kNone = -1;

  struct Sequence {
    Block tail = kNone;       // last node of the block chain; kNone when empty
    std::int64_t tokens = 0;
  };

  Sequence& lookup(Handle h);
  const Sequence& lookup(Handle h) const;
  std::int64_t blocks_for(std::int64_t tokens) const;
  std::int64_t needed(const Sequence& s, std::int64_t n) const;

  // Takes the top of the free list and makes it a node after `prev`, held once.
  Block make_node(Block prev);
  // Drops one reference to `node`; frees it, and its now-unreferenced ancestors, at zero.
  void release(Block node);
  // The node at `depth` in the chain ending at `node` (depth_[node] >= depth).
  Block ancestor_at(Block node, std::int32_t depth) const;

  std::int64_t num_blocks_;
  std::int64_t block_size_;

  std::vector<Block> prev_;
  std::vector<Block> jump_;
  std::vector<std::int32_t> depth_;
  std::vector<std::int32_t> node_refs_;  // 0 exactly when the block is free
  std::vector<Block> free_;              // LIFO: back() is handed out next

  std::unordered_map<Handle, Sequence> seqs_;
  Handle next_handle_ = 0;  // monotonic, so a stale handle never aliases a live one
};

}  // namespace lockstep
