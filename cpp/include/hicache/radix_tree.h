// The radix tree over page-aligned token keys: match, insert, split, locks, LRU eviction.
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
  int64_t host_hit_length = 0;            // tokens matched on host only, below last_device_node
};

struct InsertResult {
  int64_t prefix_len = 0;  // tokens of the aligned key already in the tree (caller's duplicates)
  NodeId last_node = kRootId;
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
  std::string extra_key;
  bool has_extra_key = false;
};

class RadixTree {
 public:
  // page_size: tokens per page (>= 1). num_device_slots: if > 0, inserted slots must be below it.
  RadixTree(int64_t page_size, int64_t num_device_slots);
  ~RadixTree();
  RadixTree(const RadixTree&) = delete;
  RadixTree& operator=(const RadixTree&) = delete;

  int64_t page_size() const { return page_size_; }
  int64_t num_device_slots() const { return num_device_slots_; }

  // Longest cached prefix of key[0:len] floored to page_size, in the namespace `extra_key`
  // (empty = none). Splits the node where the match ends inside it, then touches the matched
  // path deepest-first. O(matched tokens).
  MatchResult match_prefix(const Token* key, size_t len, std::string_view extra_key);

  // Inserts key[0:floor(len)] with device slots value[0:floor(len)]; value_len must equal len.
  // Existing nodes keep their slots; only the new tail takes value[prefix_len:]. Touches the path.
  InsertResult insert(const Token* key, size_t len, const SlotIndex* value, size_t value_len,
                      std::string_view extra_key);

  // Path locks (SGLang inc_lock_ref / dec_lock_ref on the Full component). Return the number of
  // tokens moved from evictable to protected (inc) or back (dec). dec touches nodes released to 0.
  int64_t inc_lock_ref(NodeId id);
  int64_t dec_lock_ref(NodeId id);

  // Frees ceil(num_tokens / page_size) pages of device KV (fewer if not enough is evictable),
  // least recently used first, trimming the LRU leaf from its tail. Returns the freed slots.
  std::vector<SlotIndex> evict(int64_t num_tokens);

  int64_t evictable_size() const { return evictable_size_; }
  int64_t protected_size() const { return protected_size_; }
  int64_t total_size() const { return evictable_size_ + protected_size_; }
  int64_t num_nodes() const { return static_cast<int64_t>(nodes_.size()); }  // excluding root

  bool contains_node(NodeId id) const { return id == kRootId || nodes_.count(id) != 0; }
  NodeInfo node_info(NodeId id) const;
  std::vector<SlotIndex> all_device_indices() const;

  // Drops every node; returns their device slots. Throws invalid_argument if anything is locked.
  std::vector<SlotIndex> reset();

  std::string pretty_print() const;

  // Checks every invariant of DESIGN.md that applies; throws logic_error naming the node.
  void check_invariants() const;

 private:
  using DeviceLru = LruList<Node, &Node::device_lru>;

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
  void destroy_leaf(Node* node);
  void check_value(const SlotIndex* value, size_t len) const;
  NodeId mint_id() { return next_id_++; }

  const int64_t page_size_;
  const int64_t num_device_slots_;
  std::unique_ptr<Node> root_;
  // Owner of every non-root node, keyed by id: resolves ids crossing the boundary.
  std::unordered_map<NodeId, std::unique_ptr<Node>> nodes_;
  // (parent id, namespace, first page) hash -> child; colliding children chain via Node::hash_next.
  std::unordered_map<uint64_t, Node*> child_index_;
  std::unordered_map<std::string, int32_t> namespaces_;
  std::vector<std::string> namespace_names_;  // index = namespace id; [0] = "" (none)
  DeviceLru device_lru_;  // unlocked nodes with device KV; back = least recently used
  int64_t evictable_size_ = 0;
  int64_t protected_size_ = 0;
  NodeId next_id_ = kRootId + 1;
  Tick tick_ = 0;
};

}  // namespace hicache
