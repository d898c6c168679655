#include "block_allocator.h"

#include <algorithm>
#include <limits>

namespace lockstep {

namespace {

// Block ids and depths are stored as int32 to keep the per-block arrays small, and
// capping block_size too keeps num_blocks * block_size (the most tokens a sequence can
// hold) far below int64 overflow.
constexpr std::int64_t kMaxDimension = std::numeric_limits<std::int32_t>::max();

void check_dimension(const char* name, std::int64_t value) {
  if (value < 1 || value > kMaxDimension) {
    throw std::invalid_argument(std::string(name) + " must be in [1, " +
                                std::to_string(kMaxDimension) + "], got " +
                                std::to_string(value));
  }
}

void check_count(const char* name, std::int64_t value) {
  if (value < 0) {
    throw std::invalid_argument(std::string(name) + " must be >= 0, got " +
                                std::to_string(value));
  }
}

}  // namespace

BlockAllocator::BlockAllocator(std::int64_t num_blocks, std::int64_t block_size,
                               bool prefix_cache)
    : num_blocks_(num_blocks), block_size_(block_size), prefix_cache_(prefix_cache) {
  check_dimension("num_blocks", num_blocks);
  check_dimension("block_size", block_size);
  if (prefix_cache) index_ = PrefixIndex(num_blocks, block_size);
  const auto n = static_cast<std::size_t>(num_blocks);
  prev_.assign(n, kNone);
  jump_.assign(n, kNone);
  depth_.assign(n, 0);
  node_refs_.assign(n, 0);
  // Highest id at the bottom so that pops from the back give 0, 1, 2, ...
  free_.reserve(n);
  for (std::int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<Block>(b));
}

BlockAllocator::Sequence& BlockAllocator::lookup(Handle h) {
  auto it = seqs_.find(h);
  if (it == seqs_.end()) {
    throw std::invalid_argument("h: unknown sequence handle " + std::to_string(h));
  }
  return it->second;
}

const BlockAllocator::Sequence& BlockAllocator::lookup(Handle h) const {
  return const_cast<BlockAllocator*>(this)->lookup(h);
}

std::int64_t BlockAllocator::blocks_for(std::int64_t tokens) const {
  return tokens == 0 ? 0 : (tokens - 1) / block_size_ + 1;
}

std::int64_t BlockAllocator::needed(const Sequence& s, std::int64_t n) const {
  if (n == 0) return 0;
  const std::int64_t used = s.tokens % block_size_;
  const std::int64_t room = used == 0 ? 0 : block_size_ - used;
  // Written as (n - room - 1) / bs + 1 rather than a ceil of (tokens + n) so that a huge n
  // cannot overflow; it just asks for more blocks than the arena has.
  const std::int64_t fresh = n <= room ? 0 : (n - room - 1) / block_size_ + 1;
  return fresh + (needs_copy(s) ? 1 : 0);
}

bool BlockAllocator::needs_copy(const Sequence& s) const {
  // The next token lands in the partial tail block; if another sequence can see that
  // block, or a future request can adopt it, writing it in place would change their KV.
  return s.tokens % block_size_ != 0 && (node_refs_[s.tail] > 1 || index_.contains(s.tail));
}

BlockAllocator::Block BlockAllocator::make_node(Block prev) {
  Block b;
  if (!free_.empty()) {
    b = free_.back();
    free_.pop_back();
  } else {
    // Its KV is given up: the oldest evictable node has no children (see the header), so
    // nothing else names it, and it leaves the index before it is reused.
    b = index_.oldest_evictable();
    index_.remove_evictable(b);
    index_.erase(b);
  }
  prev_[b] = prev;
  if (prev == kNone) {
    depth_[b] = 0;
    jump_[b] = b;
  } else {
    depth_[b] = depth_[prev] + 1;
    // Skew-binary jumps: if prev's jump and its jump's jump span equal distances, skip
    // both; otherwise jump one step. This keeps every ancestor O(log depth) hops away.
    const Block j = jump_[prev];
    const Block jj = jump_[j];
    jump_[b] = (depth_[prev] - depth_[j] == depth_[j] - depth_[jj]) ? jj : prev;
  }
  node_refs_[b] = 1;
  return b;
}

void BlockAllocator::hold(Block node) {
  // A node going from zero to one reference was evictable; live again, it holds its
  // predecessor again, which may have been evictable too.
  while (node != kNone && node_refs_[node]++ == 0) {
    index_.remove_evictable(node);
    node = prev_[node];
  }
}

void BlockAllocator::release(Block node) {
  // A node that reaches zero references also drops its hold on its predecessor, so a
  // chain only this sequence used unwinds here, tail first.
  while (node != kNone && --node_refs_[node] == 0) {
    if (index_.contains(node)) {
      index_.push_evictable(node);
    } else {
      free_.push_back(node);
    }
    node = prev_[node];
  }
}

BlockAllocator::Block BlockAllocator::ancestor_at(Block node, std::int32_t depth) const {
  while (depth_[node] > depth) {
    const Block j = jump_[node];
    node = depth_[j] >= depth ? j : prev_[node];
  }
  return node;
}

BlockAllocator::Handle BlockAllocator::new_sequence() {
  const Handle h = next_handle_++;
  seqs_.emplace(h, Sequence{});
  return h;
}

std::int64_t BlockAllocator::blocks_needed(Handle h, std::int64_t n) const {
  const Sequence& s = lookup(h);
  check_count("n", n);
  return needed(s, n);
}

std::vector<BlockAllocator::Copy> BlockAllocator::append(Handle h, std::int64_t n) {
  Sequence& s = lookup(h);
  check_count("n", n);
  const std::int64_t need = needed(s, n);
  // Checked up front so that a failure leaves every table, count and the free list as
  // they were: the scheduler can then preempt something and retry.
  if (need > num_free_blocks()) {
    throw ArenaExhausted("KV arena exhausted: need " + std::to_string(need) + " blocks, " +
                         std::to_string(num_free_blocks()) + " free of " +
                         std::to_string(num_blocks_));
  }
  std::vector<Copy> copies;
  if (n == 0) return copies;

  std::int64_t fresh = need;
  Block copied = kNone;
  if (needs_copy(s)) {
    // Copy-on-write: a private node in the tail's place, after the tail's predecessor.
    copied = s.tail;
    const Block prev = prev_[copied];
    const Block copy = make_node(prev);
    hold(prev);  // the copy is a new child of prev
    copies.emplace_back(copied, copy);
    s.tail = copy;
    --fresh;
  }
  for (; fresh > 0; --fresh) {
    // The sequence's reference to its old tail becomes the new node's prev link, so the
    // old tail's count is unchanged.
    s.tail = make_node(s.tail);
  }
  // Let go of the copied block last: if it is cached and now unheld it becomes evictable,
  // and this append must not hand it out again before the caller has copied it.
  release(copied);
  s.tokens += n;
  return copies;
}

std::int64_t BlockAllocator::append_one_each(const Handle* handles, std::int64_t n,
                                             std::vector<Copy>& copies) {
  for (std::int64_t i = 0; i < n; ++i) lookup(handles[i]);  // an unknown handle throws before any change
  for (std::int64_t i = 0; i < n; ++i) {
    const Sequence& s = lookup(handles[i]);
    if (needed(s, 1) > num_free_blocks()) return i;
    for (const Copy& copy : append(handles[i], 1)) copies.push_back(copy);
  }
  return n;
}

BlockAllocator::Handle BlockAllocator::fork(Handle h) {
  const Sequence parent = lookup(h);
  hold(parent.tail);
  const Handle child = next_handle_++;
  seqs_.emplace(child, parent);
  return child;
}

void BlockAllocator::truncate(Handle h, std::int64_t n_tokens) {
  Sequence& s = lookup(h);
  check_count("n_tokens", n_tokens);
  if (n_tokens > s.tokens) {
    throw std::invalid_argument("n_tokens=" + std::to_string(n_tokens) +
                                " is beyond the sequence length " + std::to_string(s.tokens));
  }
  for (std::int64_t drop = blocks_for(s.tokens) - blocks_for(n_tokens); drop > 0; --drop) {
    // Take a direct hold on the predecessor before letting go of the tail, so release()
    // frees at most the tail itself and blocks leave in tail-first order.
    const Block old = s.tail;
    s.tail = prev_[old];
    hold(s.tail);
    release(old);
  }
  s.tokens = n_tokens;
  s.published = std::min(s.published, n_tokens / block_size_);
}

void BlockAllocator::free(Handle h) {
  const Sequence& s = lookup(h);
  release(s.tail);
  seqs_.erase(h);
}

std::pair<BlockAllocator::Handle, std::int64_t> BlockAllocator::new_sequence_cached(
    const std::int64_t* tokens, std::int64_t n) {
  check_count("n", n);
  const Handle h = new_sequence();
  if (!prefix_cache_ || n == 0) return {h, 0};
  const std::int64_t most = (n - 1) / block_size_;
  Block tail = kNone;
  std::int64_t matched = 0;
  for (; matched < most; ++matched) {
    const Block next = index_.find(tail, tokens + matched * block_size_);
    if (next == kNone) break;
    tail = next;
  }
  hold(tail);
  Sequence& s = seqs_[h];
  s.tail = tail;
  s.tokens = matched * block_size_;
  s.published = matched;
  prefix_queries_ += most * block_size_;
  prefix_hits_ += s.tokens;
  return {h, s.tokens};
}

void BlockAllocator::publish(Handle h, const std::int64_t* tokens, std::int64_t n,
                             std::int64_t num_computed, std::int64_t first) {
  Sequence& s = lookup(h);
  check_count("num_computed", num_computed);
  check_count("first", first);
  if (num_computed > s.tokens || num_computed > first + n) {
    throw std::invalid_argument("num_computed=" + std::to_string(num_computed) +
                                " is beyond the sequence length " + std::to_string(s.tokens) +
                                " or the " + std::to_string(n) + " tokens given from token " +
                                std::to_string(first));
  }
  const std::int64_t full = num_computed / block_size_;
  if (!prefix_cache_ || full <= s.published) return;
  // The nodes not yet looked at, read backwards from the tail, then registered root first:
  // a block is only registered once its parent is.
  scratch_.clear();
  Block node = ancestor_at(s.tail, static_cast<std::int32_t>(full - 1));
  for (std::int64_t d = full - 1; d >= s.published; --d, node = prev_[node]) scratch_.push_back(node);
  for (auto it = scratch_.rbegin(); it != scratch_.rend(); ++it) {
    const Block parent = prev_[*it];
    const std::int64_t at = depth_[*it] * block_size_ - first;  // its first token in tokens[]
    if (at < 0 || index_.contains(*it) || (parent != kNone && !index_.contains(parent))) continue;
    index_.insert(parent, tokens + at, *it);  // a taken key: not shared
  }
  s.published = full;
}

void BlockAllocator::clear_prefix_cache() {
  // Least recently evictable first, so the most recent is the first handed out again.
  for (Block b = index_.oldest_evictable(); b != kNone; b = index_.oldest_evictable()) {
    index_.remove_evictable(b);
    free_.push_back(b);
  }
  index_.clear();
  for (auto& entry : seqs_) entry.second.published = 0;
}

std::int64_t BlockAllocator::num_tokens(Handle h) const { return lookup(h).tokens; }

std::vector<BlockAllocator::Block> BlockAllocator::block_table(Handle h) const {
  const std::int64_t tokens = num_tokens(h);
  std::vector<Block> table(static_cast<std::size_t>(blocks_for(tokens)));
  write_block_table(h, tokens, table.data());
  return table;
}

void BlockAllocator::write_block_table(Handle h, std::int64_t n_tokens, Block* out) const {
  const Sequence& s = lookup(h);
  if (n_tokens < 0 || n_tokens > s.tokens) {
    throw std::invalid_argument("n_tokens=" + std::to_string(n_tokens) +
                                " is outside the sequence length [0, " +
                                std::to_string(s.tokens) + "]");
  }
  const std::int64_t n = blocks_for(n_tokens);
  if (n == 0) return;
  Block node = ancestor_at(s.tail, static_cast<std::int32_t>(n - 1));
  for (std::int64_t i = n - 1; i >= 0; --i, node = prev_[node]) out[i] = node;
}

std::int64_t BlockAllocator::refcount(std::int64_t block) const {
  if (block < 0 || block >= num_blocks_) {
    throw std::invalid_argument("block must be in [0, " + std::to_string(num_blocks_) +
                                "), got " + std::to_string(block));
  }
  const auto b = static_cast<Block>(block);
  if (node_refs_[b] == 0) return 0;
  // A sequence holds b exactly when its chain passes through b, i.e. when its ancestor at
  // b's depth is b itself.
  const std::int32_t depth = depth_[b];
  std::int64_t count = 0;
  for (const auto& entry : seqs_) {
    const Block tail = entry.second.tail;
    if (tail != kNone && depth_[tail] >= depth && ancestor_at(tail, depth) == b) ++count;
  }
  return count;
}

}  // namespace lockstep
