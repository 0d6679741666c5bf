#include "tensorstream/cache/block_cache.hpp"

#include <algorithm>
#include <array>
#include <condition_variable>
#include <limits>
#include <mutex>
#include <new>
#include <ostream>
#include <stdexcept>
#include <unordered_map>
#include <utility>
#include <vector>

#include "tensorstream/errors.hpp"

namespace tensorstream::cache {

std::ostream& operator<<(std::ostream& out, const BlockKey& key) {
  return out << key.source << ':' << key.block;
}

// ---- policies ----------------------------------------------------------------------------

namespace {
constexpr std::array<std::pair<Policy, std::string_view>, 4> kPolicyNames{{
    {Policy::kLru, "lru"},
    {Policy::kLfu, "lfu"},
    {Policy::kFifo, "fifo"},
    {Policy::kAuto, "auto"},
}};
}  // namespace

std::string_view policy_name(Policy policy) noexcept {
  for (const auto& [value, name] : kPolicyNames) {
    if (value == policy) return name;
  }
  return {};
}

std::optional<Policy> policy_from_name(std::string_view name) noexcept {
  for (const auto& [value, known] : kPolicyNames) {
    if (known == name) return value;
  }
  return std::nullopt;
}

Policy parse_policy(std::string_view name) {
  const auto policy = policy_from_name(name);
  TS_EXPECT(policy.has_value(), std::invalid_argument, "unknown cache policy '", name,
            "' (expected one of: lru, lfu, fifo, auto)");
  return *policy;
}

// ---- shared state ------------------------------------------------------------------------

namespace detail {

/// What kAuto remembers about a key, resident or not.
struct History {
  std::uint64_t last_start = 0;         // byte clock at the start of its last lookup
  std::uint64_t interval = 0;           // last reuse interval (valid when accesses >= 2)
  std::uint64_t previous_interval = 0;  // the one before (valid when accesses >= 3)
  std::uint64_t size = 0;               // last known size; 0 = not known yet
  std::uint32_t accesses = 0;           // saturates at 3
  bool size_pending = false;            // its last lookup added 0 to the clock (size unknown)
  bool resident = false;                // an entry in the table refers to this record
};

struct CacheEntry {
  BlockKey key;
  std::size_t size = 0;
  std::uint64_t charge = 0;  // size rounded up to the allocator's granularity
  std::byte* data = nullptr;
  std::uint32_t pins = 0;
  bool published = false;
  bool in_table = true;
  std::uint64_t last_use = 0;    // tick of the last lookup hit or the insertion
  std::uint64_t inserted = 0;    // tick of the insertion
  std::uint64_t frequency = 0;   // lookups since insertion, + 1 for the insertion
  std::uint64_t born_clock = 0;  // kAuto byte clock at insertion
  History* history = nullptr;    // kAuto only; stable (never pruned while resident)
};

class BlockCacheState {
 public:
  BlockCacheState(std::uint64_t capacity, Policy policy, std::shared_ptr<HostAllocator> allocator)
      : capacity_(capacity),
        policy_(policy),
        allocator_(std::move(allocator)),
        granularity_(std::max<std::uint64_t>(allocator_->granularity(), 1)) {}

  BlockCacheState(const BlockCacheState&) = delete;
  BlockCacheState& operator=(const BlockCacheState&) = delete;

  // Only reached when the cache and every handle are gone, so nothing is pinned any more;
  // entries still in the table (none after ~BlockCache's clear) are freed here.
  ~BlockCacheState() {
    for (auto& [key, entry] : table_) {
      if (entry->data != nullptr) allocator_->deallocate(entry->data, entry->size);
    }
  }

  std::optional<BlockHandle> lookup(const std::shared_ptr<BlockCacheState>& self, BlockKey key,
                                    std::chrono::nanoseconds max_wait);
  bool contains(BlockKey key) const;
  std::optional<BlockHandle> insert(const std::shared_ptr<BlockCacheState>& self, BlockKey key,
                                    std::size_t bytes);
  bool erase(BlockKey key);
  void clear();
  Stats stats() const;

  void publish(CacheEntry* entry);
  void release(CacheEntry* entry, bool filling) noexcept;

 private:
  using EntryPtr = std::unique_ptr<CacheEntry>;

  CacheEntry* find(BlockKey key) const {
    const auto it = table_.find(key);
    return it == table_.end() ? nullptr : it->second.get();
  }
  void pin(CacheEntry* entry) {
    if (entry->pins++ == 0) ++pinned_entries_;
  }
  void charge(std::uint64_t bytes) {
    bytes_in_use_ += bytes;
    peak_bytes_in_use_ = std::max(peak_bytes_in_use_, bytes_in_use_);
  }
  // What an entry of `bytes` bytes takes from the allocator (saturating, so a huge request
  // is simply larger than the capacity).
  [[nodiscard]] std::uint64_t charge_of(std::uint64_t bytes) const noexcept {
    const std::uint64_t remainder = bytes % granularity_;
    if (remainder == 0) return bytes;
    const std::uint64_t pad = granularity_ - remainder;
    return bytes > std::numeric_limits<std::uint64_t>::max() - pad
               ? std::numeric_limits<std::uint64_t>::max()
               : bytes + pad;
  }

  // Removes `entry` from the table. Returns it if nothing pins it (the caller frees it outside
  // the lock, then uncharges); a pinned one waits among the zombies for its last release.
  EntryPtr detach(CacheEntry* entry);
  // Frees detached entries outside the lock, then uncharges their bytes.
  void free_detached(std::vector<EntryPtr> doomed) noexcept;

  // kAuto bookkeeping (lock held).
  void record_access(BlockKey key, std::uint64_t known_size);
  History& learn_size(BlockKey key, std::uint64_t size);
  [[nodiscard]] static std::optional<std::uint64_t> interval_of(const History& history) noexcept;
  [[nodiscard]] std::uint64_t lifetime(const History& history) const noexcept;
  [[nodiscard]] bool is_dead(const CacheEntry& entry) const noexcept;
  void prune_history();

  // The unpinned entries the policy lets an insert of `key` evict, in the order it would
  // evict them (lock held; nothing is changed).
  void rank_candidates(BlockKey key, std::vector<CacheEntry*>& candidates) const;
  // Picks the unpinned entries to evict so that `bytes` more (a charge) fit; false if the
  // policy declines or not enough unpinned bytes exist (lock held; nothing is changed).
  bool choose_victims(BlockKey key, std::uint64_t bytes, std::vector<CacheEntry*>& victims);
  // Takes back the entry an insert reserved but could not give memory (lock held): unpins
  // it, removes it, uncharges `charge`. Returns what the caller destroys after the lock.
  EntryPtr undo_insert(CacheEntry* entry, std::uint64_t charge);

  const std::uint64_t capacity_;
  const Policy policy_;
  const std::shared_ptr<HostAllocator> allocator_;
  const std::uint64_t granularity_;  // allocator_->granularity(), at least 1

  mutable std::mutex mutex_;
  std::condition_variable published_;  // notified on publish, abandon and erase

  std::unordered_map<BlockKey, EntryPtr, BlockKeyHash> table_;
  std::unordered_map<CacheEntry*, EntryPtr> zombies_;  // erased but still pinned
  std::unordered_map<BlockKey, History, BlockKeyHash> history_;
  std::size_t history_limit_ = kHistoryFloor;
  static constexpr std::size_t kHistoryFloor = 4096;

  std::uint64_t clock_ = 0;  // kAuto: bytes looked up so far
  std::uint64_t tick_ = 0;   // recency / insertion order for all policies

  std::uint64_t bytes_in_use_ = 0;
  std::uint64_t peak_bytes_in_use_ = 0;
  std::uint64_t pinned_entries_ = 0;
  std::uint64_t hits_ = 0;
  std::uint64_t misses_ = 0;
  std::uint64_t insertions_ = 0;
  std::uint64_t rejections_ = 0;
  std::uint64_t conflicts_ = 0;
  std::uint64_t evictions_ = 0;
  std::uint64_t abandoned_ = 0;
  std::uint64_t fragmented_ = 0;
};

BlockCacheState::EntryPtr BlockCacheState::detach(CacheEntry* entry) {
  auto node = table_.extract(entry->key);
  EntryPtr owned = std::move(node.mapped());
  entry->in_table = false;
  if (entry->history != nullptr) entry->history->resident = false;
  entry->history = nullptr;  // may be pruned from now on
  if (entry->pins > 0) {
    zombies_.emplace(entry, std::move(owned));
    return nullptr;
  }
  return owned;
}

void BlockCacheState::free_detached(std::vector<EntryPtr> doomed) noexcept {
  std::uint64_t freed = 0;
  for (auto& entry : doomed) {
    if (entry == nullptr) continue;
    if (entry->data != nullptr) allocator_->deallocate(entry->data, entry->size);
    freed += entry->charge;
  }
  if (freed == 0) return;
  // Charged until the allocator has the memory back, so its outstanding bytes stay in budget.
  const std::lock_guard lock(mutex_);
  bytes_in_use_ -= freed;
}

// ---- kAuto -------------------------------------------------------------------------------

void BlockCacheState::record_access(BlockKey key, std::uint64_t known_size) {
  History& history = history_[key];
  if (history.accesses > 0) {
    history.previous_interval = history.interval;
    history.interval = clock_ - history.last_start;
  }
  history.accesses = std::min<std::uint32_t>(history.accesses + 1, 3);
  history.last_start = clock_;
  if (known_size != 0) history.size = known_size;
  // A first miss does not know the block's size; insert() advances the clock for it.
  history.size_pending = history.size == 0;
  clock_ += history.size;
  if (history_.size() > history_limit_) prune_history();
}

History& BlockCacheState::learn_size(BlockKey key, std::uint64_t size) {
  const auto [it, fresh] = history_.try_emplace(key);
  History& history = it->second;
  if (fresh) history.last_start = clock_;  // inserted without a lookup (a prefetch)
  history.size = size;
  if (history.size_pending) {
    clock_ += size;
    history.size_pending = false;
  }
  return history;
}

std::optional<std::uint64_t> BlockCacheState::interval_of(const History& history) noexcept {
  if (history.accesses >= 3) return std::max(history.interval, history.previous_interval);
  if (history.accesses == 2) return history.interval;
  return std::nullopt;
}

// How many bytes of lookups a key may stay silent before it counts as dead:
// max(2 x interval, capacity), or capacity if it was never reused.
std::uint64_t BlockCacheState::lifetime(const History& history) const noexcept {
  std::uint64_t limit = capacity_;
  if (const auto interval = interval_of(history)) {
    const std::uint64_t twice = *interval > std::numeric_limits<std::uint64_t>::max() / 2
                                    ? std::numeric_limits<std::uint64_t>::max()
                                    : 2 * *interval;
    limit = std::max(limit, twice);
  }
  return limit;
}

bool BlockCacheState::is_dead(const CacheEntry& entry) const noexcept {
  const History& history = *entry.history;
  const std::uint64_t since = std::max(history.last_start, entry.born_clock);
  return clock_ - since > lifetime(history);
}

void BlockCacheState::prune_history() {
  // Forget non-resident keys that have been silent for longer than would keep them alive;
  // their next lookup will count as a first one. Amortised: the limit doubles with the size.
  for (auto it = history_.begin(); it != history_.end();) {
    const History& history = it->second;
    if (!history.resident && !history.size_pending &&
        clock_ - history.last_start > lifetime(history)) {
      it = history_.erase(it);
    } else {
      ++it;
    }
  }
  history_limit_ = std::max(kHistoryFloor, 2 * history_.size());
}

// ---- victim selection --------------------------------------------------------------------

void BlockCacheState::rank_candidates(BlockKey key, std::vector<CacheEntry*>& candidates) const {
  candidates.clear();
  candidates.reserve(table_.size());
  for (const auto& [entry_key, entry] : table_) {
    if (entry->pins == 0) candidates.push_back(entry.get());
  }

  switch (policy_) {
    case Policy::kLru:
      std::sort(candidates.begin(), candidates.end(),
                [](const CacheEntry* a, const CacheEntry* b) { return a->last_use < b->last_use; });
      break;
    case Policy::kFifo:
      std::sort(candidates.begin(), candidates.end(),
                [](const CacheEntry* a, const CacheEntry* b) { return a->inserted < b->inserted; });
      break;
    case Policy::kLfu:
      std::sort(candidates.begin(), candidates.end(), [](const CacheEntry* a, const CacheEntry* b) {
        if (a->frequency != b->frequency) return a->frequency < b->frequency;
        return a->last_use < b->last_use;
      });
      break;
    case Policy::kAuto: {
      const auto newcomer = history_.find(key);
      const auto interval =
          newcomer == history_.end() ? std::nullopt : interval_of(newcomer->second);
      const bool would_hit_under_lru = interval.has_value() && *interval <= capacity_;
      std::vector<std::pair<bool, CacheEntry*>> ranked;  // (dead, entry)
      ranked.reserve(candidates.size());
      for (CacheEntry* entry : candidates) {
        const bool dead = is_dead(*entry);
        // A block with no evidence of fitting may only take the room of the dead.
        if (dead || would_hit_under_lru) ranked.emplace_back(dead, entry);
      }
      std::sort(ranked.begin(), ranked.end(), [](const auto& a, const auto& b) {
        if (a.first != b.first) return a.first;  // dead first
        return a.second->last_use < b.second->last_use;
      });
      candidates.clear();
      for (const auto& [dead, entry] : ranked) candidates.push_back(entry);
      break;
    }
  }
}

bool BlockCacheState::choose_victims(BlockKey key, std::uint64_t bytes,
                                     std::vector<CacheEntry*>& victims) {
  victims.clear();
  if (bytes > capacity_) return false;
  const std::uint64_t free_bytes = capacity_ - bytes_in_use_;
  if (bytes <= free_bytes) return true;
  const std::uint64_t needed = bytes - free_bytes;

  std::vector<CacheEntry*> candidates;
  rank_candidates(key, candidates);
  std::uint64_t freed = 0;
  for (CacheEntry* entry : candidates) {
    if (freed >= needed) break;
    victims.push_back(entry);
    freed += entry->charge;
  }
  if (freed < needed) {
    victims.clear();
    return false;
  }
  return true;
}

BlockCacheState::EntryPtr BlockCacheState::undo_insert(CacheEntry* entry, std::uint64_t charge) {
  if (--entry->pins == 0) --pinned_entries_;
  EntryPtr failed;
  if (entry->in_table) {
    failed = detach(entry);
  } else {
    auto node = zombies_.extract(entry);
    failed = std::move(node.mapped());
  }
  bytes_in_use_ -= charge;
  return failed;
}

// ---- operations --------------------------------------------------------------------------

std::optional<BlockHandle> BlockCacheState::lookup(const std::shared_ptr<BlockCacheState>& self,
                                                   BlockKey key,
                                                   std::chrono::nanoseconds max_wait) {
  std::unique_lock lock(mutex_);
  CacheEntry* entry = find(key);
  if (policy_ == Policy::kAuto) record_access(key, entry != nullptr ? entry->size : 0);
  if (entry != nullptr && !entry->published && max_wait > std::chrono::nanoseconds::zero()) {
    // Saturate: steady_clock::now() + nanoseconds::max() would overflow.
    const auto longest =
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::hours(24 * 365));
    const auto deadline = std::chrono::steady_clock::now() + std::min(max_wait, longest);
    published_.wait_until(lock, deadline, [&] {
      entry = find(key);
      return entry == nullptr || entry->published;
    });
    entry = find(key);
  }
  if (entry == nullptr || !entry->published) {
    ++misses_;
    return std::nullopt;
  }
  ++hits_;
  pin(entry);
  entry->last_use = ++tick_;
  ++entry->frequency;
  return BlockHandle(self, entry, /*filling=*/false);
}

bool BlockCacheState::contains(BlockKey key) const {
  const std::lock_guard lock(mutex_);
  const CacheEntry* entry = find(key);
  return entry != nullptr && entry->published;
}

std::optional<BlockHandle> BlockCacheState::insert(const std::shared_ptr<BlockCacheState>& self,
                                                   BlockKey key, std::size_t bytes) {
  TS_EXPECT(bytes > 0, std::invalid_argument, "BlockCache::insert: block ", key, " has size 0");
  const std::uint64_t cost = charge_of(bytes);
  std::vector<EntryPtr> evicted;
  CacheEntry* entry = nullptr;
  std::uint64_t victim_bytes = 0;
  {
    const std::lock_guard lock(mutex_);
    History* history = policy_ == Policy::kAuto ? &learn_size(key, bytes) : nullptr;
    if (table_.contains(key)) {
      ++conflicts_;
      return std::nullopt;
    }
    std::vector<CacheEntry*> victims;
    if (!choose_victims(key, cost, victims)) {
      ++rejections_;
      return std::nullopt;
    }
    auto owned = std::make_unique<CacheEntry>();
    entry = owned.get();
    entry->key = key;
    entry->size = bytes;
    entry->charge = cost;
    entry->last_use = entry->inserted = ++tick_;
    entry->frequency = 1;
    entry->born_clock = clock_;
    entry->history = history;
    if (history != nullptr) history->resident = true;

    evicted.reserve(victims.size());
    for (CacheEntry* victim : victims) {
      victim_bytes += victim->charge;
      evicted.push_back(detach(victim));  // unpinned by choice: never a zombie
    }
    evictions_ += victims.size();
    pin(entry);
    table_.emplace(key, std::move(owned));
    // The victims stay charged until freed and the new entry is charged from now on, but the
    // new buffer is only allocated after the victims are freed: max(victims, new) covers both
    // moments and fits (victims + rest <= capacity before, new + rest <= capacity by choice).
    bytes_in_use_ -= victim_bytes;
    charge(std::max(victim_bytes, cost));
  }

  for (auto& victim : evicted) allocator_->deallocate(victim->data, victim->size);
  evicted.clear();
  if (victim_bytes > cost) {
    // The victims are back with the allocator: from now on only the new entry is charged.
    const std::lock_guard lock(mutex_);
    bytes_in_use_ -= victim_bytes - cost;
  }

  void* memory = nullptr;
  bool fragmented = false;
  try {
    while ((memory = allocator_->try_allocate(bytes)) == nullptr) {
      // The bytes are free but not in one piece (a sub-allocating allocator): evict one more
      // entry, as the policy would, until the entry fits or nothing more may go.
      fragmented = true;
      std::vector<EntryPtr> more;
      {
        const std::lock_guard lock(mutex_);
        if (!entry->in_table) break;  // erased meanwhile: nobody could see it; decline
        std::vector<CacheEntry*> candidates;
        rank_candidates(key, candidates);
        if (candidates.empty()) break;
        ++evictions_;
        more.push_back(detach(candidates.front()));
      }
      free_detached(std::move(more));
    }
  } catch (...) {
    EntryPtr failed;
    {
      const std::lock_guard lock(mutex_);
      failed = undo_insert(entry, cost);
    }
    published_.notify_all();  // waiters on this key: the fill will never come
    throw;
  }
  if (memory == nullptr) {
    EntryPtr declined;
    {
      const std::lock_guard lock(mutex_);
      declined = undo_insert(entry, cost);
      ++fragmented_;
      ++rejections_;
    }
    published_.notify_all();
    return std::nullopt;
  }

  const std::lock_guard lock(mutex_);
  if (fragmented) ++fragmented_;
  entry->data = static_cast<std::byte*>(memory);
  ++insertions_;
  return BlockHandle(self, entry, /*filling=*/true);
}

bool BlockCacheState::erase(BlockKey key) {
  std::vector<EntryPtr> doomed;
  {
    const std::lock_guard lock(mutex_);
    CacheEntry* entry = find(key);
    if (entry == nullptr) return false;
    doomed.push_back(detach(entry));
  }
  published_.notify_all();  // a waiter on an erased fill stops waiting
  free_detached(std::move(doomed));
  return true;
}

void BlockCacheState::clear() {
  std::vector<EntryPtr> doomed;
  {
    const std::lock_guard lock(mutex_);
    std::vector<CacheEntry*> all;
    all.reserve(table_.size());
    for (const auto& [key, entry] : table_) all.push_back(entry.get());
    doomed.reserve(all.size());
    for (CacheEntry* entry : all) doomed.push_back(detach(entry));
  }
  published_.notify_all();
  free_detached(std::move(doomed));
}

Stats BlockCacheState::stats() const {
  const std::lock_guard lock(mutex_);
  Stats stats;
  stats.capacity = capacity_;
  stats.bytes_in_use = bytes_in_use_;
  stats.peak_bytes_in_use = peak_bytes_in_use_;
  stats.entries = table_.size();
  stats.pinned_entries = pinned_entries_;
  stats.hits = hits_;
  stats.misses = misses_;
  stats.insertions = insertions_;
  stats.rejections = rejections_;
  stats.conflicts = conflicts_;
  stats.evictions = evictions_;
  stats.abandoned = abandoned_;
  stats.fragmented = fragmented_;
  return stats;
}

void BlockCacheState::publish(CacheEntry* entry) {
  {
    const std::lock_guard lock(mutex_);
    entry->published = true;
  }
  published_.notify_all();
}

void BlockCacheState::release(CacheEntry* entry, bool filling) noexcept {
  std::vector<EntryPtr> doomed;
  bool abandoned = false;
  {
    const std::lock_guard lock(mutex_);
    if (--entry->pins == 0) --pinned_entries_;
    if (filling && !entry->published) {
      // The filler gave up: the bytes are incomplete, nobody may ever see them.
      abandoned = true;
      ++abandoned_;
      if (entry->in_table) doomed.push_back(detach(entry));
    }
    if (entry->pins == 0 && !entry->in_table && doomed.empty()) {
      auto node = zombies_.extract(entry);
      if (!node.empty()) doomed.push_back(std::move(node.mapped()));
    }
  }
  if (abandoned) published_.notify_all();
  free_detached(std::move(doomed));
}

}  // namespace detail

// ---- BlockHandle -------------------------------------------------------------------------

BlockHandle::BlockHandle(std::shared_ptr<detail::BlockCacheState> state, detail::CacheEntry* entry,
                         bool filling) noexcept
    : state_(std::move(state)),
      entry_(entry),
      key_(entry->key),
      data_(entry->data),
      size_(entry->size),
      filling_(filling) {}

BlockHandle::BlockHandle(BlockHandle&& other) noexcept
    : state_(std::move(other.state_)),
      entry_(std::exchange(other.entry_, nullptr)),
      key_(other.key_),
      data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      filling_(std::exchange(other.filling_, false)) {}

BlockHandle& BlockHandle::operator=(BlockHandle&& other) noexcept {
  if (this != &other) {
    reset();
    state_ = std::move(other.state_);
    entry_ = std::exchange(other.entry_, nullptr);
    key_ = other.key_;
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    filling_ = std::exchange(other.filling_, false);
  }
  return *this;
}

BlockHandle::~BlockHandle() { reset(); }

std::byte* BlockHandle::mutable_data() const {
  if (!filling_) {
    throw std::logic_error(tensorstream::detail::concat(
        "BlockHandle::mutable_data: block ", key_,
        valid() ? " is published; its bytes are read-only" : ": the handle is empty"));
  }
  return data_;
}

void BlockHandle::publish() {
  if (!filling_) {
    throw std::logic_error(tensorstream::detail::concat(
        "BlockHandle::publish: block ", key_,
        valid() ? " was not obtained from insert() or is already published"
                : ": the handle is empty"));
  }
  state_->publish(entry_);
  filling_ = false;
}

void BlockHandle::reset() noexcept {
  if (entry_ == nullptr) return;
  state_->release(std::exchange(entry_, nullptr), std::exchange(filling_, false));
  state_.reset();
  data_ = nullptr;
  size_ = 0;
}

// ---- BlockCache --------------------------------------------------------------------------

BlockCache::BlockCache(std::uint64_t capacity_bytes, Policy policy,
                       std::shared_ptr<HostAllocator> allocator)
    : capacity_(capacity_bytes), policy_(policy) {
  TS_EXPECT(!policy_name(policy).empty(), std::invalid_argument,
            "BlockCache: invalid policy value ", static_cast<int>(policy));
  if (allocator == nullptr) allocator = default_host_allocator();
  state_ = std::make_shared<detail::BlockCacheState>(capacity_bytes, policy, std::move(allocator));
}

BlockCache::~BlockCache() { state_->clear(); }

std::optional<BlockHandle> BlockCache::lookup(BlockKey key) {
  return state_->lookup(state_, key, std::chrono::nanoseconds::zero());
}

std::optional<BlockHandle> BlockCache::lookup(BlockKey key, std::chrono::nanoseconds max_wait) {
  return state_->lookup(state_, key, max_wait);
}

bool BlockCache::contains(BlockKey key) const { return state_->contains(key); }

std::optional<BlockHandle> BlockCache::insert(BlockKey key, std::size_t bytes) {
  return state_->insert(state_, key, bytes);
}

bool BlockCache::erase(BlockKey key) { return state_->erase(key); }

void BlockCache::clear() { state_->clear(); }

Stats BlockCache::stats() const { return state_->stats(); }

}  // namespace tensorstream::cache
