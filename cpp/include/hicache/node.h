// A radix-tree node: a run of page-aligned tokens and, per tier and component, the slots holding
// their state.
#pragma once

#include <array>
#include <vector>

#include "hicache/lru_list.h"
#include "hicache/page_hash.h"
#include "hicache/types.h"

namespace hicache {

// Per-component state of one node (SGLang 0.5.23's ComponentData). Full: device and host tiers.
// Mamba: the device tier (one state slot, the recurrent state after the node's last token) and the
// host tier (its backup). SWA: the device tier is a flag (the sliding-window KV of the node's
// tokens is live, found through the Full slots' full -> SWA mapping, so `value` stays empty); the
// host tier holds one host SWA slot per token. A component whose value is missing on a node that
// exists is a tombstone.
struct ComponentData {
  std::vector<SlotIndex> value;       // device slots; Full: one per key token
  std::vector<SlotIndex> host_value;  // host slots; Full: one per key token
  bool has_value = false;             // false with the node present = evicted (Full) / tombstone
  bool has_host_value = false;        // Full: "backuped"
  int32_t lock_ref = 0;       // requests using the device state (path lock for Full)
  int32_t host_lock_ref = 0;  // in-flight host operations (SGLang's host_ref_counter); a path
                              // lock for Full, so a host-locked node's ancestors are host-locked
};

struct Node {
  NodeId id = kNoNode;
  Node* parent = nullptr;
  int32_t ns = 0;          // extra_key namespace id; 0 = none. Same for a whole subtree of the root.
  std::vector<Token> key;  // length is a multiple of page_size (the root's is empty)

  // Children are indexed in the tree's child map by (parent id, ns, first page); these intrusive
  // sibling links only serve traversal (invariant checks, printing, reset).
  Node* first_child = nullptr;
  Node* next_sibling = nullptr;
  Node* prev_sibling = nullptr;
  int32_t num_children = 0;
  // Nodes whose child-map hashes collide are chained through this link (rare; see RadixTree).
  Node* hash_next = nullptr;

  std::array<ComponentData, kNumComponents> comp;

  uint64_t hit_count = 0;  // inserts that walked over this node (write_through_selective uses it)
  // In-flight transfers (SGLang's write_through_pending_id / load_back_pending_id): the ack id of
  // the backup or load-back that is copying this node, kNoNode when none. A split copies them to
  // the new upper node, so an ack or abort reaches every fragment of the node it was issued for.
  NodeId backup_pending = kNoNode;
  NodeId load_pending = kNoNode;
  // Mamba: the ack id of an in-flight backup of the node's state alone (a state published after
  // the node's KV was backed up), kNoNode when none. Not copied by a split: the state stays below.
  NodeId state_backup_pending = kNoNode;
  // Full locks whose receipt names this node and that hold no Mamba lock. With mamba lock_ref
  // (the locks whose receipt names it and that do), dec_lock_ref can tell a receipt given back
  // without its Mamba part. Stays with the node (the receipt's id) on a split.
  int32_t plain_receipts = 0;
  // SWA: window-segment locks whose segment ends at this node (its upper boundary). A split
  // moves them to the new upper node, which is then the segment's end; dec_lock_ref checks that
  // a receipt's segment ends at such a node.
  int32_t swa_segment_tops = 0;
  // A load-back copying this node or an ancestor failed while the node was locked: its device
  // slots hold garbage. Never served (match_prefix stops above it, insert stops at it, nothing is
  // loaded below it); demoted to host-only, its host copy intact, when its last lock is released.
  // Set by abort_load_back, cleared by that demotion.
  bool load_failed = false;
  Tick last_access = 0;
  Tick creation_time = 0;
  // Trees with page hashes (the storage tier): one chained digest per page of key, the page's
  // storage key (hicache/page_hash.h). Set when the node is created, sliced by a split.
  std::vector<Digest> page_hashes;

  // Member of the device LRU while it has a Full device value and Full lock_ref == 0.
  LruHook<Node> device_lru;
  // Member of the host LRU while it is host-only (evicted and backuped) and Full host_lock_ref == 0.
  LruHook<Node> host_lru;
  // Member of the Mamba LRU while it holds a device Mamba state and Mamba lock_ref == 0.
  LruHook<Node> mamba_lru;
  // Member of the SWA LRU while it holds device SWA KV and SWA lock_ref == 0.
  LruHook<Node> swa_lru;

  ComponentData& full() { return comp[static_cast<int>(Component::kFull)]; }
  const ComponentData& full() const { return comp[static_cast<int>(Component::kFull)]; }
  ComponentData& mamba() { return comp[static_cast<int>(Component::kMamba)]; }
  const ComponentData& mamba() const { return comp[static_cast<int>(Component::kMamba)]; }
  ComponentData& swa() { return comp[static_cast<int>(Component::kSwa)]; }
  const ComponentData& swa() const { return comp[static_cast<int>(Component::kSwa)]; }
  bool has_swa() const { return swa().has_value; }  // false: an SWA tombstone on device
  bool has_swa_host() const { return swa().has_host_value; }
  bool has_mamba_state() const { return mamba().has_value; }  // false: a Mamba tombstone
  bool has_mamba_host_state() const { return mamba().has_host_value; }
  int64_t num_tokens() const { return static_cast<int64_t>(key.size()); }
  bool evicted() const { return !full().has_value; }     // SGLang's `evicted` (no device KV)
  bool backuped() const { return full().has_host_value; }  // SGLang's `backuped` (host KV)
  bool is_root() const { return parent == nullptr; }
};

}  // namespace hicache
