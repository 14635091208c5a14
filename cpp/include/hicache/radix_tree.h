// The radix tree over page-aligned token keys: match, insert, split, locks, LRU eviction, and the
// host (L2) tier of SGLang's HiRadixCache: host values, demotion, host eviction, load-back plans.
//
// Node states (Full component): device-only, device+host ("backuped"), host-only ("evicted"). A
// node with neither does not exist. Device nodes form a root-anchored prefix of every path, so a
// path is some device nodes followed by some host-only nodes (DESIGN.md invariant 1).
//
// Load-backs (host -> device) are committed before their copy runs: the loaded nodes are device
// nodes at once, load-pending until the ack, and a request may match and lock them meanwhile
// (it waits for the copy's layer events). If the copy fails, their device slots hold garbage:
//   - insert never walks into a load-pending or load-failed node: it stops there and the caller
//     keeps its own (valid) slots from there on, so no device node is ever created under a node
//     whose KV may turn out to be garbage, and no caller's valid KV is traded for it;
//   - abort_load_back marks the load's nodes and every device node below them (other loads
//     chained under them) load_failed; a load-failed node is never served (match_prefix stops
//     above it) and nothing is loaded under it; it is demoted back to host-only as soon as no
//     lock holds it (at once, or by the dec_lock_ref that releases its last lock). Its device
//     slots are then handed back through take_failed_load_slots().
//
// Mamba component (a tree built with mamba = true; hybrid Mamba + attention models, SGLang's
// UnifiedRadixCache with FULL + MAMBA): a node may hold one device state slot, the recurrent state
// after its last token, and one host state slot, its backup; a node without a state on a tier is a
// Mamba tombstone there.
//   - match_prefix ends where the deepest matched node holding a usable state ends (the root's
//     empty prefix always validates): a device node with a device state, or a host-only node with
//     a host state (then the load-back of best_match_node loads that state with the KV). A request
//     can only continue from a state. The Full tokens matched beyond it are reported as
//     mamba_branching_seqlen (where the scheduler may checkpoint anew).
//   - backups carry the node's device state when it has one (TransferPlan::states, commit_backup's
//     host_state); demotion keeps the host state, so the node stays matchable from host; a
//     load-back brings the anchor's host state back (commit_load_back's device_state). Host states
//     freed inside the tree (host eviction, failed backups, the cascade) wait in an outbox for
//     take_freed_mamba_host_slots(); device states of failed loads in take_failed_load_states().
//   - insert gives the node that ends the key the caller's state unless it has one
//     (mamba_exist: the caller frees its copy) or the walk stopped early (the caller keeps it).
//   - inc_lock_ref also locks the state of the node it locks (a single-node lock; the receipt's
//     mamba_node_id), dec_lock_ref releases it and rejects a receipt that names no Mamba lock.
//   - a split leaves the state (and its lock) on the lower node, which keeps the id and the end.
//   - Full eviction frees the states of the nodes it demotes, drops or trims. evict_mamba frees
//     the least recently used unlocked states (internal nodes become tombstones).
//   - Tombstone cascade (failure class 5): a childless node with no state on either tier is useless
//     and is deleted with its Full KV, and so is its parent if that is now one too, and so on; the
//     cascade stops
//     at any node that is locked or host-locked in any component, has a transfer pending, or is
//     load-failed.
//
// SWA component (a tree built with sliding_window_size > 0; hybrid sliding-window attention
// models, SGLang's UnifiedRadixCache with FULL + SWA): the sliding-window layers' KV of a token is
// read only by the next sliding_window_size tokens, so older tokens may drop it and keep their Full
// KV. A node's device SWA KV is a flag: its Full slots' SWA slots (the pool's full -> SWA mapping)
// are live; a node without it is an SWA tombstone. A host copy is one host SWA slot per token.
//   - match_prefix ends where a continuous run of at least sliding_window_size tokens with SWA KV
//     (a device node's device SWA, a host-only node's host SWA) ends, or where every node from the
//     root has it (SGLang's SWA validator, reference section 3.1); the Full tokens matched beyond
//     it are swa_branching_seqlen.
//   - insert's swa_evicted_seqlen (page-floored) says the caller has already freed the SWA KV of
//     value[0:swa_evicted_seqlen] (SGLang's req.swa_evicted_seqlen) and that its other own slots
//     are SWA-mapped: new nodes below it are SWA tombstones, above it live (a node is cut there);
//     a device SWA tombstone above it on the path takes the caller's SWA KV (the cache moves the
//     mapping: InsertResult::swa_remap_dst/src); a host-only node adopting the caller's slots is
//     live above it. A new live leaf longer than one page-aligned window is cut to a one-window
//     tail, so that a lock on it pins one window of SWA KV (SGLang's
//     _maybe_split_leaf_for_swa_lock).
//   - inc_lock_ref also locks the SWA of the window ending at the locked node: nodes from it
//     upwards until sliding_window_size tokens are covered (a segment lock; the receipt's
//     swa_lock_tokens, which stays exact across splits). dec_lock_ref takes it back.
//   - evict_swa frees the least recently used unlocked SWA KV: a device leaf goes whole through
//     the Full path; an internal node becomes an SWA tombstone, and its Mamba state goes with it
//     (SGLang's cascade SWA -> Mamba). Full eviction frees the SWA of the nodes it demotes or drops
//     (the caller frees the SWA side of every Full slot it gets back, skipping unmapped ones).
//   - backups carry the node's SWA KV when it is live (TransferPlan::swa; commit_backup's
//     host_swa); demotion keeps the host copy; a load-back brings it back (TransferPlan::swa_indices)
//     and the loaded nodes with a host copy are SWA-live again. Host SWA slots freed inside the tree
//     wait in the take_freed_swa_host_slots() outbox.
//   - the tombstone cascade treats a childless node with SWA on neither tier as useless.
//   - storage tier: storage_backup_plan names the host SWA copies that go to storage with the
//     pages; insert_host takes the host SWA slots of a prefetch's window (its last pages) and
//     gives exactly the nodes covering it host SWA copies, so that the window validates.
//
// Single-threaded: the Python cache serialises every call with one lock (DESIGN.md, threading
// contract). Errors: std::invalid_argument for a bad argument, std::out_of_range for an unknown id
// or an out-of-range slot, std::logic_error for a broken invariant. A call that throws
// invalid_argument or out_of_range has changed nothing.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "hicache/lru_list.h"
#include "hicache/node.h"
#include "hicache/types.h"

namespace hicache {

struct MatchResult {
  std::vector<SlotIndex> device_indices;  // the tree's device slots of the matched prefix
  NodeId last_device_node = kRootId;      // deepest matched node with device KV
  NodeId last_host_node = kRootId;        // deepest matched node with KV on device or host
  NodeId best_match_node = kRootId;       // deepest node every component accepts (load anchor)
  // Tokens validated below last_device_node, loaded back by best_match_node's load-back. Host-only
  // tokens, except in SWA trees, where a device SWA tombstone above a host-only window counts
  // too (SGLang's best_match_device_node rule; the load-back brings only the host-only nodes).
  int64_t host_hit_length = 0;
  // Mamba trees: the Full tokens matched (page-aligned), when more than the validated prefix
  // (device_indices + host_hit_length); -1 otherwise (SGLang's mamba_branching_seqlen).
  int64_t mamba_branching_seqlen = -1;
  // SWA trees: the same for the SWA validator (SGLang's swa_branching_seqlen).
  int64_t swa_branching_seqlen = -1;
};

struct InsertResult {
  // Tokens of the aligned key already on device in the tree: the caller's duplicates. Host-only
  // nodes on the path adopt the caller's slots (SGLang's _unevict_node_on_insert) and do not count.
  int64_t prefix_len = 0;
  NodeId last_node = kRootId;
  int64_t adopted_len = 0;  // tokens of host-only nodes that took the caller's slots
  // Tokens of the aligned key the tree holds after the insert: the aligned length, or prefix_len
  // when the walk stopped at a load-pending or load-failed node. The tree owns
  // value[prefix_len:cached_len]; the caller keeps value[cached_len:].
  int64_t cached_len = 0;
  // Mamba trees, with a state given: the node ending the key already had one (the caller frees
  // its copy; SGLang's mamba_exist), or the tree took the caller's state slot.
  bool mamba_exist = false;
  bool mamba_taken = false;
  // SWA trees: device SWA tombstones on the path that took the caller's SWA KV. The caller points
  // the SWA mapping of each swa_remap_dst[i] (the node's Full slot) at the SWA slot of
  // swa_remap_src[i] (its own Full slot, a duplicate it then frees Full-only).
  std::vector<SlotIndex> swa_remap_dst;
  std::vector<SlotIndex> swa_remap_src;
  // insert_host in SWA trees: the given host SWA slots the tree did not take (their tokens are
  // on nodes that have SWA KV already, on device nodes, or past a stop); the caller frees them.
  std::vector<SlotIndex> swa_host_spare;
};

// What inc_lock_ref locked: the deepest device node at or above the node asked for (locking skips
// the evicted bottom of the path). dec_lock_ref takes node_id back (SGLang's lock receipt).
struct LockReceipt {
  NodeId node_id = kRootId;
  int64_t delta = 0;  // tokens moved from evictable to protected
  NodeId mamba_node_id = kNoNode;  // Mamba trees: node_id if its state was locked too
  // SWA trees: tokens of the SWA window segment locked upwards from node_id (0 at the root).
  int64_t swa_lock_tokens = 0;
};

// What evict did. The caller frees the slots in their pools.
struct EvictResult {
  std::vector<SlotIndex> device_freed;
  std::vector<SlotIndex> host_freed;  // host slots of host-only nodes dropped with an unbacked leaf
  int64_t demoted_tokens = 0;         // backuped tokens that stayed in the tree as host-only
  // Device tokens removed from the tree: unbacked ones, and (Mamba trees) those of the tombstone
  // cascade, which takes any host copy too (a demoted victim it deletes counts here).
  int64_t dropped_tokens = 0;
  // write_back only: the LRU device leaf is not backed up; back it up (commit_backup), then evict
  // again. Already trimmed to the pages this call still had to free. kNoNode otherwise.
  NodeId needs_backup = kNoNode;
  std::vector<SlotIndex> mamba_freed;  // Mamba state slots freed (Mamba trees)
  // SWA trees: Full slots of nodes that became SWA tombstones and keep their Full KV; the caller
  // frees their SWA side only. (The SWA side of device_freed is the caller's to free too.)
  std::vector<SlotIndex> swa_freed;
};

// Nodes and slots of a backup (device -> host) or load-back (host -> device), root-first:
// indices are the concatenated source slots (device slots for a backup, host slots for a load).
struct TransferPlan {
  std::vector<NodeId> nodes;
  std::vector<int64_t> lengths;  // tokens per node
  std::vector<SlotIndex> indices;
  // Mamba trees, one per node: the source state slot that goes with it (device state for a
  // backup, the anchor's host state for a load-back), -1 for none.
  std::vector<SlotIndex> states;
  // SWA trees, one per node: its SWA KV goes along (backup: it is live on device; load-back: it
  // has a host copy), and for a load-back the host SWA slots of those nodes, root-first.
  std::vector<uint8_t> swa;
  std::vector<SlotIndex> swa_indices;
};

struct NodeInfo {
  NodeId node_id = kNoNode;
  NodeId parent_id = kNoNode;
  int64_t num_tokens = 0;
  int64_t num_children = 0;
  int64_t lock_ref = 0;
  int64_t host_ref_counter = 0;
  uint64_t hit_count = 0;
  Tick last_access_time = 0;
  bool has_device_value = false;
  bool has_host_value = false;  // host slots assigned (at the backup's commit)
  bool backup_pending = false;  // its device -> host copy has not been acknowledged yet
  bool load_pending = false;    // its host -> device copy has not been acknowledged yet
  bool load_failed = false;     // its device KV is garbage of a failed load; never served
  bool has_mamba_value = false;  // holds a device Mamba state (Mamba trees)
  SlotIndex mamba_value = -1;    // its slot, -1 without one
  int64_t mamba_lock_ref = 0;
  bool has_mamba_host_value = false;  // holds a host Mamba state (its backup)
  SlotIndex mamba_host_value = -1;
  bool has_swa_value = false;       // device SWA KV live (SWA trees)
  int64_t swa_lock_ref = 0;
  bool has_swa_host_value = false;  // host SWA copy
  std::string extra_key;
  bool has_extra_key = false;
};

class RadixTree {
 public:
  // page_size: tokens per page (>= 1). num_device_slots / num_host_slots / num_mamba_slots: if > 0,
  // slots handed to the tree must be below them (0 = unchecked). mamba: add the Mamba component.
  // sliding_window_size > 0: add the SWA component with that window in tokens;
  // num_swa_host_slots bounds host SWA slots like the others.
  RadixTree(int64_t page_size, int64_t num_device_slots, int64_t num_host_slots = 0,
            bool mamba = false, int64_t num_mamba_slots = 0, int64_t num_mamba_host_slots = 0,
            int64_t sliding_window_size = 0, int64_t num_swa_host_slots = 0);
  ~RadixTree();
  RadixTree(const RadixTree&) = delete;
  RadixTree& operator=(const RadixTree&) = delete;

  int64_t page_size() const { return page_size_; }
  int64_t num_device_slots() const { return num_device_slots_; }
  int64_t num_host_slots() const { return num_host_slots_; }
  bool has_mamba() const { return mamba_; }
  bool has_swa() const { return swa_window_ > 0; }
  int64_t sliding_window_size() const { return swa_window_; }

  // Longest cached prefix of key[0:len] floored to page_size, in the namespace `extra_key`
  // (empty = none), through device and host-only nodes; it stops above a load-failed node.
  // Splits the node where the match ends inside it, then touches the matched path deepest-first.
  // O(matched tokens).
  MatchResult match_prefix(const Token* key, size_t len, std::string_view extra_key);

  // Inserts key[0:floor(len)] with device slots value[0:floor(len)]; value_len must equal len.
  // Device nodes keep their slots; host-only nodes on the path adopt value[...] for their tokens;
  // the new tail takes the rest. Counts a hit on every node walked. Touches the path. Stops at a
  // load-pending or load-failed node (see cached_len): nothing is inserted from there on.
  // Mamba trees: mamba_value >= 0 is the state after the aligned key (see InsertResult).
  // SWA trees: swa_evicted_seqlen, see the header comment (0 for non-SWA trees).
  InsertResult insert(const Token* key, size_t len, const SlotIndex* value, size_t value_len,
                      std::string_view extra_key, SlotIndex mamba_value = -1,
                      int64_t swa_evicted_seqlen = 0);

  // Path locks (SGLang inc_lock_ref / dec_lock_ref on the Full component). inc locks from the
  // deepest device node at or above `id` up to the root and returns that node as the receipt; dec
  // takes the receipt's node. dec touches nodes released to 0 and demotes load-failed nodes
  // released to 0 (their device slots go to take_failed_load_slots). dec throws invalid_argument
  // if it would release a load-failed node whose own load is still pending: a load's lock is
  // released after its finish_load_back / abort_load_back.
  // Mamba trees: see the header comment (receipt.mamba_node_id goes back to dec_lock_ref).
  // SWA trees: receipt.swa_lock_tokens goes back to dec_lock_ref, which rejects a count that does
  // not end on a locked segment's boundary.
  LockReceipt inc_lock_ref(NodeId id);
  int64_t dec_lock_ref(NodeId id, NodeId mamba_node_id = kNoNode, int64_t swa_lock_tokens = 0);

  // Host path locks (SGLang's host_ref_counter): protect the host KV of `id` and its ancestors
  // from evict_host and from removal while a host operation is in flight. Return the host tokens
  // moved out of (inc) or back into (dec) the host-evictable set; dec touches released nodes.
  int64_t inc_host_lock_ref(NodeId id);
  int64_t dec_host_lock_ref(NodeId id);

  // Frees ceil(num_tokens / page_size) pages of device KV (fewer if not enough is evictable),
  // least recently used first, from the LRU leaf's tail. A backuped victim is demoted (stays as
  // host-only); an unbacked one is dropped, unless write_back, where the call stops and names it
  // in needs_backup. An unbacked leaf whose host-only subtree is host-locked stops the call.
  EvictResult evict(int64_t num_tokens, bool write_back);

  // Frees ceil(num_tokens / page_size) pages of host KV from host-only leaves, least recently
  // used first, never a host-locked node (SGLang's evict_host). Returns the freed host slots.
  std::vector<SlotIndex> evict_host(int64_t num_tokens);

  // Mamba trees: frees num_states device states, least recently used first, never a locked one.
  // The victim becomes a tombstone; a childless one is then deleted by the tombstone cascade
  // (its Full slots are in the result too). write_back: a victim without a host copy is not
  // tombstoned; the call stops and names it in needs_backup (back it up, state included, then
  // evict again; SGLang's InternalStateBackup, PR #28468).
  EvictResult evict_mamba(int64_t num_states, bool write_back = false);

  // SWA trees: frees ceil(num_tokens / page_size) pages of device SWA KV, least recently used
  // first, never a locked one: a device leaf (no device child, unlocked) is evicted whole like
  // evict does (its Full slots in device_freed); an internal node becomes an SWA tombstone (its
  // Full slots in swa_freed) and loses its Mamba state. write_back: an unbacked victim stops the
  // call in needs_backup (back it up first, SGLang PR #28468).
  EvictResult evict_swa(int64_t num_tokens, bool write_back = false);

  // Device nodes on the path root..id without a host value and with hit_count >= min_hit_count,
  // root-first, with their device slots: what write-through must back up.
  TransferPlan backup_plan(NodeId id, uint64_t min_hit_count) const;
  // Gives device node `id` (no host value yet) the host slots host[0:len], len = its tokens, and
  // marks it backup-pending with ack id `id`. Called when the backup is queued (SGLang's
  // commit_backup); the caller keeps the node locked until finish_backup or abort_backup. Mamba
  // trees: host_state >= 0 is the host slot of the node's device state's backup.
  // SWA trees: host_swa[0:host_swa_len] are the host SWA slots of its live SWA KV (len tokens, or
  // none: then the node has no host SWA copy).
  void commit_backup(NodeId id, const SlotIndex* host, size_t len, SlotIndex host_state = -1,
                     const SlotIndex* host_swa = nullptr, size_t host_swa_len = 0);
  // The copy of backup `ack_id` finished: clears the pending mark on its node and fragments.
  void finish_backup(NodeId ack_id);
  // Mamba trees, incremental backups (SGLang's needs_incremental_backup): the nodes on the path
  // root..id whose KV is backed up (no backup in flight) but whose device state has no host copy
  // (published after the KV's backup), root-first, with those states (lengths 0, no indices).
  TransferPlan state_backup_plan(NodeId id) const;
  // Gives such a node the host slot of its state's backup, pending under ack id `id` until
  // finish_state_backup or abort_state_backup; the caller keeps the node locked until then.
  void commit_state_backup(NodeId id, SlotIndex host_state);
  void finish_state_backup(NodeId ack_id);
  // The copy failed: the host state goes to take_freed_mamba_host_slots.
  void abort_state_backup(NodeId ack_id);
  // The copy of backup `ack_id` failed: its node and fragments lose their host value again (the
  // host bytes are garbage and must never be served). Returns the host slots to free (a host
  // state goes to take_freed_mamba_host_slots).
  std::vector<SlotIndex> abort_backup(NodeId ack_id);

  // The host-only nodes from the deepest device ancestor of `anchor` down to anchor, root-first,
  // with their host slots: what load_back must copy. Empty if anchor is on device, or if that
  // ancestor is load-failed (nothing is loaded under garbage). That ancestor may be load-pending:
  // loads chain under an in-flight load.
  TransferPlan load_back_plan(NodeId anchor) const;
  // Gives those nodes the device slots device[0:len] (len = the plan's tokens); they become
  // device+host nodes, unlocked, load-pending with ack id `anchor`. Called when the load is queued
  // (SGLang's commit_load_back); the caller locks anchor until after finish_ or abort_load_back.
  // invalid_argument if anchor is host-only under a load-failed node. Mamba trees: device_state is
  // the device slot for the plan's state (required iff the plan has one).
  void commit_load_back(NodeId anchor, const SlotIndex* device, size_t len,
                        SlotIndex device_state = -1);
  // The load `ack_id` finished: clears the pending mark on its nodes (a node that is load-failed
  // because a load above it failed stays so).
  void finish_load_back(NodeId ack_id);
  // The load `ack_id` failed: clears the pending marks and marks its nodes, and every device node
  // below them, load-failed; those nobody locks are demoted at once, the others when their last
  // lock is released (their device slots go to take_failed_load_slots either way). Returns the
  // tokens of the failed load's nodes. invalid_argument (nothing changed) if a node below is
  // pending under another load but unlocked (a load's lock must be held until its ack).
  int64_t abort_load_back(NodeId ack_id);
  // Device slots of load-failed nodes demoted since the last call: no longer in the tree, still
  // owned by it until taken. The caller frees them. O(slots).
  std::vector<SlotIndex> take_failed_load_slots();
  // Mamba trees: device states of those demoted load-failed nodes (their loads' states), and host
  // states freed inside the tree since the last call (evict_host, abort_backup, the cascade of
  // evict_host, evictions dropping host-only subtrees). The caller frees them. O(slots).
  std::vector<SlotIndex> take_failed_load_states();
  std::vector<SlotIndex> take_freed_mamba_host_slots();
  // SWA trees: host SWA slots freed inside the tree since the last call. The caller frees them.
  std::vector<SlotIndex> take_freed_swa_host_slots();

  int64_t evictable_size() const { return evictable_size_; }
  int64_t protected_size() const { return protected_size_; }
  int64_t total_size() const { return evictable_size_ + protected_size_; }
  // Host tokens in the tree; evictable = in host-only, host-unlocked nodes.
  int64_t host_total_size() const { return host_total_size_; }
  int64_t host_evictable_size() const { return host_evictable_size_; }
  int64_t host_protected_size() const { return host_total_size_ - host_evictable_size_; }
  // Device tokens in load-failed nodes (locked, garbage, waiting for their last unlock); 0 means
  // no dec_lock_ref can demote anything.
  int64_t load_failed_size() const { return load_failed_size_; }
  // Mamba states in the tree, unlocked / locked.
  int64_t mamba_evictable_size() const { return mamba_evictable_size_; }
  int64_t mamba_protected_size() const { return mamba_protected_size_; }
  // SWA tokens in the tree with device SWA KV, unlocked / locked; host SWA tokens.
  int64_t swa_evictable_size() const { return swa_evictable_size_; }
  int64_t swa_protected_size() const { return swa_protected_size_; }
  int64_t swa_host_size() const { return swa_host_size_; }
  int64_t num_nodes() const { return static_cast<int64_t>(nodes_.size()); }  // excluding root

  bool contains_node(NodeId id) const { return id == kRootId || nodes_.count(id) != 0; }
  NodeInfo node_info(NodeId id) const;
  // Ids of every node but the root, parents before children (inspection, not the request path).
  std::vector<NodeId> node_ids() const;
  // A copy of a node's key (its own tokens, not its path's); the root's is empty.
  std::vector<Token> node_key(NodeId id) const;
  std::vector<SlotIndex> all_device_indices() const;
  std::vector<SlotIndex> all_host_indices() const;
  std::vector<SlotIndex> all_mamba_indices() const;
  std::vector<SlotIndex> all_mamba_host_indices() const;
  // SWA trees: the Full slots of nodes with live device SWA KV; the host SWA slots.
  std::vector<SlotIndex> all_swa_indices() const;
  std::vector<SlotIndex> all_swa_host_indices() const;

  // Drops every node; returns their device slots and any not yet taken by take_failed_load_slots
  // (all_host_indices() and all_mamba_indices() first for the others). Throws invalid_argument if anything is locked or
  // host-locked.
  std::vector<SlotIndex> reset();

  std::string pretty_print() const;

  // Checks every invariant of DESIGN.md that applies; throws logic_error naming the node.
  void check_invariants() const;

  // ---- storage tier (cpp/src/tree_storage.cc) ----
  // Page hashes (SGLang's hash_value, reference §6.1): from now on every node created gets one
  // chained SHA-256 digest per page of its key, seeded by namespace_seed(extra_key) under a
  // namespace, and a split slices them. Off by default (the insert path then hashes nothing).
  // invalid_argument unless the tree is empty.
  void enable_page_hashes();
  bool has_page_hashes() const { return page_hashes_; }
  // The digests of a node's pages / of every page on the path root..node, root-first.
  // invalid_argument without page hashes; out_of_range for an unknown id.
  std::vector<Digest> node_page_hashes(NodeId id) const;
  std::vector<Digest> path_page_hashes(NodeId id) const;
  // Inserts key[0:floor(len)] below `anchor` (the tokens that follow anchor's path) as
  // host-only nodes holding the host slots host[0:floor(len)]: pages prefetched from storage
  // (SGLang's insert_host / _insert_helper_host, reference §3.8). Nodes already there keep their
  // values (the caller frees host[0:prefix_len], its duplicates, and host[cached_len:]); the new
  // tail node is host-only (evicted + backuped), host-unlocked, in the host LRU, and gets page
  // hashes. Stops, like insert, at a load-pending or load-failed node (cached_len < aligned).
  // No hit is counted; the path is touched. extra_key: the namespace, used below the root and
  // checked against the anchor's elsewhere. host_len must equal len. Mamba trees: required
  // mamba_host_value, the host state after the aligned key; the node ending the key takes it
  // (mamba_taken) if that node has host KV and no host state (a new leaf always takes it), else
  // the caller frees it (mamba_exist: the node had one). invalid_argument: lengths, a
  // load-failed anchor, another namespace, a state missing in a Mamba tree or given to another;
  // out_of_range: unknown anchor, a host slot or state outside its pool. O(len).
  // SWA trees: host_swa[0:host_swa_len] (required: whole pages, 0 < host_swa_len <= the aligned
  // key) are the host SWA slots of the key's last host_swa_len tokens, the window a prefetch
  // read (reference §3.11). The nodes covering them get host SWA copies: the new tail (split so
  // that exactly its window part has one) and host-only nodes on the path without one (split at
  // the window's start); the slots of the other tokens come back in swa_host_spare.
  InsertResult insert_host(NodeId anchor, const Token* key, size_t len, const SlotIndex* host,
                           size_t host_len, std::string_view extra_key,
                           SlotIndex mamba_host_value = -1, const SlotIndex* host_swa = nullptr,
                           size_t host_swa_len = 0);
  // The nodes of backup `ack_id` (its node and the fragments split off above it: the nodes on
  // the path root..ack_id marked backup-pending with ack_id), root-first, with their host slots:
  // what goes to storage once that device -> host copy is acknowledged (SGLang's
  // write_backup_storage for every fragment). Call it before finish_backup. Empty if none.
  // SWA trees: swa flags the nodes with a host SWA copy, swa_indices their host SWA slots
  // (stored under the same page hashes in the SWA backend).
  TransferPlan storage_backup_plan(NodeId ack_id) const;

 private:
  using DeviceLru = LruList<Node, &Node::device_lru>;
  using HostLru = LruList<Node, &Node::host_lru>;
  using MambaLru = LruList<Node, &Node::mamba_lru>;
  using SwaLru = LruList<Node, &Node::swa_lru>;

  Node* node_by_id(NodeId id, const char* caller) const;
  int32_t namespace_id(std::string_view extra_key, bool create);
  uint64_t child_hash(NodeId parent, int32_t ns, const Token* page) const;
  Node* find_child(Node* parent, int32_t ns, const Token* page) const;
  void index_child(Node* parent, Node* child);
  void unindex_child(Node* parent, Node* child);
  void link_child(Node* parent, Node* child);
  void unlink_child(Node* parent, Node* child);
  size_t common_pages_len(const Node* node, const Token* key, size_t len) const;
  Node* split(Node* node, size_t prefix_len);
  void touch_path(Node* node);
  void touch(Node* node);
  void destroy_leaf(Node* node);
  void demote(Node* node, EvictResult& result);
  void demote_failed(Node* node);
  std::vector<Node*> load_path(Node* anchor) const;
  template <NodeId Node::*Mark>
  std::vector<Node*> pending_nodes(NodeId ack_id, const char* caller) const;
  bool drop_unbacked(Node* node, EvictResult& result);
  bool evict_leaf(Node* victim, int64_t& pages, bool write_back, EvictResult& result);
  Node* add_leaf(Node* parent, int32_t ns, const Token* key, const SlotIndex* value, size_t len,
                 bool swa_live);
  void set_swa(Node* node);
  void drop_swa(Node* node);
  void free_swa_host(Node* node, size_t keep = 0);
  void trim_tail(Node* node, size_t keep);
  void free_mamba(Node* node, std::vector<SlotIndex>& freed);
  void free_mamba_host(Node* node);
  bool useless_tombstone(const Node* node) const;
  void delete_tombstones(Node* node, EvictResult& result, bool device_ok);
  void check_slots(const char* caller, const SlotIndex* slots, size_t len, int64_t num_slots,
                   const char* pool) const;
  NodeId mint_id() { return next_id_++; }
  void hash_new_node(Node* node);
  void slice_page_hashes(Node* lower, Node* upper, size_t prefix_len);
  Node* give_swa_host(Node* node, size_t start, size_t window_start, const SlotIndex* host_swa,
                      std::vector<uint8_t>& taken);
  void check_page_hashes() const;

  const int64_t page_size_;
  const int64_t num_device_slots_;
  const int64_t num_host_slots_;
  const bool mamba_;
  const int64_t num_mamba_slots_;
  const int64_t num_mamba_host_slots_;
  const int64_t swa_window_;
  const int64_t num_swa_host_slots_;
  std::unique_ptr<Node> root_;
  // Owner of every non-root node, keyed by id: resolves ids crossing the boundary.
  std::unordered_map<NodeId, std::unique_ptr<Node>> nodes_;
  // (parent id, namespace, first page) hash -> child; colliding children chain via Node::hash_next.
  std::unordered_map<uint64_t, Node*> child_index_;
  std::unordered_map<std::string, int32_t> namespaces_;
  std::vector<std::string> namespace_names_;  // index = namespace id; [0] = "" (none)
  DeviceLru device_lru_;  // unlocked nodes with device KV; back = least recently used
  HostLru host_lru_;      // host-only, host-unlocked nodes; back = least recently used
  // Nodes with a Mamba state and no Mamba lock; back = least recently used. Unlike the device
  // LRU its back may be an internal node (single-node locks): evicting it leaves a tombstone.
  MambaLru mamba_lru_;
  int64_t mamba_evictable_size_ = 0;
  int64_t mamba_protected_size_ = 0;
  // Nodes with device SWA KV and no SWA lock; back = least recently used (may be internal).
  SwaLru swa_lru_;
  int64_t swa_evictable_size_ = 0;
  int64_t swa_protected_size_ = 0;
  int64_t swa_host_size_ = 0;
  std::vector<SlotIndex> freed_swa_host_;  // host SWA slots freed inside the tree, until taken
  int64_t evictable_size_ = 0;
  int64_t protected_size_ = 0;
  int64_t host_total_size_ = 0;
  int64_t host_evictable_size_ = 0;
  int64_t load_failed_size_ = 0;
  // Device slots of demoted load-failed nodes, until take_failed_load_slots hands them over: the
  // demotion happens inside dec_lock_ref, whose result is a token count.
  std::vector<SlotIndex> failed_load_slots_;
  std::vector<SlotIndex> failed_load_states_;  // same, their device Mamba states
  // Host Mamba states freed inside the tree, until take_freed_mamba_host_slots hands them over
  // (freed by calls whose results are host KV slots only).
  std::vector<SlotIndex> freed_mamba_host_;
  NodeId next_id_ = kRootId + 1;
  Tick tick_ = 0;
  bool page_hashes_ = false;  // set once, on an empty tree, by enable_page_hashes
};

}  // namespace hicache
