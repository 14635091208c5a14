// Basic types shared by the hicache tree core. No Python, no torch.
#pragma once

#include <cstdint>

namespace hicache {

// Node ids are minted from a per-tree counter and never reused (not even after reset), so an id
// held by a request can only ever name the node it was given for, or no node at all.
using NodeId = int64_t;

// A token id. Vocabularies fit in 31 bits; int32 halves key memory and speeds up comparisons.
using Token = int32_t;

// A KV slot index in a device or host pool (token granularity, int64 as torch indexes with).
using SlotIndex = int64_t;

// Ticks order touches for LRU. A counter, not a wall clock, so ordering is deterministic
// (SGLang 0.5.23 does the same with its global time counter).
using Tick = uint64_t;

// Returned where "no node" must be expressed across the boundary.
inline constexpr NodeId kNoNode = -1;

// The root's id: the root exists from construction and is never evicted.
inline constexpr NodeId kRootId = 0;

// Per-node state kinds. Full attention is the backbone every node has; SWA and Mamba are filled by
// the hybrid-model work (SGLang's ComponentType FULL=0, SWA=1, MAMBA=2).
enum class Component : uint8_t { kFull = 0, kSwa = 1, kMamba = 2 };
inline constexpr int kNumComponents = 3;

}  // namespace hicache
