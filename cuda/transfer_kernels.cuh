// Device code of hicache's KV transfer kernels: no torch, no pybind11, raw pointers only.
//
// One kernel template moves rows (one token of one layer of one K/V buffer, `row_bytes` bytes, see
// transfer.h) between the device pool and the pinned host pool. The host layout is a template
// parameter that selects the offset function; the direction is a template parameter that swaps
// source and destination. Each warp copies one row at a time with `Vec`-wide accesses (16 bytes
// when alignment allows), adjacent warps take adjacent tokens of the same layer so that page-
// aligned index runs coalesce, and a grid-stride loop keeps enough rows in flight to saturate
// PCIe / C2C when the host side is read or written through its device mapping.
#pragma once

#include <cstdint>

#include "transfer.h"

#ifdef __CUDACC__
#define HICACHE_HD __host__ __device__ __forceinline__
#else
#define HICACHE_HD inline
#endif

namespace hicache::cuda {

// The offset function of a host layout: the row of (slot, layer) in one host buffer.
template <HostLayout kLayout>
HICACHE_HD std::int64_t host_row(const TransferParams& p, std::int64_t slot, int layer) {
  if constexpr (kLayout == HostLayout::kLayerFirst) {
    return layer * p.host_num_slots + slot;
  } else if constexpr (kLayout == HostLayout::kPageFirst) {
    return slot * p.num_layers + layer;
  } else {
    const std::int64_t page = slot / p.page_size;
    return (page * p.num_layers + layer) * p.page_size + slot % p.page_size;
  }
}

// Number of rows one launch copies.
HICACHE_HD std::int64_t num_rows(const TransferParams& p) {
  return p.num_tokens * (p.layer_end - p.layer_begin) * p.num_buffers;
}

// Source and destination of row `item` in [0, num_rows(p)). Items run token-fastest, then layer,
// then buffer, so consecutive items of one warp group touch consecutive slots of one layer.
struct RowCopy {
  const char* src;
  char* dst;
};

template <HostLayout kLayout, Direction kDirection>
HICACHE_HD RowCopy row_copy(const TransferParams& p, std::int64_t item) {
  const std::int64_t token = item % p.num_tokens;
  const std::int64_t rest = item / p.num_tokens;
  const int num_layers = p.layer_end - p.layer_begin;
  const int layer = p.layer_begin + static_cast<int>(rest % num_layers);
  const int buffer = static_cast<int>(rest / num_layers);
  const std::int64_t device_slot = reinterpret_cast<const std::int64_t*>(p.device_indices)[token];
  const std::int64_t host_slot = reinterpret_cast<const std::int64_t*>(p.host_indices)[token];
  char* device_row = reinterpret_cast<char*>(p.device_buffers[buffer]) +
                     (layer * p.device_num_slots + device_slot) * p.row_bytes;
  char* host_row_ptr = reinterpret_cast<char*>(p.host_buffers[buffer]) +
                       host_row<kLayout>(p, host_slot, layer) * p.row_bytes;
  if constexpr (kDirection == Direction::kDeviceToHost) {
    return {device_row, host_row_ptr};
  } else {
    return {host_row_ptr, device_row};
  }
}

#ifdef __CUDACC__

inline constexpr int kWarpSize = 32;
inline constexpr int kThreadsPerBlock = 256;
// Vectors each lane loads before it stores: independent loads in flight per thread, which is what
// hides the latency of reads through the host mapping.
inline constexpr int kUnroll = 4;

// Copies num_rows(p) rows; `Vec` is the access type (int4 = 16 bytes down to char = 1 byte) and
// divides row_bytes and every buffer address (checked by the launcher).
template <HostLayout kLayout, Direction kDirection, typename Vec>
__global__ void __launch_bounds__(kThreadsPerBlock) transfer_kernel(const TransferParams p) {
  const int lane = threadIdx.x % kWarpSize;
  const std::int64_t warp =
      (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const std::int64_t num_warps = static_cast<std::int64_t>(gridDim.x) * blockDim.x / kWarpSize;
  const std::int64_t rows = num_rows(p);
  const std::int64_t vecs_per_row = p.row_bytes / static_cast<std::int64_t>(sizeof(Vec));
  constexpr std::int64_t kStride = kWarpSize * kUnroll;
  for (std::int64_t item = warp; item < rows; item += num_warps) {
    const RowCopy copy = row_copy<kLayout, kDirection>(p, item);
    const Vec* src = reinterpret_cast<const Vec*>(copy.src);
    Vec* dst = reinterpret_cast<Vec*>(copy.dst);
    std::int64_t v = lane;
    for (; v + (kUnroll - 1) * kWarpSize < vecs_per_row; v += kStride) {
      Vec tmp[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) tmp[u] = src[v + u * kWarpSize];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) dst[v + u * kWarpSize] = tmp[u];
    }
    for (; v < vecs_per_row; v += kWarpSize) dst[v] = src[v];
  }
}

#endif  // __CUDACC__

}  // namespace hicache::cuda
