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

std::string describe(const char* caller, NodeId id, const std::string& what) {
  std::ostringstream os;
  os << caller << ": node " << id << ": " << what;
  return os.str();
}

}  // namespace

RadixTree::RadixTree(int64_t page_size, int64_t num_device_slots)
    : page_size_(page_size), num_device_slots_(num_device_slots), root_(new Node()) {
  if (page_size < 1) {
    throw std::invalid_argument("RadixTree: page_size must be >= 1, got " +
                                std::to_string(page_size));
  }
  if (num_device_slots < 0) {
    throw std::invalid_argument("RadixTree: num_device_slots must be >= 0 (0 = unchecked), got " +
                                std::to_string(num_device_slots));
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
  for (int c = 0; c < kNumComponents; ++c) {
    ComponentData& lower_data = node->comp[c];
    ComponentData& upper_data = upper->comp[c];
    upper_data.has_value = lower_data.has_value;
    upper_data.has_host_value = lower_data.has_host_value;
    upper_data.lock_ref = lower_data.lock_ref;
    upper_data.host_lock_ref = lower_data.host_lock_ref;
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
  upper->last_access = node->last_access;
  upper->creation_time = node->creation_time;

  link_child(parent, upper);
  index_child(parent, upper);
  link_child(upper, node);
  index_child(upper, node);
  if (DeviceLru::contains(node)) device_lru_.insert_before(node, upper);
  nodes_.emplace(upper->id, std::move(owned));
  return upper;
}

// Touches node and its ancestors, deepest first, so that every ancestor ends up more recent than
// its descendants: the LRU's back is then always a leaf (no eviction scan needed).
void RadixTree::touch_path(Node* node) {
  for (Node* n = node; n != nullptr; n = n->parent) {
    n->last_access = ++tick_;
    if (DeviceLru::contains(n)) device_lru_.move_to_front(n);
  }
}

void RadixTree::destroy_leaf(Node* node) {
  if (DeviceLru::contains(node)) device_lru_.erase(node);
  Node* parent = node->parent;
  unindex_child(parent, node);
  unlink_child(parent, node);
  nodes_.erase(node->id);
}

void RadixTree::check_value(const SlotIndex* value, size_t len) const {
  for (size_t i = 0; i < len; ++i) {
    const SlotIndex v = value[i];
    if (v < 0) {
      throw std::invalid_argument("insert: value[" + std::to_string(i) + "] = " +
                                  std::to_string(v) + " is a negative slot index");
    }
    if (num_device_slots_ > 0 && v >= num_device_slots_) {
      throw std::out_of_range("insert: value[" + std::to_string(i) + "] = " + std::to_string(v) +
                              " is out of range for a device pool of " +
                              std::to_string(num_device_slots_) + " slots");
    }
  }
  if (page_size_ == 1) return;
  for (size_t p = 0; p < len; p += static_cast<size_t>(page_size_)) {
    const SlotIndex first = value[p];
    if (first % page_size_ != 0) {
      throw std::invalid_argument("insert: value page at token " + std::to_string(p) +
                                  " starts at slot " + std::to_string(first) +
                                  ", not a multiple of page_size " + std::to_string(page_size_));
    }
    for (int64_t j = 1; j < page_size_; ++j) {
      if (value[p + j] != first + j) {
        throw std::invalid_argument("insert: value page at token " + std::to_string(p) +
                                    " is not page_size consecutive slots (value[" +
                                    std::to_string(p + j) + "] = " + std::to_string(value[p + j]) +
                                    ", expected " + std::to_string(first + j) + ")");
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Operations

MatchResult RadixTree::match_prefix(const Token* key, size_t len, std::string_view extra_key) {
  MatchResult result;
  len -= len % static_cast<size_t>(page_size_);
  const int32_t ns = namespace_id(extra_key, /*create=*/false);
  Node* node = root_.get();
  size_t pos = 0;
  if (ns >= 0) {
    while (pos < len) {
      Node* child = find_child(node, ns, key + pos);
      if (child == nullptr) break;
      const size_t m = common_pages_len(child, key + pos, len - pos);
      const bool partial = m < child->key.size();
      if (partial) child = split(child, m);
      const std::vector<SlotIndex>& v = child->full().value;
      result.device_indices.insert(result.device_indices.end(), v.begin(), v.end());
      node = child;
      pos += m;
      if (partial) break;
    }
  }
  touch_path(node);
  result.last_device_node = result.last_host_node = result.best_match_node = node->id;
  return result;
}

InsertResult RadixTree::insert(const Token* key, size_t len, const SlotIndex* value,
                               size_t value_len, std::string_view extra_key) {
  if (value_len != len) {
    throw std::invalid_argument("insert: key has " + std::to_string(len) + " tokens but value has " +
                                std::to_string(value_len) + " slots; they must be equal");
  }
  const size_t aligned = len - len % static_cast<size_t>(page_size_);
  check_value(value, aligned);
  const int32_t ns = namespace_id(extra_key, /*create=*/aligned > 0);

  Node* node = root_.get();
  size_t pos = 0;
  while (pos < aligned) {
    Node* child = find_child(node, ns, key + pos);
    if (child == nullptr) break;
    const size_t m = common_pages_len(child, key + pos, aligned - pos);
    if (m < child->key.size()) child = split(child, m);
    ++child->hit_count;
    node = child;
    pos += m;
  }
  InsertResult result;
  result.prefix_len = static_cast<int64_t>(pos);
  if (pos < aligned) {
    auto owned = std::make_unique<Node>();
    Node* leaf = owned.get();
    leaf->id = mint_id();
    leaf->ns = ns;
    leaf->key.assign(key + pos, key + aligned);
    leaf->full().value.assign(value + pos, value + aligned);
    leaf->full().has_value = true;
    leaf->creation_time = tick_ + 1;
    nodes_.emplace(leaf->id, std::move(owned));
    link_child(node, leaf);
    index_child(node, leaf);
    device_lru_.push_front(leaf);
    evictable_size_ += leaf->num_tokens();
    node = leaf;
  }
  touch_path(node);
  result.last_node = node->id;
  return result;
}

int64_t RadixTree::inc_lock_ref(NodeId id) {
  Node* node = node_by_id(id, "inc_lock_ref");
  if (!node->full().has_value) {
    throw std::invalid_argument(describe("inc_lock_ref", id, "has no device KV to protect"));
  }
  int64_t delta = 0;
  for (Node* n = node; !n->is_root(); n = n->parent) {
    ComponentData& full = n->full();
    if (full.lock_ref == 0) {
      device_lru_.erase(n);
      delta += n->num_tokens();
    }
    ++full.lock_ref;
  }
  evictable_size_ -= delta;
  protected_size_ += delta;
  return delta;
}

int64_t RadixTree::dec_lock_ref(NodeId id) {
  Node* node = node_by_id(id, "dec_lock_ref");
  if (node->is_root()) return 0;
  if (node->full().lock_ref <= 0) {
    throw std::invalid_argument(describe("dec_lock_ref", id, "is not locked (lock_ref 0)"));
  }
  int64_t delta = 0;
  for (Node* n = node; !n->is_root(); n = n->parent) {
    ComponentData& full = n->full();
    if (--full.lock_ref == 0) {
      n->last_access = ++tick_;
      device_lru_.push_front(n);
      delta += n->num_tokens();
    }
  }
  evictable_size_ += delta;
  protected_size_ -= delta;
  return delta;
}

std::vector<SlotIndex> RadixTree::evict(int64_t num_tokens) {
  if (num_tokens < 0) {
    throw std::invalid_argument("evict: num_tokens must be >= 0, got " +
                                std::to_string(num_tokens));
  }
  std::vector<SlotIndex> freed;
  int64_t pages = (num_tokens + page_size_ - 1) / page_size_;
  while (pages > 0 && !device_lru_.empty()) {
    Node* victim = device_lru_.back();
    for (Node* c = victim->first_child; c != nullptr; c = c->next_sibling) {
      if (c->full().has_value) {
        throw std::logic_error(describe("evict", victim->id,
                                        "is the LRU back but has a device child " +
                                            std::to_string(c->id)));
      }
    }
    std::vector<SlotIndex>& value = victim->full().value;
    const int64_t victim_pages = victim->num_tokens() / page_size_;
    if (victim_pages <= pages) {
      freed.insert(freed.end(), value.begin(), value.end());
      evictable_size_ -= victim->num_tokens();
      pages -= victim_pages;
      destroy_leaf(victim);
    } else {
      // Page-granular: trim the tail (the least recently used pages of the leaf) in place.
      const size_t keep = static_cast<size_t>((victim_pages - pages) * page_size_);
      freed.insert(freed.end(), value.begin() + keep, value.end());
      evictable_size_ -= victim->num_tokens() - static_cast<int64_t>(keep);
      value.resize(keep);
      victim->key.resize(keep);
      pages = 0;
    }
  }
  return freed;
}

std::vector<SlotIndex> RadixTree::reset() {
  if (protected_size_ != 0) {
    throw std::invalid_argument("reset: " + std::to_string(protected_size_) +
                                " tokens are locked by running requests; unlock them first");
  }
  std::vector<SlotIndex> freed = all_device_indices();
  device_lru_.clear();
  child_index_.clear();
  nodes_.clear();
  namespaces_.clear();
  namespace_names_.resize(1);
  root_->first_child = nullptr;
  root_->num_children = 0;
  evictable_size_ = protected_size_ = 0;
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
  info.has_extra_key = node->ns > 0;
  if (node->ns > 0) info.extra_key = namespace_names_[static_cast<size_t>(node->ns)];
  return info;
}

std::vector<SlotIndex> RadixTree::all_device_indices() const {
  std::vector<SlotIndex> out;
  out.reserve(static_cast<size_t>(total_size()));
  std::vector<const Node*> stack{root_.get()};
  while (!stack.empty()) {
    const Node* n = stack.back();
    stack.pop_back();
    const auto& v = n->full().value;
    out.insert(out.end(), v.begin(), v.end());
    for (const Node* c = n->first_child; c != nullptr; c = c->next_sibling) stack.push_back(c);
  }
  return out;
}

std::string RadixTree::pretty_print() const {
  std::ostringstream os;
  os << "RadixTree(page_size=" << page_size_ << ", nodes=" << nodes_.size()
     << ", evictable=" << evictable_size_ << ", protected=" << protected_size_ << ")\n";
  std::vector<std::pair<const Node*, int>> stack{{root_.get(), 0}};
  while (!stack.empty()) {
    auto [n, depth] = stack.back();
    stack.pop_back();
    os << std::string(static_cast<size_t>(depth) * 2, ' ') << "#" << n->id << " tokens="
       << n->key.size() << " lock_ref=" << n->full().lock_ref << " last_access=" << n->last_access;
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
