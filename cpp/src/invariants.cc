// RadixTree::check_invariants: every DESIGN.md invariant that applies to the tree, recomputed from
// scratch. Slow (O(tree)); tests call it after every operation.
#include <stdexcept>
#include <unordered_map>
#include <unordered_set>

#include "hicache/radix_tree.h"

namespace hicache {

namespace {

[[noreturn]] void fail(NodeId id, const std::string& what) {
  throw std::logic_error("check_invariants: node " + std::to_string(id) + ": " + what);
}

// Front-to-back access times never increase and (parents_first) a parent in the list is in front
// of its children.
template <typename List>
void check_lru_order(const List& list, size_t expected_members, const char* name,
                     bool parents_first = true) {
  if (list.size() != expected_members) {
    fail(kRootId, std::string(name) + " LRU has " + std::to_string(list.size()) +
                      " members, expected " + std::to_string(expected_members));
  }
  std::unordered_map<const Node*, size_t> position;
  size_t pos = 0;
  const Node* prev = nullptr;
  for (const Node* n = list.front(); n != nullptr; n = List::next_of(n)) {
    if (prev != nullptr && n->last_access > prev->last_access) {
      fail(n->id, std::string(name) + " LRU out of access-time order (after node " +
                      std::to_string(prev->id) + ")");
    }
    position[n] = pos++;
    prev = n;
  }
  if (pos != expected_members) fail(kRootId, std::string(name) + " LRU links are broken");
  if (!parents_first) return;
  for (const auto& [n, p] : position) {
    auto parent = position.find(n->parent);
    if (parent != position.end() && parent->second > p) {
      fail(n->parent->id, std::string("older than its child ") + std::to_string(n->id) + " in the " +
                              name + " LRU");
    }
  }
}

}  // namespace

void RadixTree::check_invariants() const {
  const Node* root = root_.get();
  if (root->id != kRootId || root->parent != nullptr || !root->key.empty()) {
    fail(root->id, "the root must have id 0, no parent and an empty key");
  }
  if (!root->full().has_value || root->full().lock_ref != 0) {
    fail(root->id, "the root must hold the (empty) device value and never be locked");
  }

  if (root->has_swa() || root->has_swa_host() || root->swa().lock_ref != 0) {
    fail(root->id, "the root must hold no SWA KV and no SWA lock");
  }
  if (root->has_mamba_state() || root->mamba().lock_ref != 0) {
    fail(root->id, "the root must hold no Mamba state (its empty prefix needs none)");
  }

  std::unordered_set<SlotIndex> slots;
  std::unordered_set<SlotIndex> host_slots;
  std::unordered_set<SlotIndex> mamba_slots;
  std::unordered_set<SlotIndex> mamba_host_slots;
  std::unordered_set<SlotIndex> swa_host_slots;
  int64_t swa_evictable = 0;
  int64_t swa_protected = 0;
  int64_t swa_host = 0;
  size_t swa_lru_members = 0;
  int64_t mamba_evictable = 0;
  int64_t mamba_protected = 0;
  size_t mamba_lru_members = 0;
  int64_t evictable = 0;
  int64_t protected_tokens = 0;
  int64_t host_total = 0;
  int64_t host_evictable = 0;
  int64_t load_failed = 0;
  size_t reachable = 0;
  size_t lru_members = 0;
  size_t host_lru_members = 0;
  // Slots of one tier of one node: one per token, whole pages, in range, owned once in the tree.
  auto check_tier = [&](const Node* n, const std::vector<SlotIndex>& value, int64_t num_slots,
                        std::unordered_set<SlotIndex>& owned, const char* tier) {
    if (value.size() != n->key.size()) {
      fail(n->id, std::string(tier) + " value has " + std::to_string(value.size()) +
                      " slots for " + std::to_string(n->key.size()) + " tokens");
    }
    for (size_t i = 0; i < value.size(); ++i) {
      const SlotIndex v = value[i];
      if (v < 0 || (num_slots > 0 && v >= num_slots)) {
        fail(n->id, std::string(tier) + " slot " + std::to_string(v) + " out of range");
      }
      if (page_size_ > 1 &&
          v != value[i - i % page_size_] + static_cast<SlotIndex>(i % page_size_)) {
        fail(n->id, std::string(tier) + " value is not made of whole pages at token " +
                        std::to_string(i));
      }
      if (!owned.insert(v).second) {
        fail(n->id, std::string(tier) + " slot " + std::to_string(v) + " owned twice");
      }
    }
  };
  std::vector<const Node*> stack{root};
  while (!stack.empty()) {
    const Node* n = stack.back();
    stack.pop_back();

    int32_t num_children = 0;
    for (const Node* c = n->first_child; c != nullptr; c = c->next_sibling) {
      if (c->parent != n) fail(c->id, "its parent link does not point at node " + std::to_string(n->id));
      ++num_children;
      stack.push_back(c);
    }
    if (num_children != n->num_children) {
      fail(n->id, "num_children " + std::to_string(n->num_children) + " but " +
                      std::to_string(num_children) + " linked children");
    }
    if (n->is_root()) continue;
    ++reachable;

    // Invariant 7: reachable nodes are registered under their id.
    auto it = nodes_.find(n->id);
    if (it == nodes_.end() || it->second.get() != n) fail(n->id, "reachable but not registered");

    // Invariant 5: keys are whole pages; children are indexed by a unique first page.
    if (n->key.empty() || n->key.size() % static_cast<size_t>(page_size_) != 0) {
      fail(n->id, "key length " + std::to_string(n->key.size()) + " is not a positive multiple of "
                      "page_size " + std::to_string(page_size_));
    }
    if (!n->parent->is_root() && n->ns != n->parent->ns) {
      fail(n->id, "extra_key namespace differs from its parent's");
    }
    if (find_child(n->parent, n->ns, n->key.data()) != n) {
      fail(n->id, "not the indexed child of node " + std::to_string(n->parent->id) +
                      " for its first page (duplicate or unindexed first page)");
    }

    const ComponentData& full = n->full();
    // Dead nodes (no KV on any tier) must not exist.
    if (!full.has_value && !full.has_host_value) fail(n->id, "dead: no device and no host value");
    // Invariant 1: a device node's ancestors all have device values.
    if (full.has_value && !n->parent->full().has_value) {
      fail(n->id, "has a device value but its parent " + std::to_string(n->parent->id) +
                      " is evicted");
    }
    // Invariant 2: lock_ref is monotone up the path, and a locked node has device KV. Host locks
    // are path locks too.
    if (full.lock_ref < 0) fail(n->id, "negative lock_ref " + std::to_string(full.lock_ref));
    if (!n->parent->is_root() && full.lock_ref > n->parent->full().lock_ref) {
      fail(n->id, "lock_ref " + std::to_string(full.lock_ref) + " > parent's " +
                      std::to_string(n->parent->full().lock_ref));
    }
    if (full.lock_ref > 0 && !full.has_value) fail(n->id, "locked but has no device value");
    if (full.host_lock_ref < 0) {
      fail(n->id, "negative host_lock_ref " + std::to_string(full.host_lock_ref));
    }
    if (!n->parent->is_root() && full.host_lock_ref > n->parent->full().host_lock_ref) {
      fail(n->id, "host_lock_ref " + std::to_string(full.host_lock_ref) + " > parent's " +
                      std::to_string(n->parent->full().host_lock_ref));
    }

    if (full.has_value) {
      check_tier(n, full.value, num_device_slots_, slots, "device");
      // Invariants 3 and 6: size ledgers; the device LRU holds exactly the unlocked device nodes.
      if (full.lock_ref > 0) {
        protected_tokens += n->num_tokens();
        if (DeviceLru::contains(n)) fail(n->id, "locked but in the device LRU");
      } else {
        evictable += n->num_tokens();
        if (!DeviceLru::contains(n)) fail(n->id, "unlocked device node missing from the device LRU");
        ++lru_members;
      }
    } else if (DeviceLru::contains(n)) {
      fail(n->id, "in the device LRU without a device value");
    } else if (!full.value.empty()) {
      fail(n->id, "evicted but still holds device slots");
    }

    // In-flight transfers (SGLang's sanity_check item 9): a pending backup is of a locked device
    // node that has its host slots; a pending load-back is of a locked device+host node.
    if (n->backup_pending != kNoNode &&
        (!full.has_value || !full.has_host_value || full.lock_ref == 0)) {
      fail(n->id, "backup-pending but not a locked device+host node");
    }
    if (n->load_pending != kNoNode && (!full.has_value || !full.has_host_value || full.lock_ref == 0)) {
      fail(n->id, "load-pending but not a locked device+host node");
    }
    // A failed load's node holds garbage on device: it is kept only while locked (demoted when its
    // last lock goes), and only load-failed nodes sit on device under it.
    if (n->load_failed) {
      if (!full.has_value || !full.has_host_value || full.lock_ref == 0) {
        fail(n->id, "load-failed but not a locked device+host node");
      }
      for (const Node* c = n->first_child; c != nullptr; c = c->next_sibling) {
        if (!c->evicted() && !c->load_failed) {
          fail(c->id, "on device under the load-failed node " + std::to_string(n->id) +
                          " but not load-failed itself");
        }
      }
      load_failed += n->num_tokens();
    }

    if (full.has_host_value) {
      check_tier(n, full.host_value, num_host_slots_, host_slots, "host");
      host_total += n->num_tokens();
    } else if (!full.host_value.empty()) {
      fail(n->id, "not backuped but holds host slots");
    }
    // Invariant 4 / 6 (host): the host LRU holds exactly the host-only, host-unlocked nodes.
    const bool host_evictable_node = !full.has_value && full.has_host_value && full.host_lock_ref == 0;
    if (host_evictable_node != HostLru::contains(n)) {
      fail(n->id, host_evictable_node ? "host-only and host-unlocked but missing from the host LRU"
                                      : "in the host LRU but not host-only and host-unlocked");
    }
    if (host_evictable_node) {
      host_evictable += n->num_tokens();
      ++host_lru_members;
    }

    // Mamba: a state needs the node's device KV (no host states yet); a lock needs a state and is
    // covered by a Full lock on the same node; the Mamba LRU holds exactly the unlocked states.
    const ComponentData& mamba = n->mamba();
    if (mamba.lock_ref < 0) fail(n->id, "negative Mamba lock_ref " + std::to_string(mamba.lock_ref));
    if (n->plain_receipts < 0 || n->plain_receipts + mamba.lock_ref > full.lock_ref) {
      fail(n->id, "receipts taken here (" + std::to_string(n->plain_receipts) + " plain, " +
                      std::to_string(mamba.lock_ref) + " with a Mamba lock) exceed its Full "
                      "lock_ref " + std::to_string(full.lock_ref));
    }
    if (mamba.lock_ref > full.lock_ref) {
      fail(n->id, "Mamba lock_ref " + std::to_string(mamba.lock_ref) + " > Full lock_ref " +
                      std::to_string(full.lock_ref));
    }
    if (mamba.has_value) {
      if (!mamba_) fail(n->id, "holds a Mamba state in a tree without the Mamba component");
      if (!full.has_value) fail(n->id, "holds a Mamba state but no device KV");
      if (mamba.value.size() != 1) fail(n->id, "a Mamba state is one slot");
      const SlotIndex v = mamba.value[0];
      if (v < 0 || (num_mamba_slots_ > 0 && v >= num_mamba_slots_)) {
        fail(n->id, "Mamba slot " + std::to_string(v) + " out of range");
      }
      if (!mamba_slots.insert(v).second) {
        fail(n->id, "Mamba slot " + std::to_string(v) + " owned twice");
      }
      if (mamba.lock_ref > 0) {
        ++mamba_protected;
        if (MambaLru::contains(n)) fail(n->id, "Mamba-locked but in the Mamba LRU");
      } else {
        ++mamba_evictable;
        ++mamba_lru_members;
        if (!MambaLru::contains(n)) fail(n->id, "unlocked Mamba state missing from the Mamba LRU");
      }
    } else {
      if (!mamba.value.empty()) fail(n->id, "a Mamba tombstone that still holds a slot");
      if (mamba.lock_ref != 0) fail(n->id, "a Mamba-locked tombstone");
      if (MambaLru::contains(n)) fail(n->id, "a Mamba tombstone in the Mamba LRU");
    }
    if (n->state_backup_pending != kNoNode &&
        (!mamba.has_host_value || !mamba.has_value || full.lock_ref == 0)) {
      fail(n->id, "state-backup-pending but not a locked node with device and host states");
    }
    // A host state is the backup of a device state: it lives with the node's host KV.
    if (mamba.has_host_value) {
      if (!mamba_) fail(n->id, "holds a host Mamba state in a tree without the Mamba component");
      if (!full.has_host_value) fail(n->id, "holds a host Mamba state but no host KV");
      if (mamba.host_value.size() != 1) fail(n->id, "a host Mamba state is one slot");
      const SlotIndex v = mamba.host_value[0];
      if (v < 0 || (num_mamba_host_slots_ > 0 && v >= num_mamba_host_slots_)) {
        fail(n->id, "host Mamba slot " + std::to_string(v) + " out of range");
      }
      if (!mamba_host_slots.insert(v).second) {
        fail(n->id, "host Mamba slot " + std::to_string(v) + " owned twice");
      }
    } else if (!mamba.host_value.empty()) {
      fail(n->id, "no host Mamba state but a host Mamba slot");
    }

    // SWA: live device SWA KV needs the node's device KV (its SWA slots are found through the
    // Full slots); a host copy needs its host KV; segment locks lie inside the Full path lock;
    // the SWA LRU holds exactly the unlocked live nodes. Locked tombstones are legal.
    const ComponentData& swa = n->swa();
    if (swa.lock_ref < 0) fail(n->id, "negative SWA lock_ref " + std::to_string(swa.lock_ref));
    if (swa.lock_ref > full.lock_ref) {
      fail(n->id, "SWA lock_ref " + std::to_string(swa.lock_ref) + " > Full lock_ref " +
                      std::to_string(full.lock_ref));
    }
    if (!swa.value.empty()) fail(n->id, "device SWA KV is a flag: its value must stay empty");
    if (n->swa_segment_tops < 0 || n->swa_segment_tops > swa.lock_ref) {
      fail(n->id, std::to_string(n->swa_segment_tops) + " SWA segments end here but its SWA "
                      "lock_ref is " + std::to_string(swa.lock_ref));
    }
    if (swa.has_value) {
      if (swa_window_ == 0) fail(n->id, "holds SWA KV in a tree without the SWA component");
      if (!full.has_value) fail(n->id, "holds device SWA KV but no device KV");
      if (swa.lock_ref > 0) {
        swa_protected += n->num_tokens();
        if (SwaLru::contains(n)) fail(n->id, "SWA-locked but in the SWA LRU");
      } else {
        swa_evictable += n->num_tokens();
        ++swa_lru_members;
        if (!SwaLru::contains(n)) fail(n->id, "unlocked SWA KV missing from the SWA LRU");
      }
    } else if (SwaLru::contains(n)) {
      fail(n->id, "an SWA tombstone in the SWA LRU");
    }
    if (swa.has_host_value) {
      if (swa_window_ == 0) fail(n->id, "holds host SWA KV in a tree without the SWA component");
      if (!full.has_host_value) fail(n->id, "holds host SWA KV but no host KV");
      check_tier(n, swa.host_value, num_swa_host_slots_, swa_host_slots, "host SWA");
      swa_host += n->num_tokens();
    } else if (!swa.host_value.empty()) {
      fail(n->id, "no host SWA copy but host SWA slots");
    }
  }
  for (const SlotIndex v : freed_swa_host_) {
    if (!swa_host_slots.insert(v).second) {
      fail(kRootId, "freed host SWA slot " + std::to_string(v) + " also held");
    }
  }
  check_lru_order(swa_lru_, swa_lru_members, "SWA", /*parents_first=*/false);
  if (swa_evictable != swa_evictable_size_ || swa_protected != swa_protected_size_ ||
      swa_host != swa_host_size_) {
    fail(kRootId, "SWA ledger evictable=" + std::to_string(swa_evictable_size_) +
                      " protected=" + std::to_string(swa_protected_size_) +
                      " host=" + std::to_string(swa_host_size_) + " but recomputed " +
                      std::to_string(swa_evictable) + " / " + std::to_string(swa_protected) +
                      " / " + std::to_string(swa_host));
  }

  if (load_failed != load_failed_size_) {
    fail(kRootId, "load-failed ledger " + std::to_string(load_failed_size_) + " but recomputed " +
                      std::to_string(load_failed));
  }
  // Mamba slots waiting in the outboxes: owned by nobody else.
  for (const SlotIndex v : failed_load_states_) {
    if (!mamba_slots.insert(v).second) fail(kRootId, "failed-load state " + std::to_string(v) + " also held");
  }
  for (const SlotIndex v : freed_mamba_host_) {
    if (!mamba_host_slots.insert(v).second) {
      fail(kRootId, "freed host state " + std::to_string(v) + " also held");
    }
  }
  // Slots of demoted load-failed nodes not yet taken by the caller: owned by nobody else.
  for (const SlotIndex v : failed_load_slots_) {
    if (v < 0 || (num_device_slots_ > 0 && v >= num_device_slots_)) {
      fail(kRootId, "failed-load slot " + std::to_string(v) + " out of range");
    }
    if (!slots.insert(v).second) {
      fail(kRootId, "failed-load slot " + std::to_string(v) + " is also held by a node");
    }
  }

  if (reachable != nodes_.size()) {
    fail(kNoNode, std::to_string(nodes_.size() - reachable) + " registered nodes are unreachable");
  }
  if (evictable != evictable_size_ || protected_tokens != protected_size_) {
    fail(kRootId, "size ledger evictable=" + std::to_string(evictable_size_) +
                      " protected=" + std::to_string(protected_size_) + " but recomputed " +
                      std::to_string(evictable) + " / " + std::to_string(protected_tokens));
  }
  if (host_total != host_total_size_ || host_evictable != host_evictable_size_) {
    fail(kRootId, "host size ledger total=" + std::to_string(host_total_size_) +
                      " evictable=" + std::to_string(host_evictable_size_) + " but recomputed " +
                      std::to_string(host_total) + " / " + std::to_string(host_evictable));
  }

  // Invariant 6: LRU order. Front-to-back access times never increase, and a parent in the list is
  // in front of its children, so the back is always an evictable leaf (device: no device child;
  // host: no child at all, since a host-only node's children are host-only and a host-locked
  // child would host-lock its parent).
  check_lru_order(device_lru_, lru_members, "device");
  check_lru_order(host_lru_, host_lru_members, "host");
  // Single-node Mamba locks: an unlocked state may sit under a locked one, so parents need not
  // be in front (its back may be an internal node, which evict_mamba tombstones).
  check_lru_order(mamba_lru_, mamba_lru_members, "Mamba", /*parents_first=*/false);
  if (mamba_evictable != mamba_evictable_size_ || mamba_protected != mamba_protected_size_) {
    fail(kRootId, "Mamba ledger evictable=" + std::to_string(mamba_evictable_size_) +
                      " protected=" + std::to_string(mamba_protected_size_) + " but recomputed " +
                      std::to_string(mamba_evictable) + " / " + std::to_string(mamba_protected));
  }
  if (!host_lru_.empty() && host_lru_.back()->num_children > 0) {
    fail(host_lru_.back()->id, "host LRU back has children");
  }

  size_t indexed = 0;
  for (const auto& [hash, head] : child_index_) {
    for (const Node* c = head; c != nullptr; c = c->hash_next) {
      if (child_hash(c->parent->id, c->ns, c->key.data()) != hash) fail(c->id, "indexed under a stale hash");
      ++indexed;
    }
  }
  if (indexed != nodes_.size()) {
    fail(kRootId, "child index holds " + std::to_string(indexed) + " entries for " +
                      std::to_string(nodes_.size()) + " nodes");
  }
  if (page_hashes_) check_page_hashes();
}

}  // namespace hicache
