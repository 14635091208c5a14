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

using hicache::LockReceipt;
using hicache::NodeId;
using hicache::RadixTree;
using hicache::SlotIndex;
using hicache::Token;

int main(int argc, char** argv) {
  const int steps = argc > 1 ? std::atoi(argv[1]) : 20000;
  const unsigned seed = argc > 2 ? static_cast<unsigned>(std::atoi(argv[2])) : 1;
  std::mt19937 rng(seed);
  size_t failed_load_slots = 0;  // device slots of failed loads handed back, all page sizes
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  for (const int64_t page_size : {1, 4, 16})
  for (const bool mamba : {false, true}) {
    RadixTree tree(page_size, 0, 0, mamba);
    if (!mamba) tree.enable_page_hashes();  // checked by check_invariants after every step
    SlotIndex next_mamba_slot = 0;       // fresh Mamba state slots (never reused)
    SlotIndex next_mamba_host_slot = 0;  // fresh host Mamba state slots
    std::vector<LockReceipt> locked;  // lock receipts
    std::vector<NodeId> host_locked;  // host-locked nodes
    // In-flight load-backs, oldest first: (anchor = ack id, lock receipt); each also holds a host
    // lock on its anchor. Acked oldest first, as the cache's controller acknowledges them.
    std::vector<std::pair<NodeId, LockReceipt>> loads;
    // Demoted load-failed nodes' slots are handed back; fresh slots are never reused, so only the
    // count matters here.
    auto take_failed = [&]() {
      failed_load_slots += tree.take_failed_load_slots().size();
      tree.take_failed_load_states();
      tree.take_freed_mamba_host_slots();
    };
    auto ack_oldest_load = [&](bool fail) {
      const auto [anchor, receipt] = loads.front();
      loads.erase(loads.begin());
      if (fail) {
        tree.abort_load_back(anchor);
      } else {
        tree.finish_load_back(anchor);
      }
      // After the ack: demotes failed nodes nobody else locks.
      tree.dec_lock_ref(receipt.node_id, receipt.mamba_node_id);
      tree.dec_host_lock_ref(anchor);
      take_failed();
    };
    // Fresh, page-aligned slots (never reused: slot uniqueness is checked by check_invariants).
    SlotIndex next_slot = 0;
    SlotIndex next_host_slot = 0;
    auto fresh = [&](SlotIndex& next, size_t n) {
      std::vector<SlotIndex> v(n);
      for (size_t i = 0; i < n; ++i) v[i] = next + static_cast<SlotIndex>(i);
      next += static_cast<SlotIndex>((n + page_size - 1) / page_size * page_size);
      return v;
    };
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
      switch (uniform(0, 11)) {
        case 0: {
          const auto value = fresh(next_slot, key.size());
          const SlotIndex state = mamba && uniform(0, 3) > 0 ? next_mamba_slot++ : -1;
          tree.insert(key.data(), key.size(), value.data(), value.size(), extra_key, state);
          break;
        }
        case 1:
          tree.match_prefix(key.data(), key.size(), extra_key);
          break;
        case 2: {
          const auto m = tree.match_prefix(key.data(), key.size(), extra_key);
          locked.push_back(tree.inc_lock_ref(m.best_match_node));
          break;
        }
        case 3:
          if (!locked.empty()) {
            const size_t i = static_cast<size_t>(uniform(0, static_cast<int>(locked.size()) - 1));
            tree.dec_lock_ref(locked[i].node_id, locked[i].mamba_node_id);  // may demote some
            locked.erase(locked.begin() + static_cast<long>(i));
            take_failed();
          }
          break;
        case 4: {
          // Write-through of the matched path.
          const auto m = tree.match_prefix(key.data(), key.size(), extra_key);
          const auto plan = tree.backup_plan(m.last_device_node, static_cast<uint64_t>(uniform(1, 2)));
          for (size_t i = 0; i < plan.nodes.size(); ++i) {
            const auto host = fresh(next_host_slot, static_cast<size_t>(plan.lengths[i]));
            const SlotIndex host_state =
                plan.states[i] >= 0 && uniform(0, 3) > 0 ? next_mamba_host_slot++ : -1;
            tree.commit_backup(plan.nodes[i], host.data(), host.size(), host_state);
            if (!mamba) tree.storage_backup_plan(plan.nodes[i]);  // what storage would get
            // The copy either finishes or fails; either way the node leaves the pending state.
            if (uniform(0, 3) == 0) {
              tree.abort_backup(plan.nodes[i]);
            } else {
              tree.finish_backup(plan.nodes[i]);
            }
          }
          break;
        }
        case 5: {
          // Load-back from the match anchor, under a host lock as the cache does it.
          const auto m = tree.match_prefix(key.data(), key.size(), extra_key);
          tree.inc_host_lock_ref(m.best_match_node);
          const auto plan = tree.load_back_plan(m.best_match_node);
          const auto device = fresh(next_slot, plan.indices.size());
          const SlotIndex device_state =
              !plan.states.empty() && plan.states.back() >= 0 ? next_mamba_slot++ : -1;
          tree.commit_load_back(m.best_match_node, device.data(), device.size(), device_state);
          if (!plan.nodes.empty() && uniform(0, 1) == 0) {
            // In flight: locked until its ack (case 9); requests may lock it meanwhile (case 2).
            loads.emplace_back(m.best_match_node, tree.inc_lock_ref(m.best_match_node));
            break;
          }
          if (!plan.nodes.empty()) {
            if (uniform(0, 3) == 0) {
              tree.abort_load_back(m.best_match_node);  // unlocked: demoted at once
              take_failed();
            } else {
              tree.finish_load_back(m.best_match_node);
            }
          }
          tree.dec_host_lock_ref(m.best_match_node);
          break;
        }
        case 6: {
          const auto m = tree.match_prefix(key.data(), key.size(), extra_key);
          if (uniform(0, 1) == 0 || host_locked.empty()) {
            tree.inc_host_lock_ref(m.best_match_node);
            host_locked.push_back(m.best_match_node);
          } else {
            const size_t i = static_cast<size_t>(uniform(0, static_cast<int>(host_locked.size()) - 1));
            tree.dec_host_lock_ref(host_locked[i]);
            host_locked.erase(host_locked.begin() + static_cast<long>(i));
          }
          break;
        }
        case 7:
          tree.evict_host(uniform(0, 5 * static_cast<int>(page_size)));
          break;
        case 9:
          if (!loads.empty()) ack_oldest_load(uniform(0, 1) == 0);
          break;
        case 10:
          if (!mamba) {
            // Pages prefetched from storage: the key's tail inserted host-only below the match.
            const auto m = tree.match_prefix(key.data(), key.size(), extra_key);
            const size_t skip = static_cast<size_t>(uniform(0, static_cast<int>(key.size())));
            const auto host = fresh(next_host_slot, key.size() - skip);
            tree.insert_host(m.last_host_node, key.data() + skip, key.size() - skip, host.data(),
                             host.size(), extra_key);
          }
          break;
        case 8:
          if (mamba) {
            const auto r = tree.evict_mamba(uniform(0, 3), uniform(0, 1) == 0);
            if (r.needs_backup != hicache::kNoNode) {  // write_back: back it up, state included
              tree.check_invariants();
              const auto plan = tree.backup_plan(r.needs_backup, 0);
              const auto host = fresh(next_host_slot, static_cast<size_t>(plan.lengths.back()));
              const SlotIndex host_state = plan.states.back() >= 0 ? next_mamba_host_slot++ : -1;
              tree.commit_backup(r.needs_backup, host.data(), host.size(), host_state);
              tree.finish_backup(r.needs_backup);
            }
          }
          break;
        default: {
          const bool write_back = uniform(0, 1) == 0;
          const auto r = tree.evict(uniform(0, 5 * static_cast<int>(page_size)), write_back);
          if (r.needs_backup != hicache::kNoNode) {
            tree.check_invariants();
            const auto size = static_cast<size_t>(tree.node_info(r.needs_backup).num_tokens);
            const auto host = fresh(next_host_slot, size);
            tree.commit_backup(r.needs_backup, host.data(), host.size());
            tree.finish_backup(r.needs_backup);
          }
        }
      }
      tree.check_invariants();
    }
    while (!loads.empty()) ack_oldest_load(uniform(0, 1) == 0);
    for (const LockReceipt& r : locked) tree.dec_lock_ref(r.node_id, r.mamba_node_id);
    take_failed();
    for (NodeId id : host_locked) tree.dec_host_lock_ref(id);
    tree.evict(tree.total_size(), false);
    tree.evict_host(tree.host_total_size());
    tree.check_invariants();
    if (tree.total_size() != 0 || tree.host_total_size() != 0 || tree.num_nodes() != 0 ||
        tree.load_failed_size() != 0 || tree.mamba_evictable_size() != 0) {
      std::fprintf(stderr, "page_size %ld: tree not empty after evicting everything\n%s",
                   static_cast<long>(page_size), tree.pretty_print().c_str());
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
  std::printf("random_ops: %d steps x 3 page sizes x {full, full+mamba} ok (%zu failed-load slots "
              "handed back)\n",
              steps, failed_load_slots);
  return 0;
}
