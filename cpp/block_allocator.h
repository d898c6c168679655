// KV block allocator: hands out the blocks of one fixed arena to sequences, shares them
// between forks and, with the prefix cache on, between requests with a common prompt prefix,
// and says which shared blocks must be copied before they are written.
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
//             is partial and shared (or cached, below), a copy is made first: a new node in
//             the same position, with the same predecessor, which only this sequence points at.
//   truncate  Walks back from the tail, dropping the sequence's hold on each node.
//   free      Truncate to zero, then forget the handle.
//
// Two counts must not be confused:
//   node_refs_[b]  references to node b: sequences whose last node is b, plus live nodes
//                  (node_refs_ > 0) whose `prev_` is b. A node no longer referenced is freed,
//                  or, if it is cached, becomes evictable; this count is what makes fork O(1),
//                  since forking touches only the tail node.
//   refcount(b)    what callers see: the number of live sequences whose block table holds b.
//                  It is computed on demand by asking each sequence for its node at
//                  depth_[b]; the jump pointers make that O(log length), so the query costs
//                  O(sequences * log length).
// The two agree on the question copy-on-write asks: "is my tail shared?" is
// node_refs_[tail] > 1, because any other sequence holding the tail either points at it
// or reaches it through a live child node. They also agree on zero: node_refs_[b] == 0
// exactly when no sequence holds b.
//
// Prefix cache (constructor flag `prefix_cache`)
// ----------------------------------------------
// A full block whose KV the caller has computed can be published: it is registered in a
// PrefixIndex (prefix_index.h) under (its parent node, its block_size tokens). A new request
// then adopts the longest chain of registered blocks matching its prompt, block by block from
// the root, taking one reference on the chain's last node exactly as fork does; it stops one
// token short of the prompt, so the caller still computes the last prompt token's logits.
//   - A registered node is only written by the sequence that filled it, before it was
//     published. After that it is read-only: copy-on-write also copies a partial tail block
//     that is registered (a sequence truncated into a published block), whoever holds it.
//   - Only blocks whose parent is registered (or the root) are registered, and a key already
//     held by another node is left to it, so every registered node is reachable from the root.
//   - A registered node that nobody holds is not freed: it keeps its KV, its key and its
//     place in the tree, and becomes evictable, the most recent in the eviction order. It
//     stops counting towards its parent's node_refs_ (only live children count), so a whole
//     unheld chain is evictable block by block, and num_free_blocks() = free + evictable is
//     exactly what one append can get. Adopting an evictable chain makes it live again.
//   - make_node takes the free list first, then evicts the least recently evictable node.
//     A chain dies tail first, so a node always becomes evictable after its children did:
//     the oldest evictable node has no children left, and reusing it leaves no node whose
//     prev_ or key names a reused block.
//
// Determinism: the free list is a LIFO stack that starts as 0, 1, 2, ... from the top, so a
// fresh allocator hands out block 0 first; the last block freed is the first reused. One
// append takes its copy-on-write block first, then its fresh blocks in table order, and only
// then lets go of the block it copied. truncate and free release blocks from the tail
// backwards. Eviction follows a logical order (the order blocks became evictable), never wall
// time. The same sequence of calls therefore yields the same block ids on every run.
//
// Not thread-safe: the runtime drives it from one scheduler thread (under the GIL).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "prefix_index.h"

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
  BlockAllocator(std::int64_t num_blocks, std::int64_t block_size, bool prefix_cache = false);

  std::int64_t num_blocks() const { return num_blocks_; }
  std::int64_t block_size() const { return block_size_; }
  bool prefix_cache() const { return prefix_cache_; }

  // A new, empty sequence: zero tokens and zero blocks.
  Handle new_sequence();

  // A new sequence holding the longest chain of published blocks that matches tokens[0, n),
  // at most (n - 1) / block_size blocks so that one token is left to compute. Returns the
  // handle and the tokens it holds (a multiple of block_size; 0 without the prefix cache).
  std::pair<Handle, std::int64_t> new_sequence_cached(const std::int64_t* tokens, std::int64_t n);

  // Registers h's full blocks within its first num_computed tokens in the prefix index,
  // skipping any whose key another block already holds. tokens[0, n) are h's tokens from token
  // `first` on (num_computed <= first + n and <= num_tokens(h)): a caller that publishes each
  // block as it completes passes only the tokens since the last one, not the whole context. A
  // block that starts before `first` and is not yet published cannot be keyed, so neither it
  // nor any block after it is registered. O(blocks not yet published). No-op without the cache.
  void publish(Handle h, const std::int64_t* tokens, std::int64_t n, std::int64_t num_computed,
               std::int64_t first = 0);

  // Unregisters every block; the evictable ones go back to the free list.
  void clear_prefix_cache();

  // Fresh blocks append(h, n) would take, counting a copy-on-write copy if it needs one.
  std::int64_t blocks_needed(Handle h, std::int64_t n) const;

  // Grows h by n token slots. Returns the copies the caller must do before it writes.
  // Throws ArenaExhausted, changing nothing, if the free list is too short.
  std::vector<Copy> append(Handle h, std::int64_t n);

  // Grows handles[0, n) by one token slot each, in order, exactly as n calls of append(h, 1)
  // would, stopping before the first one the arena cannot supply (it and those after it are
  // left as they were). Returns how many grew; their copies are appended to `copies` in call
  // order, and must be done in that order: a later copy may write a block an earlier one
  // reads. Throws std::invalid_argument, changing nothing, if a handle is unknown. A decode
  // step reserves every sequence's next slot with one call.
  std::int64_t append_one_each(const Handle* handles, std::int64_t n, std::vector<Copy>& copies);

  // A new sequence sharing all of h's blocks and tokens. O(1).
  Handle fork(Handle h);

  // Shrinks h to n_tokens (0 <= n_tokens <= num_tokens(h)), releasing the blocks it no
  // longer needs from the tail backwards.
  void truncate(Handle h, std::int64_t n_tokens);

  // Releases all of h's blocks, tail first, and forgets the handle.
  void free(Handle h);

  bool has_sequence(Handle h) const { return seqs_.count(h) != 0; }
  std::int64_t num_tokens(Handle h) const;
  // Leading blocks of h that publish() has looked at: the next publish needs h's tokens from
  // num_published(h) * block_size on (0 again after clear_prefix_cache()).
  std::int64_t num_published(Handle h) const { return lookup(h).published; }
  std::vector<Block> block_table(Handle h) const;  // O(length)
  // The blocks of h's first n_tokens tokens (n_tokens <= num_tokens(h)) into out[0..), in
  // table order, read straight off the chain: no allocation. O(log length + blocks).
  void write_block_table(Handle h, std::int64_t n_tokens, Block* out) const;
  std::int64_t refcount(std::int64_t block) const;  // O(sequences * log length)
  // Blocks an append can get: free ones plus cached ones nobody holds (evicted on demand).
  std::int64_t num_free_blocks() const {
    return static_cast<std::int64_t>(free_.size()) + index_.num_evictable();
  }
  std::int64_t num_cached_blocks() const { return index_.size(); }
  // Tokens new_sequence_cached could have matched, and those it did, since construction.
  std::int64_t prefix_queries() const { return prefix_queries_; }
  std::int64_t prefix_hits() const { return prefix_hits_; }
  std::int64_t num_sequences() const { return static_cast<std::int64_t>(seqs_.size()); }

 private:
  static constexpr Block kNone = -1;

  struct Sequence {
    Block tail = kNone;       // last node of the block chain; kNone when empty
    std::int64_t tokens = 0;
    std::int64_t published = 0;  // leading blocks publish() has already looked at
  };

  Sequence& lookup(Handle h);
  const Sequence& lookup(Handle h) const;
  std::int64_t blocks_for(std::int64_t tokens) const;
  std::int64_t needed(const Sequence& s, std::int64_t n) const;
  // Whether the next token would land in a partial tail block others can see.
  bool needs_copy(const Sequence& s) const;

  // Takes the top of the free list (or evicts the oldest evictable block) and makes it a node
  // after `prev`, held once.
  Block make_node(Block prev);
  // Adds one reference to `node` (kNone: nothing); an evictable chain becomes live again.
  void hold(Block node);
  // Drops one reference to `node`; at zero it is freed, or made evictable if it is cached,
  // and its predecessor loses the reference it held, and so on up the chain.
  void release(Block node);
  // The node at `depth` in the chain ending at `node` (depth_[node] >= depth).
  Block ancestor_at(Block node, std::int32_t depth) const;

  std::int64_t num_blocks_;
  std::int64_t block_size_;

  std::vector<Block> prev_;
  std::vector<Block> jump_;
  std::vector<std::int32_t> depth_;
  std::vector<std::int32_t> node_refs_;  // 0 exactly when the block is free or evictable
  std::vector<Block> free_;              // LIFO: back() is handed out next

  bool prefix_cache_;
  PrefixIndex index_;            // empty without the prefix cache
  std::vector<Block> scratch_;   // publish's nodes, in table order
  std::int64_t prefix_queries_ = 0;
  std::int64_t prefix_hits_ = 0;

  std::unordered_map<Handle, Sequence> seqs_;
  Handle next_handle_ = 0;  // monotonic, so a stale handle never aliases a live one
};

}  // namespace lockstep
