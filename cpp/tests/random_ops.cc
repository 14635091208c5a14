// Random operations on the tree core with check_invariants() after each one. Built with
// HICACHE_BUILD_CPP_TESTS (and HICACHE_SANITIZE for ASan/UBSan) and run by
// tests/tree/test_cpp_sanitized.py. Usage: hicache_random_ops [steps] [seed]
#include <cstdio>
#include <cstdlib>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "hicache/radix_tree.h"

using hicache::NodeId;
using hicache::RadixTree;
using hicache::SlotIndex;
using hicache::Token;

int main(int argc, char** argv) {
  const int steps = argc > 1 ? std::atoi(argv[1]) : 20000;
  const unsigned seed = argc > 2 ? static_cast<unsigned>(std::atoi(argv[2])) : 1;
  std::mt19937 rng(seed);
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  for (const int64_t page_size : {1, 4, 16}) {
    RadixTree tree(page_size, 0);
    std::vector<NodeId> locked;
    SlotIndex next_slot = 0;
    const std::string extra_keys[] = {"", "a", "b"};
    for (int step = 0; step < steps; ++step) {
      // Keys: 1-6 chunks from a pool of 4, each a page long, plus an optional short tail.
      std::vector<Token> key;
      const int chunks = uniform(1, 6);
      for (int c = 0; c < chunks; ++c) {
        const int chunk = uniform(0, 3);
        for (int64_t i = 0; i < page_size; ++i) key.push_back(static_cast<Token>(chunk * 100 + i));
      }
      for (int i = uniform(0, static_cast<int>(page_size) - 1); i > 0; --i) key.push_back(7);
      const std::string& extra_key = extra_keys[uniform(0, 2)];
      switch (uniform(0, 4)) {
        case 0: {
          // Fresh, page-aligned slots: next_slot is always a multiple of page_size.
          std::vector<SlotIndex> value(key.size());
          for (size_t i = 0; i < value.size(); ++i) value[i] = next_slot + static_cast<SlotIndex>(i);
          next_slot += static_cast<SlotIndex>((value.size() + page_size - 1) / page_size * page_size);
          tree.insert(key.data(), key.size(), value.data(), value.size(), extra_key);
          break;
        }
        case 1:
          tree.match_prefix(key.data(), key.size(), extra_key);
          break;
        case 2: {
          const auto m = tree.match_prefix(key.data(), key.size(), extra_key);
          tree.inc_lock_ref(m.last_device_node);
          locked.push_back(m.last_device_node);
          break;
        }
        case 3:
          if (!locked.empty()) {
            const size_t i = static_cast<size_t>(uniform(0, static_cast<int>(locked.size()) - 1));
            tree.dec_lock_ref(locked[i]);
            locked.erase(locked.begin() + static_cast<long>(i));
          }
          break;
        default:
          tree.evict(uniform(0, 5 * static_cast<int>(page_size)));
      }
      tree.check_invariants();
    }
    for (NodeId id : locked) tree.dec_lock_ref(id);
    tree.evict(tree.total_size());
    tree.check_invariants();
    if (tree.total_size() != 0 || tree.num_nodes() != 0) {
      std::fprintf(stderr, "page_size %ld: tree not empty after evicting everything\n",
                   static_cast<long>(page_size));
      return 1;
    }
    // Error paths leave the tree consistent.
    try {
      tree.dec_lock_ref(12345678);
      return 1;
    } catch (const std::out_of_range&) {
    }
    tree.check_invariants();
  }
  std::printf("random_ops: %d steps x 3 page sizes ok\n", steps);
  return 0;
}
