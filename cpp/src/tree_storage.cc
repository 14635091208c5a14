// The RadixTree's storage-tier (L3) support: page hashes per node, and the host insert of pages
// prefetched from storage. Kept apart from radix_tree.cc, which only calls hash_new_node and
// slice_page_hashes from insert and split.
#include <algorithm>
#include <memory>
#include <stdexcept>
#include <string>

#include "hicache/radix_tree.h"

namespace hicache {

namespace {

std::string describe_node(const char* caller, NodeId id, const std::string& what) {
  return std::string(caller) + ": node " + std::to_string(id) + ": " + what;
}

}  // namespace

void RadixTree::enable_page_hashes() {
  if (!nodes_.empty()) {
    throw std::invalid_argument("enable_page_hashes: the tree must be empty, it has " +
                                std::to_string(nodes_.size()) + " nodes");
  }
  page_hashes_ = true;
}

// Gives a new node (already linked under its parent, key set) the digests of its pages, chained
// from its parent's last digest, or from its namespace's seed below the root.
void RadixTree::hash_new_node(Node* node) {
  const Digest* previous = nullptr;
  Digest seed;
  if (!node->parent->is_root()) {
    previous = &node->parent->page_hashes.back();
  } else if (node->ns > 0) {
    seed = namespace_seed(namespace_names_[static_cast<size_t>(node->ns)]);
    previous = &seed;
  }
  node->page_hashes.clear();
  append_page_hashes(node->key.data(), node->key.size(), page_size_, previous, node->page_hashes);
}

// A split: the upper node takes the digests of the first prefix_len tokens' pages.
void RadixTree::slice_page_hashes(Node* lower, Node* upper, size_t prefix_len) {
  const auto pages = static_cast<std::ptrdiff_t>(prefix_len / static_cast<size_t>(page_size_));
  upper->page_hashes.assign(lower->page_hashes.begin(), lower->page_hashes.begin() + pages);
  lower->page_hashes.erase(lower->page_hashes.begin(), lower->page_hashes.begin() + pages);
}

std::vector<Digest> RadixTree::node_page_hashes(NodeId id) const {
  const Node* node = node_by_id(id, "node_page_hashes");
  if (!page_hashes_) {
    throw std::invalid_argument("node_page_hashes: the tree has no page hashes "
                                "(enable_page_hashes)");
  }
  return node->page_hashes;
}

std::vector<Digest> RadixTree::path_page_hashes(NodeId id) const {
  const Node* node = node_by_id(id, "path_page_hashes");
  if (!page_hashes_) {
    throw std::invalid_argument("path_page_hashes: the tree has no page hashes "
                                "(enable_page_hashes)");
  }
  std::vector<const Node*> path;
  size_t pages = 0;
  for (const Node* n = node; !n->is_root(); n = n->parent) {
    path.push_back(n);
    pages += n->page_hashes.size();
  }
  std::vector<Digest> out;
  out.reserve(pages);
  for (auto it = path.rbegin(); it != path.rend(); ++it) {
    out.insert(out.end(), (*it)->page_hashes.begin(), (*it)->page_hashes.end());
  }
  return out;
}

// Recomputes every node's digests from its parent's (check_invariants, trees with page hashes).
void RadixTree::check_page_hashes() const {
  std::vector<const Node*> stack;
  for (const Node* c = root_->first_child; c != nullptr; c = c->next_sibling) stack.push_back(c);
  std::vector<Digest> expected;
  while (!stack.empty()) {
    const Node* n = stack.back();
    stack.pop_back();
    Digest seed;
    const Digest* previous = nullptr;
    if (!n->parent->is_root()) {
      previous = &n->parent->page_hashes.back();
    } else if (n->ns > 0) {
      seed = namespace_seed(namespace_names_[static_cast<size_t>(n->ns)]);
      previous = &seed;
    }
    expected.clear();
    append_page_hashes(n->key.data(), n->key.size(), page_size_, previous, expected);
    if (expected != n->page_hashes) {
      throw std::logic_error("check_invariants: node " + std::to_string(n->id) + ": its " +
                             std::to_string(n->page_hashes.size()) +
                             " page hashes are not the chain of its key's pages");
    }
    for (const Node* c = n->first_child; c != nullptr; c = c->next_sibling) stack.push_back(c);
  }
}

TransferPlan RadixTree::storage_backup_plan(NodeId ack_id) const {
  std::vector<const Node*> path;
  for (const Node* n = node_by_id(ack_id, "storage_backup_plan"); !n->is_root(); n = n->parent) {
    if (n->backup_pending == ack_id) path.push_back(n);
  }
  TransferPlan plan;
  for (auto it = path.rbegin(); it != path.rend(); ++it) {
    const std::vector<SlotIndex>& slots = (*it)->full().host_value;
    plan.nodes.push_back((*it)->id);
    plan.lengths.push_back((*it)->num_tokens());
    plan.indices.insert(plan.indices.end(), slots.begin(), slots.end());
    if (swa_window_ > 0) {
      const std::vector<SlotIndex>& swa = (*it)->swa().host_value;
      plan.swa.push_back((*it)->has_swa_host() ? 1 : 0);
      plan.swa_indices.insert(plan.swa_indices.end(), swa.begin(), swa.end());
    }
  }
  return plan;
}

// insert_host, SWA trees: gives host-only `node`, which covers key[start:start + its tokens] and
// has no host SWA copy, the host SWA slots of its tokens inside the window key[window_start:]
// (host_swa[0] is the window's first token's), splitting off the part above the window first.
// Marks the slots taken. Returns the node (the lower part after a split).
Node* RadixTree::give_swa_host(Node* node, size_t start, size_t window_start,
                               const SlotIndex* host_swa, std::vector<uint8_t>& taken) {
  const size_t end = start + node->key.size();
  if (end <= window_start) return node;
  if (start < window_start) {
    split(node, window_start - start);  // the upper part, above the window, stays without
    start = window_start;
  }
  const size_t offset = start - window_start;
  ComponentData& swa = node->swa();
  swa.host_value.assign(host_swa + offset, host_swa + offset + node->key.size());
  swa.has_host_value = true;
  swa_host_size_ += node->num_tokens();
  std::fill(taken.begin() + static_cast<std::ptrdiff_t>(offset),
            taken.begin() + static_cast<std::ptrdiff_t>(offset + node->key.size()), 1);
  return node;
}

InsertResult RadixTree::insert_host(NodeId anchor, const Token* key, size_t len,
                                    const SlotIndex* host, size_t host_len,
                                    std::string_view extra_key, SlotIndex mamba_host_value,
                                    const SlotIndex* host_swa, size_t host_swa_len) {
  Node* node = node_by_id(anchor, "insert_host");
  if (host_len != len) {
    throw std::invalid_argument("insert_host: key has " + std::to_string(len) +
                                " tokens but host has " + std::to_string(host_len) +
                                " slots; they must be equal");
  }
  if (mamba_ != (mamba_host_value != -1)) {
    // In a Mamba tree a host-only leaf without a host state would be a useless tombstone at once.
    throw std::invalid_argument(mamba_ ? "insert_host: a Mamba tree needs mamba_host_value, the "
                                         "host state after the key"
                                       : "insert_host: mamba_host_value given to a tree without "
                                         "the Mamba component");
  }
  if (mamba_ && (mamba_host_value < 0 ||
                 (num_mamba_host_slots_ > 0 && mamba_host_value >= num_mamba_host_slots_))) {
    throw std::out_of_range("insert_host: mamba_host_value " + std::to_string(mamba_host_value) +
                            " is out of range for a host Mamba pool of " +
                            std::to_string(num_mamba_host_slots_) + " slots");
  }
  if (node->load_failed) {
    throw std::invalid_argument(describe_node("insert_host", anchor, "is load-failed"));
  }
  const size_t aligned = len - len % static_cast<size_t>(page_size_);
  check_slots("insert_host", host, aligned, num_host_slots_, "host");
  if (swa_window_ > 0 && aligned > 0 &&
      (host_swa_len == 0 || host_swa_len > aligned ||
       host_swa_len % static_cast<size_t>(page_size_) != 0)) {
    // Without a window a new host-only leaf would be a useless SWA tombstone at once.
    throw std::invalid_argument(
        "insert_host: an SWA tree needs the host SWA slots of the key's "
        "last whole pages (0 < host_swa_len <= " +
        std::to_string(aligned) + ", whole pages), got " + std::to_string(host_swa_len));
  }
  if (swa_window_ == 0 && host_swa_len != 0) {
    throw std::invalid_argument("insert_host: host_swa given to a tree without the SWA component");
  }
  if (aligned == 0) host_swa_len = 0;
  check_slots("insert_host", host_swa, host_swa_len, num_swa_host_slots_, "host SWA");
  const size_t window_start = aligned - host_swa_len;
  std::vector<uint8_t> swa_taken(host_swa_len, 0);
  int32_t ns = node->ns;
  if (node->is_root()) {
    ns = namespace_id(extra_key, /*create=*/aligned > 0);
  } else if (namespace_id(extra_key, /*create=*/false) != ns) {
    throw std::invalid_argument(describe_node("insert_host", anchor,
                                              "is in another extra_key namespace than '" +
                                                  std::string(extra_key) + "'"));
  }

  InsertResult result;
  size_t pos = 0;
  bool stopped = false;
  while (pos < aligned) {
    Node* child = find_child(node, ns, key + pos);
    if (child == nullptr) break;
    if (child->load_pending != kNoNode || child->load_failed) {
      stopped = true;  // as insert: nothing is attached under KV that may turn out garbage
      break;
    }
    const size_t m = common_pages_len(child, key + pos, aligned - pos);
    if (m < child->key.size()) child = split(child, m);
    result.prefix_len += static_cast<int64_t>(m);  // the tree's value wins: the caller's is spare
    if (host_swa_len > 0 && child->evicted() && !child->has_swa_host()) {
      child = give_swa_host(child, pos, window_start, host_swa, swa_taken);
    }
    node = child;
    pos += m;
  }
  if (!stopped && pos < aligned) {
    auto owned = std::make_unique<Node>();
    Node* leaf = owned.get();
    leaf->id = mint_id();
    leaf->ns = ns;
    leaf->key.assign(key + pos, key + aligned);
    leaf->full().host_value.assign(host + pos, host + aligned);
    leaf->full().has_host_value = true;  // host-only: evicted and backuped
    leaf->creation_time = tick_ + 1;
    nodes_.emplace(leaf->id, std::move(owned));
    link_child(node, leaf);
    index_child(node, leaf);
    if (page_hashes_) hash_new_node(leaf);
    host_lru_.push_front(leaf);  // touch_path orders it
    host_total_size_ += leaf->num_tokens();
    host_evictable_size_ += leaf->num_tokens();
    if (host_swa_len > 0) leaf = give_swa_host(leaf, pos, window_start, host_swa, swa_taken);
    node = leaf;
    pos = aligned;
  }
  for (size_t i = 0; i < host_swa_len; ++i) {
    if (swa_taken[i] == 0) result.swa_host_spare.push_back(host_swa[i]);
  }
  if (mamba_ && !stopped && aligned > 0) {
    // The state after the key goes to the node ending it, if that node has host KV and no host
    // state yet (a new leaf always does); otherwise the caller frees its copy.
    ComponentData& mamba = node->mamba();
    if (mamba.has_host_value) {
      result.mamba_exist = true;
    } else if (node->backuped()) {
      mamba.host_value.assign(1, mamba_host_value);
      mamba.has_host_value = true;
      result.mamba_taken = true;
    }
  }
  touch_path(node);
  result.last_node = node->id;
  result.cached_len = static_cast<int64_t>(pos);
  return result;
}

}  // namespace hicache
