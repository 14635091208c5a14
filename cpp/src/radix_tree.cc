#include "hicache/radix_tree.h"

#include <algorithm>
#include <sstream>
#include <stdexcept>

namespace hicache {

namespace {

// splitmix64 finaliser: a cheap, well-mixed 64-bit hash step.
inline uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// The plan of a transfer over `deepest_first` (a path read bottom-up), root-first, with the slots
// of one tier of each node.
template <typename NodePtr>
TransferPlan root_first_plan(const std::vector<NodePtr>& deepest_first,
                             std::vector<SlotIndex> ComponentData::*tier) {
  TransferPlan plan;
  for (auto it = deepest_first.rbegin(); it != deepest_first.rend(); ++it) {
    const std::vector<SlotIndex>& slots = (*it)->full().*tier;
    plan.nodes.push_back((*it)->id);
    plan.lengths.push_back((*it)->num_tokens());
    plan.indices.insert(plan.indices.end(), slots.begin(), slots.end());
  }
  return plan;
}

// Every slot of one tier held by the tree under `root` (order unspecified).
std::vector<SlotIndex> tier_slots(const Node* root, std::vector<SlotIndex> ComponentData::*tier,
                                  int64_t expected) {
  std::vector<SlotIndex> out;
  out.reserve(static_cast<size_t>(expected));
  std::vector<const Node*> stack{root};
  while (!stack.empty()) {
    const Node* n = stack.back();
    stack.pop_back();
    const std::vector<SlotIndex>& slots = n->full().*tier;
    out.insert(out.end(), slots.begin(), slots.end());
    for (const Node* c = n->first_child; c != nullptr; c = c->next_sibling) stack.push_back(c);
  }
  return out;
}

std::string describe(const char* caller, NodeId id, const std::string& what) {
  std::ostringstream os;
  os << caller << ": node " << id << ": " << what;
  return os.str();
}

}  // namespace

RadixTree::RadixTree(int64_t page_size, int64_t num_device_slots, int64_t num_host_slots,
                     bool mamba, int64_t num_mamba_slots, int64_t num_mamba_host_slots,
                     int64_t sliding_window_size, int64_t num_swa_host_slots)
    : page_size_(page_size),
      num_device_slots_(num_device_slots),
      num_host_slots_(num_host_slots),
      mamba_(mamba),
      num_mamba_slots_(num_mamba_slots),
      num_mamba_host_slots_(num_mamba_host_slots),
      swa_window_(sliding_window_size),
      num_swa_host_slots_(num_swa_host_slots),
      root_(new Node()) {
  if (page_size < 1) {
    throw std::invalid_argument("RadixTree: page_size must be >= 1, got " +
                                std::to_string(page_size));
  }
  if (num_mamba_slots < 0 || num_mamba_host_slots < 0) {
    throw std::invalid_argument(
        "RadixTree: num_mamba_slots and num_mamba_host_slots must be >= 0 (0 = unchecked), got " +
        std::to_string(num_mamba_slots) + " and " + std::to_string(num_mamba_host_slots));
  }
  if (num_device_slots < 0 || num_host_slots < 0) {
    throw std::invalid_argument("RadixTree: num_device_slots and num_host_slots must be >= 0 "
                                "(0 = unchecked), got " + std::to_string(num_device_slots) + " and " +
                                std::to_string(num_host_slots));
  }
  if (sliding_window_size < 0 || num_swa_host_slots < 0) {
    throw std::invalid_argument(
        "RadixTree: sliding_window_size and num_swa_host_slots must be >= 0 (0 = no SWA component / "
        "unchecked), got " + std::to_string(sliding_window_size) + " and " +
        std::to_string(num_swa_host_slots));
  }
  root_->id = kRootId;
  root_->full().has_value = true;  // the root holds the empty prefix on every tier
  namespace_names_.emplace_back();
}

RadixTree::~RadixTree() = default;

// ---------------------------------------------------------------------------------------------
// Helpers

Node* RadixTree::node_by_id(NodeId id, const char* caller) const {
  if (id == kRootId) return root_.get();
  auto it = nodes_.find(id);
  if (it == nodes_.end()) {
    throw std::out_of_range(std::string(caller) + ": unknown node id " + std::to_string(id) +
                            " (evicted, or never existed)");
  }
  return it->second.get();
}

int32_t RadixTree::namespace_id(std::string_view extra_key, bool create) {
  if (extra_key.empty()) return 0;
  auto it = namespaces_.find(std::string(extra_key));
  if (it != namespaces_.end()) return it->second;
  if (!create) return -1;
  const auto id = static_cast<int32_t>(namespace_names_.size());
  namespace_names_.emplace_back(extra_key);
  namespaces_.emplace(std::string(extra_key), id);
  return id;
}

uint64_t RadixTree::child_hash(NodeId parent, int32_t ns, const Token* page) const {
  uint64_t h = mix64(static_cast<uint64_t>(parent) * 0x100000001b3ULL ^
                     (static_cast<uint64_t>(static_cast<uint32_t>(ns)) << 32));
  for (int64_t i = 0; i < page_size_; ++i) {
    h = (h ^ static_cast<uint32_t>(page[i])) * 0x100000001b3ULL;
  }
  return mix64(h);
}

Node* RadixTree::find_child(Node* parent, int32_t ns, const Token* page) const {
  if (parent->num_children == 0) return nullptr;
  auto it = child_index_.find(child_hash(parent->id, ns, page));
  if (it == child_index_.end()) return nullptr;
  for (Node* c = it->second; c != nullptr; c = c->hash_next) {
    if (c->parent == parent && c->ns == ns && std::equal(page, page + page_size_, c->key.data())) {
      return c;
    }
  }
  return nullptr;
}

void RadixTree::index_child(Node* parent, Node* child) {
  auto [it, inserted] = child_index_.try_emplace(child_hash(parent->id, child->ns, child->key.data()),
                                                 child);
  child->hash_next = inserted ? nullptr : it->second;
  it->second = child;
}

void RadixTree::unindex_child(Node* parent, Node* child) {
  auto it = child_index_.find(child_hash(parent->id, child->ns, child->key.data()));
  if (it == child_index_.end()) {
    throw std::logic_error(describe("unindex_child", child->id, "missing from the child index"));
  }
  Node** link = &it->second;
  while (*link != nullptr && *link != child) link = &(*link)->hash_next;
  if (*link == nullptr) {
    throw std::logic_error(describe("unindex_child", child->id, "missing from its hash chain"));
  }
  *link = child->hash_next;
  child->hash_next = nullptr;
  if (it->second == nullptr) child_index_.erase(it);
}

void RadixTree::link_child(Node* parent, Node* child) {
  child->parent = parent;
  child->prev_sibling = nullptr;
  child->next_sibling = parent->first_child;
  if (parent->first_child != nullptr) parent->first_child->prev_sibling = child;
  parent->first_child = child;
  ++parent->num_children;
}

void RadixTree::unlink_child(Node* parent, Node* child) {
  if (child->prev_sibling != nullptr) {
    child->prev_sibling->next_sibling = child->next_sibling;
  } else {
    parent->first_child = child->next_sibling;
  }
  if (child->next_sibling != nullptr) child->next_sibling->prev_sibling = child->prev_sibling;
  child->prev_sibling = child->next_sibling = nullptr;
  --parent->num_children;
}

size_t RadixTree::common_pages_len(const Node* node, const Token* key, size_t len) const {
  const size_t n = std::min(node->key.size(), len);
  const Token* a = node->key.data();
  const size_t same = static_cast<size_t>(std::mismatch(a, a + n, key).first - a);
  return same - same % static_cast<size_t>(page_size_);
}

// Splits `node` at prefix_len (a page multiple, 0 < prefix_len < len): the node keeps its id as the
// lower (suffix) part and a new upper node with a fresh id takes the prefix, so ids held by
// requests stay valid (DESIGN.md, node ids). The upper node copies lock refs, hit count and access
// time, and sits just in front of (more recent than) the node in the LRU, as SGLang does.
Node* RadixTree::split(Node* node, size_t prefix_len) {
  Node* parent = node->parent;
  unindex_child(parent, node);
  unlink_child(parent, node);

  auto owned = std::make_unique<Node>();
  Node* upper = owned.get();
  upper->id = mint_id();
  upper->ns = node->ns;
  upper->key.assign(node->key.begin(), node->key.begin() + prefix_len);
  node->key.erase(node->key.begin(), node->key.begin() + prefix_len);
  if (page_hashes_) slice_page_hashes(node, upper, prefix_len);
  for (int c = 0; c < kNumComponents; ++c) {
    // A Mamba state (and its single-node lock) belongs to the end of the key: it stays below.
    if (c == static_cast<int>(Component::kMamba)) continue;
    ComponentData& lower_data = node->comp[c];
    ComponentData& upper_data = upper->comp[c];
    upper_data.has_value = lower_data.has_value;
    upper_data.has_host_value = lower_data.has_host_value;
    upper_data.lock_ref = lower_data.lock_ref;
    upper_data.host_lock_ref = lower_data.host_lock_ref;
    if (c == static_cast<int>(Component::kSwa) && lower_data.has_host_value) {
      upper_data.host_value.assign(lower_data.host_value.begin(),
                                   lower_data.host_value.begin() + prefix_len);
      lower_data.host_value.erase(lower_data.host_value.begin(),
                                  lower_data.host_value.begin() + prefix_len);
    }
    if (c == static_cast<int>(Component::kFull)) {
      if (lower_data.has_value) {
        upper_data.value.assign(lower_data.value.begin(), lower_data.value.begin() + prefix_len);
        lower_data.value.erase(lower_data.value.begin(), lower_data.value.begin() + prefix_len);
      }
      if (lower_data.has_host_value) {
        upper_data.host_value.assign(lower_data.host_value.begin(),
                                     lower_data.host_value.begin() + prefix_len);
        lower_data.host_value.erase(lower_data.host_value.begin(),
                                    lower_data.host_value.begin() + prefix_len);
      }
    }
  }
  upper->hit_count = node->hit_count;
  upper->swa_segment_tops = node->swa_segment_tops;  // segments ending here now end above
  node->swa_segment_tops = 0;
  upper->backup_pending = node->backup_pending;
  upper->load_pending = node->load_pending;
  upper->load_failed = node->load_failed;
  upper->last_access = node->last_access;
  upper->creation_time = node->creation_time;

  link_child(parent, upper);
  index_child(parent, upper);
  link_child(upper, node);
  index_child(upper, node);
  if (DeviceLru::contains(node)) device_lru_.insert_before(node, upper);
  if (HostLru::contains(node)) host_lru_.insert_before(node, upper);
  if (SwaLru::contains(node)) swa_lru_.insert_before(node, upper);
  nodes_.emplace(upper->id, std::move(owned));
  return upper;
}

// Touches node and its ancestors, deepest first, so that every ancestor ends up more recent than
// its descendants: the LRU's back is then always a leaf (no eviction scan needed).
void RadixTree::touch_path(Node* node) {
  for (Node* n = node; n != nullptr; n = n->parent) touch(n);
}

// Makes node the most recently used in every LRU list holding it (they stay in access order).
void RadixTree::touch(Node* n) {
  n->last_access = ++tick_;
  if (DeviceLru::contains(n)) device_lru_.move_to_front(n);
  if (HostLru::contains(n)) host_lru_.move_to_front(n);
  if (MambaLru::contains(n)) mamba_lru_.move_to_front(n);
  if (SwaLru::contains(n)) swa_lru_.move_to_front(n);
}

void RadixTree::destroy_leaf(Node* node) {
  if (node->has_mamba_state() || node->has_mamba_host_state()) {
    throw std::logic_error(describe("destroy_leaf", node->id, "still holds a Mamba state"));
  }
  if (node->has_swa_host()) {
    throw std::logic_error(describe("destroy_leaf", node->id, "still holds host SWA slots"));
  }
  drop_swa(node);  // its Full slots (the caller's to free) take their SWA side with them
  if (DeviceLru::contains(node)) device_lru_.erase(node);
  if (HostLru::contains(node)) host_lru_.erase(node);
  Node* parent = node->parent;
  unindex_child(parent, node);
  unlink_child(parent, node);
  nodes_.erase(node->id);
}

void RadixTree::check_slots(const char* caller, const SlotIndex* slots, size_t len,
                            int64_t num_slots, const char* pool) const {
  const std::string where = std::string(caller) + ": " + pool + " slot";
  for (size_t i = 0; i < len; ++i) {
    const SlotIndex v = slots[i];
    if (v < 0) {
      throw std::invalid_argument(where + " [" + std::to_string(i) + "] = " + std::to_string(v) +
                                  " is a negative slot index");
    }
    if (num_slots > 0 && v >= num_slots) {
      throw std::out_of_range(where + " [" + std::to_string(i) + "] = " + std::to_string(v) +
                              " is out of range for a " + pool + " pool of " +
                              std::to_string(num_slots) + " slots");
    }
  }
  if (page_size_ == 1) return;
  for (size_t p = 0; p < len; p += static_cast<size_t>(page_size_)) {
    const SlotIndex first = slots[p];
    if (first % page_size_ != 0) {
      throw std::invalid_argument(where + " page at token " + std::to_string(p) +
                                  " starts at slot " + std::to_string(first) +
                                  ", not a multiple of page_size " + std::to_string(page_size_));
    }
    for (int64_t j = 1; j < page_size_; ++j) {
      if (slots[p + j] != first + j) {
        throw std::invalid_argument(where + " page at token " + std::to_string(p) +
                                    " is not page_size consecutive slots ([" +
                                    std::to_string(p + j) + "] = " + std::to_string(slots[p + j]) +
                                    ", expected " + std::to_string(first + j) + ")");
      }
    }
  }
}

// Device eviction of a backuped device leaf: its device slots are freed, it stays as host-only
// (SGLang's _demote) and, unless host-locked, becomes the most recent host-LRU entry. Its host-only
// children are older in the host LRU, so the host LRU's back stays a leaf.
void RadixTree::demote(Node* node, EvictResult& result) {
  free_mamba(node, result.mamba_freed);  // the host state (if any) stays with the host KV
  drop_swa(node);  // freed with the Full slots; the host copy (if any) stays
  ComponentData& full = node->full();
  result.device_freed.insert(result.device_freed.end(), full.value.begin(), full.value.end());
  full.value.clear();
  full.value.shrink_to_fit();
  full.has_value = false;
  device_lru_.erase(node);
  evictable_size_ -= node->num_tokens();
  result.demoted_tokens += node->num_tokens();
  if (full.host_lock_ref == 0) {
    node->last_access = ++tick_;
    host_lru_.push_front(node);
    host_evictable_size_ += node->num_tokens();
  }
}

// Demotion of a load-failed node nobody locks any more: its garbage device slots go to
// failed_load_slots_, it stays as host-only (its host copy was the load's intact source). Its
// device children, all load-failed and unlocked too, were demoted before it.
void RadixTree::demote_failed(Node* node) {
  for (const Node* c = node->first_child; c != nullptr; c = c->next_sibling) {
    if (!c->evicted()) {
      throw std::logic_error(describe("demote_failed", node->id,
                                      "has a device child " + std::to_string(c->id)));
    }
  }
  free_mamba(node, failed_load_states_);  // a load's anchor got its state with the failed copy
  drop_swa(node);  // garbage too; its SWA side goes with the failed-load Full slots
  ComponentData& full = node->full();
  if (DeviceLru::contains(node)) {  // unlocked before the load failed
    device_lru_.erase(node);
    evictable_size_ -= node->num_tokens();
  } else {  // released by dec_lock_ref just now
    protected_size_ -= node->num_tokens();
  }
  failed_load_slots_.insert(failed_load_slots_.end(), full.value.begin(), full.value.end());
  full.value.clear();
  full.value.shrink_to_fit();
  full.has_value = false;
  node->load_failed = false;
  load_failed_size_ -= node->num_tokens();
  if (full.host_lock_ref == 0) {
    node->last_access = ++tick_;
    host_lru_.push_front(node);
    host_evictable_size_ += node->num_tokens();
  }
}

// The host-only nodes from `anchor` up to its deepest device ancestor (excluded), deepest first:
// what a load-back of anchor brings to device. Empty when that ancestor is load-failed: its KV is
// garbage, so nothing is loaded under it until it is demoted.
std::vector<Node*> RadixTree::load_path(Node* anchor) const {
  std::vector<Node*> path;
  Node* n = anchor;
  for (; n->evicted(); n = n->parent) path.push_back(n);
  if (n->load_failed) path.clear();
  return path;
}

// Device eviction of an unbacked device leaf: removed with its KV. Its host-only descendants
// (possible under write_back) cannot outlive it and are removed with it (SGLang's
// drop_subtree_no_host); if any of them, or the leaf, is host-locked, nothing happens and the
// call returns false.
bool RadixTree::drop_unbacked(Node* node, EvictResult& result) {
  std::vector<Node*> subtree{node};
  for (size_t i = 0; i < subtree.size(); ++i) {
    if (subtree[i]->full().host_lock_ref > 0) return false;
    for (Node* c = subtree[i]->first_child; c != nullptr; c = c->next_sibling) subtree.push_back(c);
  }
  free_mamba(node, result.mamba_freed);  // only the victim is on device; its subtree is host-only
  ComponentData& full = node->full();
  result.device_freed.insert(result.device_freed.end(), full.value.begin(), full.value.end());
  evictable_size_ -= node->num_tokens();
  result.dropped_tokens += node->num_tokens();
  // Children come after their parent in `subtree`: destroy in reverse, leaves first.
  for (auto it = subtree.rbegin(); it != subtree.rend(); ++it) {
    Node* n = *it;
    free_mamba_host(n);
    free_swa_host(n);
    if (n->backuped()) {
      const auto& host = n->full().host_value;
      result.host_freed.insert(result.host_freed.end(), host.begin(), host.end());
      host_total_size_ -= n->num_tokens();
      if (HostLru::contains(n)) host_evictable_size_ -= n->num_tokens();
    }
    destroy_leaf(n);
  }
  return true;
}

// Drops the tail of a childless node's key past `keep` tokens (a page multiple, 0 < keep < len),
// with the matching device and host slots. The caller frees the slots and fixes the sizes.
void RadixTree::trim_tail(Node* node, size_t keep) {
  if (node->has_mamba_state() || node->has_mamba_host_state()) {  // states of the dropped end
    throw std::logic_error(describe("trim_tail", node->id, "still holds a Mamba state"));
  }
  const int64_t trimmed = node->num_tokens() - static_cast<int64_t>(keep);
  if (node->has_swa()) {  // the tail's SWA side goes with its Full slots
    (node->swa().lock_ref > 0 ? swa_protected_size_ : swa_evictable_size_) -= trimmed;
  }
  free_swa_host(node, keep);
  node->key.resize(keep);
  if (page_hashes_) node->page_hashes.resize(keep / static_cast<size_t>(page_size_));
  ComponentData& full = node->full();
  if (full.has_value) full.value.resize(keep);
  if (full.has_host_value) full.host_value.resize(keep);
}

// Marks node's device SWA KV live (its Full slots are SWA-mapped).
void RadixTree::set_swa(Node* node) {
  ComponentData& swa = node->swa();
  swa.has_value = true;
  if (swa.lock_ref > 0) {
    swa_protected_size_ += node->num_tokens();
  } else {
    swa_lru_.push_front(node);  // callers touch it (or its path) afterwards
    swa_evictable_size_ += node->num_tokens();
  }
}

// Node's device SWA KV is gone (an SWA tombstone on device). The slots are the caller's to free.
void RadixTree::drop_swa(Node* node) {
  ComponentData& swa = node->swa();
  if (!swa.has_value) return;
  swa.has_value = false;
  if (SwaLru::contains(node)) {
    swa_lru_.erase(node);
    swa_evictable_size_ -= node->num_tokens();
  } else {
    swa_protected_size_ -= node->num_tokens();
  }
}

// Frees node's host SWA slots from token `keep` on into the take_freed_swa_host_slots outbox.
void RadixTree::free_swa_host(Node* node, size_t keep) {
  ComponentData& swa = node->swa();
  if (!swa.has_host_value) return;
  freed_swa_host_.insert(freed_swa_host_.end(), swa.host_value.begin() + keep,
                         swa.host_value.end());
  swa_host_size_ -= static_cast<int64_t>(swa.host_value.size() - keep);
  swa.host_value.resize(keep);
  if (keep == 0) swa.has_host_value = false;
}

// Frees node's Mamba state (if any) into `freed`: the node becomes a Mamba tombstone. The state
// must not be locked (a Mamba lock comes with a Full lock on the same node, and locked nodes are
// never evicted).
void RadixTree::free_mamba(Node* node, std::vector<SlotIndex>& freed) {
  ComponentData& mamba = node->mamba();
  if (!mamba.has_value) return;
  if (mamba.lock_ref > 0) {
    throw std::logic_error(describe("free_mamba", node->id, "its Mamba state is locked"));
  }
  freed.push_back(mamba.value[0]);
  mamba.value.clear();
  mamba.has_value = false;
  mamba_lru_.erase(node);
  --mamba_evictable_size_;
}

// Frees node's host Mamba state (if any) into the outbox of take_freed_mamba_host_slots.
void RadixTree::free_mamba_host(Node* node) {
  ComponentData& mamba = node->mamba();
  if (!mamba.has_host_value) return;
  freed_mamba_host_.push_back(mamba.host_value[0]);
  mamba.host_value.clear();
  mamba.has_host_value = false;
}

// A Mamba tree's node with no state on either tier: no match can end there.
bool RadixTree::useless_tombstone(const Node* node) const {
  return (mamba_ && !node->has_mamba_state() && !node->has_mamba_host_state()) ||
         (swa_window_ > 0 && !node->has_swa() && !node->has_swa_host());
}

// The tombstone cascade of Mamba trees (failure class 5): from `node` upwards, deletes each node
// that is a childless Mamba tombstone on both tiers (no match can end there or below it) with its
// Full slots,
// and stops at the first that is not, or is locked or host-locked in any component, has a backup
// or load in flight, or is load-failed: an in-flight operation's nodes must stay. device_ok =
// false also stops at a node with device KV (evict_host returns host slots only).
void RadixTree::delete_tombstones(Node* node, EvictResult& result, bool device_ok) {
  if (!mamba_ && swa_window_ == 0) return;
  while (!node->is_root() && node->num_children == 0 && useless_tombstone(node)) {
    const ComponentData& full = node->full();
    if (full.lock_ref > 0 || full.host_lock_ref > 0 || node->mamba().lock_ref > 0 ||
        node->swa().lock_ref > 0 ||
        node->backup_pending != kNoNode || node->load_pending != kNoNode || node->load_failed ||
        node->state_backup_pending != kNoNode ||
        (!device_ok && full.has_value)) {
      return;
    }
    if (full.has_value) {
      result.device_freed.insert(result.device_freed.end(), full.value.begin(), full.value.end());
      evictable_size_ -= node->num_tokens();  // unlocked: it was in the device LRU
      result.dropped_tokens += node->num_tokens();
    }
    if (full.has_host_value) {
      result.host_freed.insert(result.host_freed.end(), full.host_value.begin(),
                               full.host_value.end());
      host_total_size_ -= node->num_tokens();
      if (HostLru::contains(node)) host_evictable_size_ -= node->num_tokens();
    }
    free_mamba(node, result.mamba_freed);
    free_mamba_host(node);
    free_swa_host(node);
    Node* parent = node->parent;
    destroy_leaf(node);
    node = parent;
  }
}

// ---------------------------------------------------------------------------------------------
// Operations

MatchResult RadixTree::match_prefix(const Token* key, size_t len, std::string_view extra_key) {
  MatchResult result;
  len -= len % static_cast<size_t>(page_size_);
  const int32_t ns = namespace_id(extra_key, /*create=*/false);
  Node* node = root_.get();
  // The deepest node every validator accepts (best_match_node) and the deepest one they accept on
  // device (last_device_node). Full accepts every matched node (device, or host-only on the
  // path); Mamba only nodes holding a usable state: a device node's device state, a host-only
  // node's host state (loaded back with it), or the root.
  Node* best = node;
  Node* last_device = node;
  size_t device_len = 0;  // device tokens down to the deepest device node walked so far
  size_t pos = 0;
  // SWA validator: tokens of the run of SWA-live nodes ending at the walk's node; unbounded from
  // the root until the first tombstone (no earlier token needs to be attended).
  int64_t swa_run = INT64_MAX / 2;
  if (ns >= 0) {
    while (pos < len) {
      Node* child = find_child(node, ns, key + pos);
      // A load-failed node's device KV is garbage and its subtree is unreachable until it is
      // demoted (a load-pending one is served: its users wait for the copy's layer events).
      if (child == nullptr || child->load_failed) break;
      const size_t m = common_pages_len(child, key + pos, len - pos);
      const bool partial = m < child->key.size();
      if (partial) child = split(child, m);
      if (!child->evicted()) {
        const std::vector<SlotIndex>& v = child->full().value;
        result.device_indices.insert(result.device_indices.end(), v.begin(), v.end());
      }
      node = child;
      pos += m;
      bool swa_ok = true;
      if (swa_window_ > 0) {
        if (child->evicted() ? child->has_swa_host() : child->has_swa()) {
          swa_run += static_cast<int64_t>(m);
          swa_ok = swa_run >= swa_window_;
        } else {
          swa_run = 0;
          swa_ok = false;
        }
      }
      if (swa_ok && (!mamba_ || (child->evicted() ? child->has_mamba_host_state()
                                                  : child->has_mamba_state()))) {
        best = child;
        if (!child->evicted()) {
          last_device = child;
          device_len = result.device_indices.size();
        }
      }
      if (partial) break;
    }
  }
  result.device_indices.resize(device_len);
  int64_t host_len = 0;
  for (const Node* n = best; n != last_device; n = n->parent) host_len += n->num_tokens();
  result.host_hit_length = host_len;
  if (static_cast<int64_t>(pos) > static_cast<int64_t>(device_len) + host_len) {
    if (mamba_) result.mamba_branching_seqlen = static_cast<int64_t>(pos);
    if (swa_window_ > 0) result.swa_branching_seqlen = static_cast<int64_t>(pos);
  }
  touch_path(best);
  result.last_device_node = last_device->id;
  // SGLang sets last_host_node = best_match_node in HiCache mode.
  result.last_host_node = result.best_match_node = best->id;
  return result;
}

InsertResult RadixTree::insert(const Token* key, size_t len, const SlotIndex* value,
                               size_t value_len, std::string_view extra_key,
                               SlotIndex mamba_value, int64_t swa_evicted_seqlen) {
  if (value_len != len) {
    throw std::invalid_argument("insert: key has " + std::to_string(len) + " tokens but value has " +
                                std::to_string(value_len) + " slots; they must be equal");
  }
  const size_t aligned = len - len % static_cast<size_t>(page_size_);
  check_slots("insert", value, aligned, num_device_slots_, "device");
  if (mamba_value != -1) {
    if (!mamba_) {
      throw std::invalid_argument("insert: mamba_value given to a tree without the Mamba component");
    }
    if (mamba_value < 0 || (num_mamba_slots_ > 0 && mamba_value >= num_mamba_slots_)) {
      throw std::out_of_range("insert: mamba_value " + std::to_string(mamba_value) +
                              " is out of range for a mamba pool of " +
                              std::to_string(num_mamba_slots_) + " slots");
    }
  }
  if (swa_evicted_seqlen < 0 || (swa_window_ == 0 && swa_evicted_seqlen != 0)) {
    throw std::invalid_argument("insert: swa_evicted_seqlen " + std::to_string(swa_evicted_seqlen) +
                                (swa_window_ == 0 ? " given to a tree without the SWA component"
                                                  : " is negative"));
  }
  // SWA: the caller freed the SWA side of value[0:frontier]; its own slots above are mapped.
  const size_t frontier =
      std::min(aligned, static_cast<size_t>(swa_evicted_seqlen - swa_evicted_seqlen % page_size_));
  const int32_t ns = namespace_id(extra_key, /*create=*/aligned > 0);

  InsertResult result;
  Node* node = root_.get();
  size_t pos = 0;
  bool stopped = false;
  while (pos < aligned) {
    Node* child = find_child(node, ns, key + pos);
    if (child == nullptr) break;
    if (child->load_pending != kNoNode || child->load_failed) {
      // Its device KV is still being copied, or garbage: the caller's slots for these tokens are
      // the only ones known valid, and anything computed under this node may derive from
      // garbage. Stop: the caller keeps value[pos:], and no device node is ever created under a
      // node whose load may fail.
      stopped = true;
      break;
    }
    size_t m = common_pages_len(child, key + pos, aligned - pos);
    if (m < child->key.size()) child = split(child, m);
    if (swa_window_ > 0 && pos < frontier && pos + m > frontier &&
        (child->evicted() || !child->has_swa())) {
      // Its SWA changes from the frontier on (adopted or recovered): cut it there.
      child = split(child, frontier - pos);
      m = frontier - pos;
    }
    ++child->hit_count;
    if (child->evicted()) {
      // Host-only node: adopt the caller's fresh device KV instead of loading the host copy back
      // (SGLang's _unevict_node_on_insert). Its ancestors are on device (adopted just before, or
      // already), so device nodes still form a root-anchored prefix.
      ComponentData& full = child->full();
      full.value.assign(value + pos, value + pos + m);
      full.has_value = true;
      if (HostLru::contains(child)) {
        host_lru_.erase(child);
        host_evictable_size_ -= child->num_tokens();
      }
      device_lru_.push_front(child);  // evicted nodes are never locked; touch_path orders it
      evictable_size_ += child->num_tokens();
      result.adopted_len += static_cast<int64_t>(m);
      if (swa_window_ > 0 && pos >= frontier) set_swa(child);  // the caller's slots are mapped
    } else {
      result.prefix_len += static_cast<int64_t>(m);
      const std::vector<SlotIndex>& own = child->full().value;
      if (swa_window_ > 0 && pos >= frontier && !child->has_swa() && own[0] != value[pos]) {
        // An SWA tombstone inside the caller's live window: it takes the caller's SWA KV (SGLang's
        // RecoverSWAWithLockedFull, whether or not its Full KV is locked: it keeps its Full slots).
        result.swa_remap_dst.insert(result.swa_remap_dst.end(), own.begin(), own.end());
        result.swa_remap_src.insert(result.swa_remap_src.end(), value + pos, value + pos + m);
        set_swa(child);
      }
    }
    node = child;
    pos += m;
  }
  if (!stopped && pos < aligned) {
    if (swa_window_ > 0 && pos < frontier && frontier < aligned) {  // SWA tombstone, then live
      node = add_leaf(node, ns, key + pos, value + pos, frontier - pos, /*swa_live=*/false);
      pos = frontier;
    }
    const bool live = swa_window_ > 0 && pos >= frontier;
    // A live leaf longer than one page-aligned window is cut so that a lock on it pins one window
    // of SWA KV, not the whole leaf (SGLang's _maybe_split_leaf_for_swa_lock).
    const size_t cap = static_cast<size_t>((swa_window_ + page_size_ - 1) / page_size_ * page_size_);
    if (live && aligned - pos > cap) {
      node = add_leaf(node, ns, key + pos, value + pos, aligned - pos - cap, /*swa_live=*/true);
      pos = aligned - cap;
    }
    node = add_leaf(node, ns, key + pos, value + pos, aligned - pos, live);
    pos = aligned;
  }
  if (mamba_value != -1 && !stopped && aligned > 0) {
    ComponentData& mamba = node->mamba();
    if (mamba.has_value) {
      result.mamba_exist = true;  // the caller frees its copy; touch_path refreshes this one
    } else {
      mamba.value.assign(1, mamba_value);  // a tombstone is never Mamba-locked: unlocked
      mamba.has_value = true;
      mamba_lru_.push_front(node);  // touch_path orders it
      ++mamba_evictable_size_;
      result.mamba_taken = true;
    }
  }
  touch_path(node);
  result.last_node = node->id;
  result.cached_len = static_cast<int64_t>(pos);
  return result;
}

// A new device node under parent with key[0:len] and device slots value[0:len], unlocked.
Node* RadixTree::add_leaf(Node* parent, int32_t ns, const Token* key, const SlotIndex* value,
                          size_t len, bool swa_live) {
  auto owned = std::make_unique<Node>();
  Node* leaf = owned.get();
  leaf->id = mint_id();
  leaf->ns = ns;
  leaf->key.assign(key, key + len);
  leaf->full().value.assign(value, value + len);
  leaf->full().has_value = true;
  leaf->hit_count = 1;  // this insert: write_through backs a node up at its first insert
  leaf->creation_time = tick_ + 1;
  nodes_.emplace(leaf->id, std::move(owned));
  link_child(parent, leaf);
  index_child(parent, leaf);
  if (page_hashes_) hash_new_node(leaf);
  device_lru_.push_front(leaf);
  evictable_size_ += leaf->num_tokens();
  if (swa_live) set_swa(leaf);
  return leaf;
}

LockReceipt RadixTree::inc_lock_ref(NodeId id) {
  Node* node = node_by_id(id, "inc_lock_ref");
  while (node->evicted()) node = node->parent;  // skip the evicted bottom (the root has a value)
  LockReceipt receipt;
  receipt.node_id = node->id;
  if (node->has_mamba_state()) {  // Mamba: a single-node lock on the state the request uses
    ComponentData& mamba = node->mamba();
    if (mamba.lock_ref++ == 0) {
      mamba_lru_.erase(node);
      --mamba_evictable_size_;
      ++mamba_protected_size_;
    }
    receipt.mamba_node_id = node->id;
  } else if (!node->is_root()) {
    ++node->plain_receipts;
  }
  for (Node* n = node; !n->is_root(); n = n->parent) {
    ComponentData& full = n->full();
    if (full.lock_ref == 0) {
      device_lru_.erase(n);
      receipt.delta += n->num_tokens();
    }
    ++full.lock_ref;
  }
  evictable_size_ -= receipt.delta;
  protected_size_ += receipt.delta;
  // SWA: the window ending at the node (a segment lock; tombstones in it are counted too).
  Node* top = nullptr;
  for (Node* n = node; swa_window_ > 0 && !n->is_root() && receipt.swa_lock_tokens < swa_window_;
       n = n->parent) {
    ComponentData& swa = n->swa();
    if (swa.lock_ref++ == 0 && swa.has_value) {
      swa_lru_.erase(n);
      swa_evictable_size_ -= n->num_tokens();
      swa_protected_size_ += n->num_tokens();
    }
    receipt.swa_lock_tokens += n->num_tokens();
    top = n;
  }
  if (top != nullptr) ++top->swa_segment_tops;
  return receipt;
}

int64_t RadixTree::dec_lock_ref(NodeId id, NodeId mamba_node_id, int64_t swa_lock_tokens) {
  Node* node = node_by_id(id, "dec_lock_ref");
  if (swa_window_ == 0 ? swa_lock_tokens != 0
                       : (swa_lock_tokens <= 0) != node->is_root()) {
    throw std::invalid_argument(describe(
        "dec_lock_ref", id,
        "swa_lock_tokens " + std::to_string(swa_lock_tokens) +
            (swa_window_ == 0 ? " given to a tree without the SWA component"
                              : " is not the receipt's: a lock here holds an SWA segment")));
  }
  Node* swa_top = nullptr;  // the upper end of the receipt's SWA segment
  if (swa_lock_tokens > 0) {
    int64_t covered = 0;
    for (Node* n = node; !n->is_root() && covered < swa_lock_tokens; n = n->parent) {
      if (n->swa().lock_ref <= 0) {
        throw std::invalid_argument(describe("dec_lock_ref", n->id,
                                             "holds no SWA lock inside the receipt's SWA segment: "
                                             "a wrong or already used receipt"));
      }
      covered += n->num_tokens();
      swa_top = n;
    }
    // A segment covers a window (or reaches the root) and ends where a segment lock ended: at
    // a node boundary holding a segment top (splits keep both true).
    if (covered != swa_lock_tokens || swa_top->swa_segment_tops <= 0 ||
        (covered < swa_window_ && !swa_top->parent->is_root())) {
      throw std::invalid_argument(describe("dec_lock_ref", id,
                                           "swa_lock_tokens " + std::to_string(swa_lock_tokens) +
                                               " does not end where a window lock's segment "
                                               "ends: a wrong receipt"));
    }
  }
  if (mamba_node_id != kNoNode) {
    if (mamba_node_id != id) {
      throw std::invalid_argument(describe("dec_lock_ref", id,
                                           "the receipt's Mamba lock is on node " +
                                               std::to_string(mamba_node_id) +
                                               ", not on the node it locked: a wrong receipt"));
    }
    if (node->mamba().lock_ref <= 0) {
      throw std::invalid_argument(describe("dec_lock_ref", id,
                                           "holds no Mamba lock (Mamba lock_ref 0): a wrong or "
                                           "already used receipt"));
    }
  }
  if (node->is_root()) return 0;
  if (node->full().lock_ref <= 0) {
    throw std::invalid_argument(describe("dec_lock_ref", id, "is not locked (lock_ref 0)"));
  }
  if (mamba_node_id == kNoNode && node->plain_receipts == 0) {
    throw std::invalid_argument(describe("dec_lock_ref", id,
                                         node->mamba().lock_ref > 0
                                             ? "every lock taken here holds its Mamba state: pass "
                                               "the receipt's mamba_node_id"
                                             : "no lock was taken here (not a receipt's node_id)"));
  }
  if (load_failed_size_ > 0) {  // validate first: a throwing call changes nothing
    for (const Node* n = node; !n->is_root(); n = n->parent) {
      if (n->full().lock_ref == 1 && n->load_failed && n->load_pending != kNoNode) {
        throw std::invalid_argument(describe(
            "dec_lock_ref", n->id,
            "is load-failed and its load " + std::to_string(n->load_pending) +
                " is still pending: release a load's lock after finish_ or abort_load_back"));
      }
    }
  }
  if (mamba_node_id == kNoNode) --node->plain_receipts;
  if (swa_top != nullptr) --swa_top->swa_segment_tops;
  for (Node* n = node; swa_top != nullptr; n = n->parent) {  // components before Full
    ComponentData& swa = n->swa();
    if (--swa.lock_ref == 0 && swa.has_value) {
      swa_protected_size_ -= n->num_tokens();
      swa_evictable_size_ += n->num_tokens();
      swa_lru_.push_front(n);
      touch(n);
    }
    if (n == swa_top) break;
  }
  if (mamba_node_id != kNoNode && --node->mamba().lock_ref == 0) {  // components before Full
    mamba_lru_.push_front(node);
    touch(node);  // every LRU holding it (the SWA one too) stays in access-time order
    ++mamba_evictable_size_;
    --mamba_protected_size_;
  }
  int64_t delta = 0;
  for (Node* n = node; !n->is_root(); n = n->parent) {
    ComponentData& full = n->full();
    if (--full.lock_ref == 0) {
      if (n->load_failed) {
        demote_failed(n);  // deepest first: its device children (load-failed) went before it
        continue;
      }
      device_lru_.push_front(n);
      touch(n);  // keeps every LRU holding it in access-time order
      delta += n->num_tokens();
    }
  }
  evictable_size_ += delta;
  protected_size_ -= delta;
  return delta;
}

int64_t RadixTree::inc_host_lock_ref(NodeId id) {
  Node* node = node_by_id(id, "inc_host_lock_ref");
  int64_t delta = 0;
  for (Node* n = node; !n->is_root(); n = n->parent) {
    if (n->full().host_lock_ref++ == 0 && HostLru::contains(n)) {
      host_lru_.erase(n);
      delta += n->num_tokens();
    }
  }
  host_evictable_size_ -= delta;
  return delta;
}

int64_t RadixTree::dec_host_lock_ref(NodeId id) {
  Node* node = node_by_id(id, "dec_host_lock_ref");
  if (node->is_root()) return 0;
  if (node->full().host_lock_ref <= 0) {
    throw std::invalid_argument(
        describe("dec_host_lock_ref", id, "is not host-locked (host_lock_ref 0)"));
  }
  int64_t delta = 0;
  for (Node* n = node; !n->is_root(); n = n->parent) {
    // Deepest first, so released ancestors end up more recent than their descendants.
    if (--n->full().host_lock_ref == 0 && n->evicted()) {
      n->last_access = ++tick_;
      host_lru_.push_front(n);
      delta += n->num_tokens();
    }
  }
  host_evictable_size_ += delta;
  return delta;
}

EvictResult RadixTree::evict(int64_t num_tokens, bool write_back) {
  if (num_tokens < 0) {
    throw std::invalid_argument("evict: num_tokens must be >= 0, got " +
                                std::to_string(num_tokens));
  }
  EvictResult result;
  int64_t pages = (num_tokens + page_size_ - 1) / page_size_;
  while (pages > 0 && !device_lru_.empty()) {
    Node* victim = device_lru_.back();
    for (Node* c = victim->first_child; c != nullptr; c = c->next_sibling) {
      if (!c->evicted()) {
        throw std::logic_error(describe("evict", victim->id,
                                        "is the LRU back but has a device child " +
                                            std::to_string(c->id)));
      }
    }
    if (!evict_leaf(victim, pages, write_back, result)) break;
  }
  return result;
}

// Frees up to `pages` pages of an unlocked device leaf (no device child), from its tail, and
// counts what it freed (the tombstone cascade included) off `pages`. Returns false when the
// caller must stop: write_back needs a backup first (result.needs_backup), or an in-flight host
// operation holds the leaf or its host-only subtree.
bool RadixTree::evict_leaf(Node* victim, int64_t& pages, bool write_back, EvictResult& result) {
  const int64_t victim_pages = victim->num_tokens() / page_size_;
  const size_t keep = static_cast<size_t>(std::max<int64_t>(victim_pages - pages, 0) * page_size_);
  // Mamba trees: what is left of the victim (or its parent, once dropped) may now be a
  // childless tombstone, which the cascade deletes; its pages count as freed.
  Node* cascade_from = victim;
  int64_t demoted = 0;  // tokens of the victim if this round demoted it
  const NodeId victim_id = victim->id;  // (a drop destroys the victim)
  if (victim->backuped() || write_back || victim->num_children > 0) {
    // Page-granular: the tail pages become their own node (the victim keeps its id, the kept
    // head is the new parent), which is then demoted, backed up or dropped as a whole.
    if (keep > 0) split(victim, keep);
    const int64_t taken_pages = victim->num_tokens() / page_size_;  // before a drop frees it
    if (victim->backuped()) {
      demoted = victim->num_tokens();
      demote(victim, result);
    } else if (write_back) {
      result.needs_backup = victim->id;
      return false;
    } else {
      Node* parent = victim->parent;
      if (!drop_unbacked(victim, result)) return false;
      cascade_from = parent;
    }
    pages -= taken_pages;
  } else if (victim->full().host_lock_ref > 0) {
    return false;  // an in-flight host operation holds it: it may neither shrink nor go
  } else if (keep > 0) {
    // A childless unbacked leaf loses its tail pages in place (and its state, of the old end).
    free_mamba(victim, result.mamba_freed);
    std::vector<SlotIndex>& value = victim->full().value;
    result.device_freed.insert(result.device_freed.end(), value.begin() + keep, value.end());
    const int64_t trimmed = victim->num_tokens() - static_cast<int64_t>(keep);
    evictable_size_ -= trimmed;
    result.dropped_tokens += trimmed;
    trim_tail(victim, keep);
    pages = 0;
  } else {
    Node* parent = victim->parent;
    if (!drop_unbacked(victim, result)) return false;
    cascade_from = parent;
    pages -= victim_pages;
  }
  const size_t freed_before = result.device_freed.size();
  delete_tombstones(cascade_from, result, /*device_ok=*/true);
  pages -= static_cast<int64_t>(result.device_freed.size() - freed_before) / page_size_;
  if (demoted > 0 && nodes_.count(victim_id) == 0) {
    // The cascade deleted the demoted victim with its host copy: its tokens did not stay in
    // the tree as host-only, so they count as dropped.
    result.demoted_tokens -= demoted;
    result.dropped_tokens += demoted;
  }
  return true;
}

EvictResult RadixTree::evict_swa(int64_t num_tokens, bool write_back) {
  if (num_tokens < 0) {
    throw std::invalid_argument("evict_swa: num_tokens must be >= 0, got " +
                                std::to_string(num_tokens));
  }
  EvictResult result;
  int64_t pages = (num_tokens + page_size_ - 1) / page_size_;
  while (pages > 0 && !swa_lru_.empty()) {
    Node* victim = swa_lru_.back();
    if (write_back && !victim->backuped()) {
      result.needs_backup = victim->id;  // back up before it loses anything (PR #28468)
      break;
    }
    bool device_leaf = victim->full().lock_ref == 0;
    for (const Node* c = victim->first_child; c != nullptr && device_leaf; c = c->next_sibling) {
      device_leaf = c->evicted();
    }
    if (device_leaf) {  // evicting any component of a leaf removes all (reference section 2.5)
      int64_t leaf_pages = victim->num_tokens() / page_size_;
      const int64_t before = leaf_pages;
      if (!evict_leaf(victim, leaf_pages, write_back, result)) break;
      pages -= before - leaf_pages;
      continue;
    }
    // An internal node (or one a request holds outside its window): an SWA tombstone from now on,
    // and its Mamba state goes too (a state cannot be resumed without the window before it).
    const std::vector<SlotIndex>& full = victim->full().value;
    result.swa_freed.insert(result.swa_freed.end(), full.begin(), full.end());
    pages -= victim->num_tokens() / page_size_;
    drop_swa(victim);
    free_mamba(victim, result.mamba_freed);
    delete_tombstones(victim, result, /*device_ok=*/true);
  }
  return result;
}

EvictResult RadixTree::evict_mamba(int64_t num_states, bool write_back) {
  if (num_states < 0) {
    throw std::invalid_argument("evict_mamba: num_states must be >= 0, got " +
                                std::to_string(num_states));
  }
  EvictResult result;
  for (int64_t left = num_states; left > 0 && !mamba_lru_.empty(); --left) {
    Node* victim = mamba_lru_.back();
    if (write_back && !victim->backuped()) {
      // Back up before tombstoning (SGLang PR #28468): under write_back nothing else would save
      // this node's state (or, for a leaf the cascade would delete, its KV).
      result.needs_backup = victim->id;
      break;
    }
    free_mamba(victim, result.mamba_freed);
    delete_tombstones(victim, result, /*device_ok=*/true);
  }
  return result;
}

std::vector<SlotIndex> RadixTree::evict_host(int64_t num_tokens) {
  if (num_tokens < 0) {
    throw std::invalid_argument("evict_host: num_tokens must be >= 0, got " +
                                std::to_string(num_tokens));
  }
  std::vector<SlotIndex> freed;
  int64_t pages = (num_tokens + page_size_ - 1) / page_size_;
  while (pages > 0 && !host_lru_.empty()) {
    Node* victim = host_lru_.back();
    if (victim->num_children > 0) {
      throw std::logic_error(describe("evict_host", victim->id,
                                      "is the host LRU back but has children"));
    }
    std::vector<SlotIndex>& host = victim->full().host_value;
    const int64_t victim_pages = victim->num_tokens() / page_size_;
    if (victim_pages <= pages) {
      freed.insert(freed.end(), host.begin(), host.end());
      host_total_size_ -= victim->num_tokens();
      host_evictable_size_ -= victim->num_tokens();
      pages -= victim_pages;
      Node* parent = victim->parent;
      free_mamba_host(victim);
      free_swa_host(victim);
      destroy_leaf(victim);
      EvictResult cascade;  // Mamba trees: host-only tombstones above it; device ones stay
      delete_tombstones(parent, cascade, /*device_ok=*/false);
      freed.insert(freed.end(), cascade.host_freed.begin(), cascade.host_freed.end());
      pages -= static_cast<int64_t>(cascade.host_freed.size()) / page_size_;
    } else {
      const size_t keep = static_cast<size_t>((victim_pages - pages) * page_size_);
      freed.insert(freed.end(), host.begin() + keep, host.end());
      const int64_t trimmed = victim->num_tokens() - static_cast<int64_t>(keep);
      host_total_size_ -= trimmed;
      host_evictable_size_ -= trimmed;
      free_mamba_host(victim);  // the state of the dropped end
      trim_tail(victim, keep);
      pages = 0;
    }
  }
  return freed;
}

TransferPlan RadixTree::backup_plan(NodeId id, uint64_t min_hit_count) const {
  std::vector<const Node*> path;
  for (const Node* n = node_by_id(id, "backup_plan"); !n->is_root(); n = n->parent) {
    if (!n->evicted() && !n->backuped() && n->hit_count >= min_hit_count) path.push_back(n);
  }
  TransferPlan plan = root_first_plan(path, &ComponentData::value);
  for (auto it = path.rbegin(); it != path.rend(); ++it) {
    plan.states.push_back((*it)->has_mamba_state() ? (*it)->mamba().value[0] : -1);
    plan.swa.push_back((*it)->has_swa() ? 1 : 0);
  }
  return plan;
}

void RadixTree::commit_backup(NodeId id, const SlotIndex* host, size_t len, SlotIndex host_state,
                              const SlotIndex* host_swa, size_t host_swa_len) {
  Node* node = node_by_id(id, "commit_backup");
  if (node->is_root() || node->evicted()) {
    throw std::invalid_argument(describe("commit_backup", id, "has no device KV to back up"));
  }
  if (node->backuped()) {
    throw std::invalid_argument(describe("commit_backup", id, "is already backed up"));
  }
  if (len != node->key.size()) {
    throw std::invalid_argument(describe("commit_backup", id,
                                         "has " + std::to_string(node->key.size()) +
                                             " tokens but " + std::to_string(len) +
                                             " host slots were given"));
  }
  check_slots("commit_backup", host, len, num_host_slots_, "host");
  if (host_swa_len > 0) {
    if (!node->has_swa()) {
      throw std::invalid_argument(describe("commit_backup", id,
                                           "host SWA slots were given but the node has no live "
                                           "device SWA KV"));
    }
    if (host_swa_len != len) {
      throw std::invalid_argument(describe("commit_backup", id,
                                           "has " + std::to_string(len) + " tokens but " +
                                               std::to_string(host_swa_len) +
                                               " host SWA slots were given"));
    }
    check_slots("commit_backup", host_swa, host_swa_len, num_swa_host_slots_, "host SWA");
  }
  if (host_state != -1) {
    if (!node->has_mamba_state()) {
      throw std::invalid_argument(describe("commit_backup", id,
                                           "a host_state was given but the node holds no device "
                                           "Mamba state"));
    }
    if (host_state < 0 || (num_mamba_host_slots_ > 0 && host_state >= num_mamba_host_slots_)) {
      throw std::out_of_range(describe("commit_backup", id,
                                       "host_state " + std::to_string(host_state) +
                                           " is out of range for a Mamba host pool of " +
                                           std::to_string(num_mamba_host_slots_) + " slots"));
    }
    node->mamba().host_value.assign(1, host_state);
    node->mamba().has_host_value = true;
  }
  if (host_swa_len > 0) {
    node->swa().host_value.assign(host_swa, host_swa + host_swa_len);
    node->swa().has_host_value = true;
    swa_host_size_ += node->num_tokens();
  }
  ComponentData& full = node->full();
  full.host_value.assign(host, host + len);
  full.has_host_value = true;
  node->backup_pending = id;
  host_total_size_ += node->num_tokens();
}

// The node named by ack_id and the fragments split off above it that carry the same mark: a split
// copies the mark to the new upper node, so they are a chain of ancestors, deepest first.
template <NodeId Node::*Mark>
std::vector<Node*> RadixTree::pending_nodes(NodeId ack_id, const char* caller) const {
  Node* node = node_by_id(ack_id, caller);
  if (node->*Mark != ack_id) {
    throw std::invalid_argument(describe(caller, ack_id, "has no transfer in flight under this id"));
  }
  std::vector<Node*> chain;
  for (Node* n = node; !n->is_root() && n->*Mark == ack_id; n = n->parent) chain.push_back(n);
  return chain;
}

TransferPlan RadixTree::state_backup_plan(NodeId id) const {
  std::vector<const Node*> path;
  for (const Node* n = node_by_id(id, "state_backup_plan"); !n->is_root(); n = n->parent) {
    if (n->has_mamba_state() && !n->has_mamba_host_state() && n->backuped() &&
        n->backup_pending == kNoNode) {
      path.push_back(n);
    }
  }
  TransferPlan plan;
  for (auto it = path.rbegin(); it != path.rend(); ++it) {
    plan.nodes.push_back((*it)->id);
    plan.lengths.push_back(0);
    plan.states.push_back((*it)->mamba().value[0]);
  }
  return plan;
}

void RadixTree::commit_state_backup(NodeId id, SlotIndex host_state) {
  Node* node = node_by_id(id, "commit_state_backup");
  if (!node->has_mamba_state() || node->has_mamba_host_state() || !node->backuped() ||
      node->backup_pending != kNoNode) {
    throw std::invalid_argument(describe("commit_state_backup", id,
                                         "is not a backed-up node whose device state lacks a "
                                         "host copy (see state_backup_plan)"));
  }
  if (host_state < 0 || (num_mamba_host_slots_ > 0 && host_state >= num_mamba_host_slots_)) {
    throw std::out_of_range(describe("commit_state_backup", id,
                                     "host_state " + std::to_string(host_state) +
                                         " is out of range for a Mamba host pool of " +
                                         std::to_string(num_mamba_host_slots_) + " slots"));
  }
  node->mamba().host_value.assign(1, host_state);
  node->mamba().has_host_value = true;
  node->state_backup_pending = id;
}

void RadixTree::finish_state_backup(NodeId ack_id) {
  Node* node = node_by_id(ack_id, "finish_state_backup");
  if (node->state_backup_pending != ack_id) {
    throw std::invalid_argument(describe("finish_state_backup", ack_id,
                                         "has no state backup in flight"));
  }
  node->state_backup_pending = kNoNode;
}

void RadixTree::abort_state_backup(NodeId ack_id) {
  Node* node = node_by_id(ack_id, "abort_state_backup");
  if (node->state_backup_pending != ack_id) {
    throw std::invalid_argument(describe("abort_state_backup", ack_id,
                                         "has no state backup in flight"));
  }
  node->state_backup_pending = kNoNode;
  free_mamba_host(node);
}

void RadixTree::finish_backup(NodeId ack_id) {
  for (Node* n : pending_nodes<&Node::backup_pending>(ack_id, "finish_backup")) {
    n->backup_pending = kNoNode;
  }
}

std::vector<SlotIndex> RadixTree::abort_backup(NodeId ack_id) {
  std::vector<SlotIndex> freed;
  for (Node* n : pending_nodes<&Node::backup_pending>(ack_id, "abort_backup")) {
    // Pending backups are of device nodes (the caller holds their lock), so none is host-only.
    ComponentData& full = n->full();
    freed.insert(freed.end(), full.host_value.begin(), full.host_value.end());
    full.host_value.clear();
    full.has_host_value = false;
    free_mamba_host(n);  // its bytes are as unfinished as the KV's
    free_swa_host(n);
    host_total_size_ -= n->num_tokens();
    n->backup_pending = kNoNode;
  }
  return freed;
}

TransferPlan RadixTree::load_back_plan(NodeId anchor) const {
  const std::vector<Node*> path = load_path(node_by_id(anchor, "load_back_plan"));
  TransferPlan plan = root_first_plan(path, &ComponentData::host_value);
  // Mamba trees: the anchor's host state comes back with the KV (none elsewhere: a request
  // continues from the anchor's state only).
  plan.states.assign(path.size(), -1);
  if (!path.empty() && path.front()->has_mamba_host_state()) {
    plan.states.back() = path.front()->mamba().host_value[0];
  }
  // SWA trees: the host SWA copies come back with the KV.
  for (auto it = path.rbegin(); it != path.rend(); ++it) {
    const ComponentData& swa = (*it)->swa();
    plan.swa.push_back(swa.has_host_value ? 1 : 0);
    plan.swa_indices.insert(plan.swa_indices.end(), swa.host_value.begin(), swa.host_value.end());
  }
  return plan;
}

void RadixTree::commit_load_back(NodeId anchor, const SlotIndex* device, size_t len,
                                 SlotIndex device_state) {
  Node* node = node_by_id(anchor, "commit_load_back");
  const std::vector<Node*> path = load_path(node);
  const bool with_state = !path.empty() && path.front()->has_mamba_host_state();
  if (with_state != (device_state != -1)) {
    throw std::invalid_argument(describe("commit_load_back", anchor,
                                         with_state ? "its host Mamba state needs a device_state slot"
                                                    : "a device_state was given but there is no "
                                                      "host Mamba state to load"));
  }
  if (with_state &&
      (device_state < 0 || (num_mamba_slots_ > 0 && device_state >= num_mamba_slots_))) {
    throw std::out_of_range(describe("commit_load_back", anchor,
                                     "device_state " + std::to_string(device_state) +
                                         " is out of range for a Mamba pool of " +
                                         std::to_string(num_mamba_slots_) + " slots"));
  }
  if (path.empty() && node->evicted()) {
    throw std::invalid_argument(describe("commit_load_back", anchor,
                                         "is under a load-failed node: nothing can be loaded "
                                         "there until that node is demoted"));
  }
  size_t tokens = 0;
  for (const Node* n : path) tokens += n->key.size();
  if (len != tokens) {
    throw std::invalid_argument(describe("commit_load_back", anchor,
                                         "needs " + std::to_string(tokens) +
                                             " device slots for its host-only path, got " +
                                             std::to_string(len)));
  }
  check_slots("commit_load_back", device, len, num_device_slots_, "device");
  size_t pos = 0;
  for (auto it = path.rbegin(); it != path.rend(); ++it) {
    Node* n = *it;
    ComponentData& full = n->full();
    full.value.assign(device + pos, device + pos + n->key.size());
    full.has_value = true;
    n->load_pending = anchor;
    pos += n->key.size();
    if (HostLru::contains(n)) {
      host_lru_.erase(n);
      host_evictable_size_ -= n->num_tokens();
    }
    device_lru_.push_front(n);  // evicted nodes are never locked; touch_path orders them
    evictable_size_ += n->num_tokens();
    if (n->has_swa_host()) set_swa(n);  // the caller loads its host SWA copy with the KV
  }
  if (with_state) {  // the anchor's state, device tier: unlocked until the caller locks anchor
    node->mamba().value.assign(1, device_state);
    node->mamba().has_value = true;
    mamba_lru_.push_front(node);
    ++mamba_evictable_size_;
  }
  touch_path(node);
}

void RadixTree::finish_load_back(NodeId ack_id) {
  for (Node* n : pending_nodes<&Node::load_pending>(ack_id, "finish_load_back")) {
    n->load_pending = kNoNode;
  }
}

int64_t RadixTree::abort_load_back(NodeId ack_id) {
  const std::vector<Node*> chain = pending_nodes<&Node::load_pending>(ack_id, "abort_load_back");
  // The load's nodes and every device node below them: loads chained under this one (inserts
  // never go below a load-pending node). Parents come before their children.
  std::vector<Node*> failed{chain.back()};
  for (size_t i = 0; i < failed.size(); ++i) {
    for (Node* c = failed[i]->first_child; c != nullptr; c = c->next_sibling) {
      if (!c->evicted()) failed.push_back(c);
    }
  }
  for (const Node* n : failed) {  // validate first: a throwing call changes nothing
    if (n->load_pending != kNoNode && n->load_pending != ack_id && n->full().lock_ref == 0) {
      throw std::invalid_argument(describe("abort_load_back", n->id,
                                           "is pending under load " +
                                               std::to_string(n->load_pending) +
                                               " but unlocked: a load's lock is held until its "
                                               "ack"));
    }
  }
  int64_t tokens = 0;
  for (Node* n : chain) {
    n->load_pending = kNoNode;
    tokens += n->num_tokens();
  }
  for (Node* n : failed) {
    if (!n->load_failed) {
      n->load_failed = true;
      load_failed_size_ += n->num_tokens();
    }
  }
  // Children first, so a demoted node never has a device child; an unlocked node's device
  // descendants are unlocked too, so each is demoted here or by a later dec_lock_ref.
  for (auto it = failed.rbegin(); it != failed.rend(); ++it) {
    if ((*it)->full().lock_ref == 0) demote_failed(*it);
  }
  return tokens;
}

std::vector<SlotIndex> RadixTree::take_failed_load_slots() {
  std::vector<SlotIndex> slots;
  slots.swap(failed_load_slots_);
  return slots;
}

std::vector<SlotIndex> RadixTree::take_failed_load_states() {
  std::vector<SlotIndex> slots;
  slots.swap(failed_load_states_);
  return slots;
}

std::vector<SlotIndex> RadixTree::take_freed_mamba_host_slots() {
  std::vector<SlotIndex> slots;
  slots.swap(freed_mamba_host_);
  return slots;
}

std::vector<SlotIndex> RadixTree::take_freed_swa_host_slots() {
  std::vector<SlotIndex> slots;
  slots.swap(freed_swa_host_);
  return slots;
}

std::vector<SlotIndex> RadixTree::reset() {
  if (protected_size_ != 0) {
    throw std::invalid_argument("reset: " + std::to_string(protected_size_) +
                                " tokens are locked by running requests; unlock them first");
  }
  // Host locks are path locks: one held anywhere shows on a child of the root.
  for (const Node* c = root_->first_child; c != nullptr; c = c->next_sibling) {
    if (c->full().host_lock_ref > 0) {
      throw std::invalid_argument("reset: node " + std::to_string(c->id) +
                                  " is host-locked by an in-flight host operation");
    }
  }
  std::vector<SlotIndex> freed = all_device_indices();
  freed.insert(freed.end(), failed_load_slots_.begin(), failed_load_slots_.end());
  failed_load_slots_.clear();
  load_failed_size_ = 0;  // (load-failed nodes are locked: there are none here)
  device_lru_.clear();
  host_lru_.clear();
  mamba_lru_.clear();
  mamba_evictable_size_ = mamba_protected_size_ = 0;  // (locked states are Full-locked: none)
  failed_load_states_.clear();  // the caller takes the outboxes and the states first
  freed_mamba_host_.clear();
  swa_lru_.clear();  // (SWA locks come with Full locks: none here)
  swa_evictable_size_ = swa_protected_size_ = swa_host_size_ = 0;
  freed_swa_host_.clear();  // (the caller takes all_swa_host_indices() and the outbox first)
  child_index_.clear();
  nodes_.clear();
  namespaces_.clear();
  namespace_names_.resize(1);
  root_->first_child = nullptr;
  root_->num_children = 0;
  evictable_size_ = protected_size_ = 0;
  host_total_size_ = host_evictable_size_ = 0;
  return freed;
}

// ---------------------------------------------------------------------------------------------
// Inspection

NodeInfo RadixTree::node_info(NodeId id) const {
  const Node* node = node_by_id(id, "node_info");
  NodeInfo info;
  info.node_id = node->id;
  info.parent_id = node->is_root() ? kNoNode : node->parent->id;
  info.num_tokens = node->num_tokens();
  info.num_children = node->num_children;
  info.lock_ref = node->full().lock_ref;
  info.host_ref_counter = node->full().host_lock_ref;
  info.hit_count = node->hit_count;
  info.last_access_time = node->last_access;
  info.has_device_value = node->full().has_value;
  info.has_host_value = node->is_root() || node->full().has_host_value;
  info.backup_pending = node->backup_pending != kNoNode;
  info.load_pending = node->load_pending != kNoNode;
  info.load_failed = node->load_failed;
  info.has_mamba_value = node->has_mamba_state();
  info.mamba_value = node->has_mamba_state() ? node->mamba().value[0] : -1;
  info.mamba_lock_ref = node->mamba().lock_ref;
  info.has_mamba_host_value = node->has_mamba_host_state();
  info.mamba_host_value = node->has_mamba_host_state() ? node->mamba().host_value[0] : -1;
  info.has_swa_value = node->has_swa();
  info.swa_lock_ref = node->swa().lock_ref;
  info.has_swa_host_value = node->has_swa_host();
  info.has_extra_key = node->ns > 0;
  if (node->ns > 0) info.extra_key = namespace_names_[static_cast<size_t>(node->ns)];
  return info;
}

std::vector<NodeId> RadixTree::node_ids() const {
  std::vector<NodeId> ids;
  ids.reserve(nodes_.size());
  std::vector<const Node*> stack{root_.get()};
  while (!stack.empty()) {
    const Node* node = stack.back();
    stack.pop_back();
    if (!node->is_root()) ids.push_back(node->id);
    for (const Node* c = node->first_child; c != nullptr; c = c->next_sibling) stack.push_back(c);
  }
  return ids;
}

std::vector<Token> RadixTree::node_key(NodeId id) const { return node_by_id(id, "node_key")->key; }

std::vector<SlotIndex> RadixTree::all_device_indices() const {
  return tier_slots(root_.get(), &ComponentData::value, total_size());
}

std::vector<SlotIndex> RadixTree::all_host_indices() const {
  return tier_slots(root_.get(), &ComponentData::host_value, host_total_size_);
}

std::vector<SlotIndex> RadixTree::all_mamba_host_indices() const {
  std::vector<SlotIndex> out;
  for (const auto& [id, node] : nodes_) {
    if (node->has_mamba_host_state()) out.push_back(node->mamba().host_value[0]);
  }
  return out;
}

std::vector<SlotIndex> RadixTree::all_swa_indices() const {
  std::vector<SlotIndex> out;
  out.reserve(static_cast<size_t>(swa_evictable_size_ + swa_protected_size_));
  for (const auto& [id, node] : nodes_) {
    if (node->has_swa()) out.insert(out.end(), node->full().value.begin(), node->full().value.end());
  }
  return out;
}

std::vector<SlotIndex> RadixTree::all_swa_host_indices() const {
  std::vector<SlotIndex> out;
  for (const auto& [id, node] : nodes_) {
    const std::vector<SlotIndex>& host = node->swa().host_value;
    out.insert(out.end(), host.begin(), host.end());
  }
  return out;
}

std::vector<SlotIndex> RadixTree::all_mamba_indices() const {
  std::vector<SlotIndex> out;
  out.reserve(static_cast<size_t>(mamba_evictable_size_ + mamba_protected_size_));
  for (const auto& [id, node] : nodes_) {
    if (node->has_mamba_state()) out.push_back(node->mamba().value[0]);
  }
  return out;
}

std::string RadixTree::pretty_print() const {
  std::ostringstream os;
  os << "RadixTree(page_size=" << page_size_ << ", nodes=" << nodes_.size()
     << ", evictable=" << evictable_size_ << ", protected=" << protected_size_
     << ", host=" << host_total_size_ << ", host_evictable=" << host_evictable_size_;
  if (mamba_) {
    os << ", mamba_evictable=" << mamba_evictable_size_
       << ", mamba_protected=" << mamba_protected_size_;
  }
  if (swa_window_ > 0) {
    os << ", window=" << swa_window_ << ", swa_evictable=" << swa_evictable_size_
       << ", swa_protected=" << swa_protected_size_ << ", swa_host=" << swa_host_size_;
  }
  os << ")\n";
  std::vector<std::pair<const Node*, int>> stack{{root_.get(), 0}};
  while (!stack.empty()) {
    auto [n, depth] = stack.back();
    stack.pop_back();
    os << std::string(static_cast<size_t>(depth) * 2, ' ') << "#" << n->id << " tokens="
       << n->key.size() << " tier=" << (n->evicted() ? "" : "D") << (n->backuped() ? "H" : "")
       << " lock_ref=" << n->full().lock_ref << " host_lock_ref=" << n->full().host_lock_ref
       << " last_access=" << n->last_access;
    if (n->backup_pending != kNoNode) os << " backup_pending=" << n->backup_pending;
    if (n->load_pending != kNoNode) os << " load_pending=" << n->load_pending;
    if (n->load_failed) os << " load_failed";
    if (n->state_backup_pending != kNoNode) os << " state_backup_pending";
    if (n->has_mamba_state()) {
      os << " mamba=" << n->mamba().value[0] << " mamba_lock_ref=" << n->mamba().lock_ref;
    }
    if (n->has_mamba_host_state()) os << " mamba_host=" << n->mamba().host_value[0];
    if (swa_window_ > 0 && !n->is_root()) {
      os << " swa=" << (n->has_swa() ? "D" : "") << (n->has_swa_host() ? "H" : "")
         << " swa_lock_ref=" << n->swa().lock_ref;
    }
    if (n->ns > 0) os << " extra_key=" << namespace_names_[static_cast<size_t>(n->ns)];
    if (!n->key.empty()) {
      os << " key=[";
      const size_t shown = std::min<size_t>(n->key.size(), 8);
      for (size_t i = 0; i < shown; ++i) os << (i ? " " : "") << n->key[i];
      os << (n->key.size() > shown ? " ...]" : "]");
    }
    os << "\n";
    for (const Node* c = n->first_child; c != nullptr; c = c->next_sibling) {
      stack.emplace_back(c, depth + 1);
    }
  }
  return os.str();
}

}  // namespace hicache
