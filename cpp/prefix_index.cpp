#include "prefix_index.h"

#include <algorithm>

namespace lockstep {

namespace {

// splitmix64's finalizer: every input bit reaches every output bit.
std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

}  // namespace

PrefixIndex::PrefixIndex(std::int64_t num_blocks, std::int64_t block_size)
    : block_size_(block_size) {
  const auto n = static_cast<std::size_t>(num_blocks);
  std::size_t capacity = 2;
  while (capacity < 2 * n) capacity *= 2;
  mask_ = capacity - 1;
  table_.assign(capacity, kNone);
  registered_.assign(n, 0);
  parent_.assign(n, kNone);
  tokens_.assign(n * static_cast<std::size_t>(block_size), 0);
  hash_.assign(n, 0);
  lru_prev_.assign(n, kNone);
  lru_next_.assign(n, kNone);
}

std::uint64_t PrefixIndex::hash(Block parent, const std::int64_t* tokens) const {
  std::uint64_t h = mix(static_cast<std::uint64_t>(static_cast<std::int64_t>(parent) + 1));
  for (std::int64_t i = 0; i < block_size_; ++i) h = mix(h ^ static_cast<std::uint64_t>(tokens[i]));
  return h;
}

bool PrefixIndex::matches(Block block, std::uint64_t h, Block parent,
                          const std::int64_t* tokens) const {
  const std::int64_t* stored = tokens_.data() + static_cast<std::size_t>(block) * block_size_;
  return hash_[block] == h && parent_[block] == parent &&
         std::equal(stored, stored + block_size_, tokens);
}

PrefixIndex::Block PrefixIndex::find(Block parent, const std::int64_t* tokens) const {
  if (table_.empty()) return kNone;
  const std::uint64_t h = hash(parent, tokens);
  for (std::size_t i = home(h); table_[i] != kNone; i = (i + 1) & mask_) {
    if (matches(table_[i], h, parent, tokens)) return table_[i];
  }
  return kNone;
}

bool PrefixIndex::insert(Block parent, const std::int64_t* tokens, Block block) {
  const std::uint64_t h = hash(parent, tokens);
  std::size_t i = home(h);
  for (; table_[i] != kNone; i = (i + 1) & mask_) {
    if (matches(table_[i], h, parent, tokens)) return false;
  }
  table_[i] = block;
  registered_[block] = 1;
  parent_[block] = parent;
  hash_[block] = h;
  std::copy_n(tokens, block_size_, tokens_.begin() + static_cast<std::ptrdiff_t>(block) * block_size_);
  ++size_;
  return true;
}

void PrefixIndex::erase(Block block) {
  std::size_t hole = home(hash_[block]);
  while (table_[hole] != block) hole = (hole + 1) & mask_;
  // Backward shift: pull each later entry of the probe run into the hole when the hole lies
  // between its home and where it sits, so every entry stays reachable from its home.
  for (std::size_t j = (hole + 1) & mask_; table_[j] != kNone; j = (j + 1) & mask_) {
    const std::size_t from_home = (j - home(hash_[table_[j]])) & mask_;
    if (from_home >= ((j - hole) & mask_)) {
      table_[hole] = table_[j];
      hole = j;
    }
  }
  table_[hole] = kNone;
  registered_[block] = 0;
  --size_;
}

void PrefixIndex::push_evictable(Block block) {
  lru_prev_[block] = lru_tail_;
  lru_next_[block] = kNone;
  if (lru_tail_ != kNone) lru_next_[lru_tail_] = block;
  else lru_head_ = block;
  lru_tail_ = block;
  ++num_evictable_;
}

void PrefixIndex::remove_evictable(Block block) {
  const Block prev = lru_prev_[block], next = lru_next_[block];
  if (prev != kNone) lru_next_[prev] = next;
  else lru_head_ = next;
  if (next != kNone) lru_prev_[next] = prev;
  else lru_tail_ = prev;
  --num_evictable_;
}

void PrefixIndex::clear() {
  std::fill(table_.begin(), table_.end(), kNone);
  std::fill(registered_.begin(), registered_.end(), 0);
  size_ = 0;
}

}  // namespace lockstep
