// An intrusive doubly linked list ordering nodes by recency.
//
// Why intrusive: eviction must cost O(1) per victim whatever the cache size. SGLang's Python trees
// rebuild a heap over every evictable leaf on each evict() call, which makes eviction 10x slower at
// 50% capacity than at 10%. Each list a node can be on has its own hook in the node (folly
// IntrusiveList style), so membership changes never allocate.
//
// Complexity: push_front, erase, move_to_front, insert_after: O(1). Ownership: the list never owns
// its nodes; a node must be erased from every list before it is destroyed.
#pragma once

#include <cstddef>

namespace hicache {

template <typename T>
struct LruHook {
  T* prev = nullptr;
  T* next = nullptr;
  bool linked = false;
};

// Front = most recently used, back = least recently used.
template <typename T, LruHook<T> T::*Hook>
class LruList {
 public:
  LruList() = default;
  LruList(const LruList&) = delete;
  LruList& operator=(const LruList&) = delete;

  bool empty() const { return head_ == nullptr; }
  size_t size() const { return size_; }
  T* front() const { return head_; }
  T* back() const { return tail_; }
  static bool contains(const T* node) { return (node->*Hook).linked; }
  static T* next_of(const T* node) { return (node->*Hook).next; }  // towards the back (older)

  void push_front(T* node) {
    LruHook<T>& h = node->*Hook;
    h.prev = nullptr;
    h.next = head_;
    if (head_ != nullptr) (head_->*Hook).prev = node;
    head_ = node;
    if (tail_ == nullptr) tail_ = node;
    h.linked = true;
    ++size_;
  }

  // Places `node` just in front of `anchor` (more recent than it, older than anchor's predecessor).
  void insert_before(T* anchor, T* node) {
    LruHook<T>& a = anchor->*Hook;
    if (a.prev == nullptr) {
      push_front(node);
      return;
    }
    LruHook<T>& h = node->*Hook;
    h.prev = a.prev;
    h.next = anchor;
    (a.prev->*Hook).next = node;
    a.prev = node;
    h.linked = true;
    ++size_;
  }

  void erase(T* node) {
    LruHook<T>& h = node->*Hook;
    if (h.prev != nullptr) (h.prev->*Hook).next = h.next; else head_ = h.next;
    if (h.next != nullptr) (h.next->*Hook).prev = h.prev; else tail_ = h.prev;
    h.prev = h.next = nullptr;
    h.linked = false;
    --size_;
  }

  void move_to_front(T* node) {
    if (head_ == node) return;
    erase(node);
    push_front(node);
  }

  void clear() {
    while (head_ != nullptr) erase(head_);
  }

 private:
  T* head_ = nullptr;
  T* tail_ = nullptr;
  size_t size_ = 0;
};

}  // namespace hicache
