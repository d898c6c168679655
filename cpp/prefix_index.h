// Prefix index: which KV block holds a given full block of tokens after a given parent block,
// and in what order the cached blocks nobody holds should be evicted.
//
// A key is (parent node id, or kNone for a sequence's first block; the block's block_size
// token ids). Keying by the parent's node id rather than by the whole prefix makes a key
// O(block_size) however deep the block sits: the parent node already stands for everything
// before it. Keys are hashed to 64 bits, but each entry keeps its tokens and parent and a
// lookup compares them, so a hash collision costs a probe, never a wrong block.
//
// The table is open addressing with linear probing over block ids, sized once to at least
// twice the arena (load <= 1/2), with backward-shift deletion (no tombstones), so it does no
// heap work after construction. The eviction order is an intrusive doubly linked list over
// block ids, least recently made evictable first: a logical order fixed by the calls alone,
// never by wall time, so the same calls evict the same blocks on every run.
//
// The index only stores; BlockAllocator (block_allocator.h) decides what is registered and
// when a block becomes evictable. Not thread-safe, like the allocator.
#pragma once

#include <cstdint>
#include <vector>

namespace lockstep {

class PrefixIndex {
 public:
  using Block = std::int32_t;
  static constexpr Block kNone = -1;

  PrefixIndex() = default;  // holds nothing: for an allocator without a prefix cache
  PrefixIndex(std::int64_t num_blocks, std::int64_t block_size);

  // The block registered under (parent, tokens[0, block_size)), or kNone.
  Block find(Block parent, const std::int64_t* tokens) const;
  // Registers `block` (not yet registered) under the key. Returns false, changing nothing,
  // if another block already holds that key.
  bool insert(Block parent, const std::int64_t* tokens, Block block);
  // Unregisters `block`, which must be registered and not evictable.
  void erase(Block block);
  bool contains(Block block) const {
    return block >= 0 && static_cast<std::size_t>(block) < registered_.size() &&
           registered_[block] != 0;
  }
  std::int64_t size() const { return size_; }

  // The eviction order of registered blocks nobody holds: push_evictable appends as the most
  // recent; oldest_evictable is the next to evict (kNone if none).
  void push_evictable(Block block);
  void remove_evictable(Block block);
  Block oldest_evictable() const { return lru_head_; }
  std::int64_t num_evictable() const { return num_evictable_; }

  // Unregisters everything; the eviction order must already be empty.
  void clear();

 private:
  std::uint64_t hash(Block parent, const std::int64_t* tokens) const;
  bool matches(Block block, std::uint64_t h, Block parent, const std::int64_t* tokens) const;
  std::size_t home(std::uint64_t h) const { return static_cast<std::size_t>(h) & mask_; }

  std::int64_t block_size_ = 0;
  std::size_t mask_ = 0;
  std::vector<Block> table_;            // kNone, or the block whose key hashes near here
  std::vector<std::uint8_t> registered_;
  std::vector<Block> parent_;           // each registered block's key ...
  std::vector<std::int64_t> tokens_;    // ... [block * block_size, +block_size)
  std::vector<std::uint64_t> hash_;     // ... and its hash
  std::int64_t size_ = 0;

  std::vector<Block> lru_prev_;
  std::vector<Block> lru_next_;
  Block lru_head_ = kNone;  // oldest
  Block lru_tail_ = kNone;  // newest
  std::int64_t num_evictable_ = 0;
};

}  // namespace lockstep
