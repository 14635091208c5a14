// Launchers of the KV transfer kernels: argument checks, host-pointer translation, launch
// configuration and error reporting. The kernels themselves live in transfer_kernels.cuh.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "hicache/nvtx.h"
#include "transfer.h"
#include "transfer_kernels.cuh"

namespace hicache::cuda {
namespace {

const char* layout_name(HostLayout layout) {
  switch (layout) {
    case HostLayout::kLayerFirst:
      return "layer_first";
    case HostLayout::kPageFirst:
      return "page_first";
    case HostLayout::kPageFirstDirect:
      return "page_first_direct";
  }
  return "?";
}

[[noreturn]] void invalid(const std::string& fn, const std::string& what) {
  throw std::invalid_argument(fn + ": " + what);
}

// Checks that need no CUDA runtime; shared by launch_transfer and emulate_transfer.
void check_params(const TransferParams& p, HostLayout layout, Direction direction,
                  const std::string& fn) {
  const int layout_value = static_cast<int>(layout);
  if (layout_value < 0 || layout_value > 2) invalid(fn, "layout: unknown value " + std::to_string(layout_value));
  const int direction_value = static_cast<int>(direction);
  if (direction_value < 0 || direction_value > 1)
    invalid(fn, "direction: unknown value " + std::to_string(direction_value));
  if (p.num_buffers != 1 && p.num_buffers != 2)
    invalid(fn, "num_buffers: expected 1 (MLA) or 2 (MHA K and V), got " +
                    std::to_string(p.num_buffers));
  for (int b = 0; b < p.num_buffers; ++b) {
    if (p.device_buffers[b] == 0) invalid(fn, "device_buffers[" + std::to_string(b) + "] is null");
    if (p.host_buffers[b] == 0) invalid(fn, "host_buffers[" + std::to_string(b) + "] is null");
  }
  if (p.num_tokens < 0) invalid(fn, "num_tokens: expected >= 0, got " + std::to_string(p.num_tokens));
  if (p.row_bytes <= 0) invalid(fn, "row_bytes: expected > 0, got " + std::to_string(p.row_bytes));
  if (p.device_num_slots <= 0)
    invalid(fn, "device_num_slots: expected > 0, got " + std::to_string(p.device_num_slots));
  if (p.host_num_slots <= 0)
    invalid(fn, "host_num_slots: expected > 0, got " + std::to_string(p.host_num_slots));
  if (p.num_layers <= 0) invalid(fn, "num_layers: expected > 0, got " + std::to_string(p.num_layers));
  if (p.layer_begin < 0 || p.layer_begin >= p.layer_end || p.layer_end > p.num_layers)
    invalid(fn, "layers: expected 0 <= layer_begin < layer_end <= num_layers (" +
                    std::to_string(p.num_layers) + "), got [" + std::to_string(p.layer_begin) +
                    ", " + std::to_string(p.layer_end) + ")");
  if (p.page_size < 1) invalid(fn, "page_size: expected >= 1, got " + std::to_string(p.page_size));
  if (layout == HostLayout::kPageFirstDirect && p.host_num_slots % p.page_size != 0)
    invalid(fn, "host_num_slots " + std::to_string(p.host_num_slots) +
                    " is not a multiple of page_size " + std::to_string(p.page_size) +
                    " (page_first_direct)");
  if (p.num_tokens > 0) {
    if (p.device_indices == 0 || p.host_indices == 0) invalid(fn, "an index pointer is null");
    if (p.device_indices % alignof(std::int64_t) != 0 || p.host_indices % alignof(std::int64_t) != 0)
      invalid(fn, "index pointers must be 8-byte aligned (int64 indices)");
  }
}

// The widest access in bytes (16, 8, 4, 2, 1) dividing row_bytes and every buffer address.
int access_bytes(const TransferParams& p) {
  std::uintptr_t bits = static_cast<std::uintptr_t>(p.row_bytes);
  for (int b = 0; b < p.num_buffers; ++b) bits |= p.device_buffers[b] | p.host_buffers[b];
  int width = 16;
  while (width > 1 && (bits % width) != 0) width /= 2;
  return width;
}

void check_cuda(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // reset the (non-sticky) last error so later calls start clean
    throw std::runtime_error("hicache transfer: " + what + ": " + cudaGetErrorString(err));
  }
}

// Returns the device address of `ptr`, which must be memory of `want_host ? pinned host :
// device` kind on `device` (host memory is reachable from any device).
std::uintptr_t device_address(std::uintptr_t ptr, bool want_host, int device, const std::string& fn,
                              const std::string& name) {
  cudaPointerAttributes attr{};
  check_cuda(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr)),
             fn + ": cudaPointerGetAttributes(" + name + ")");
  if (want_host) {
    if (attr.type != cudaMemoryTypeHost)
      invalid(fn, name + " is not pinned host memory (use pin_memory=True / cudaHostAlloc)");
    if (attr.devicePointer == nullptr) invalid(fn, name + " has no device mapping");
    return reinterpret_cast<std::uintptr_t>(attr.devicePointer);
  }
  if (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged) {
    if (attr.type == cudaMemoryTypeDevice && attr.device != device)
      invalid(fn, name + " is on cuda:" + std::to_string(attr.device) +
                      " but the current device is cuda:" + std::to_string(device));
    return ptr;
  }
  if (attr.type == cudaMemoryTypeHost && attr.devicePointer != nullptr)
    return reinterpret_cast<std::uintptr_t>(attr.devicePointer);
  invalid(fn, name + " is neither device memory nor pinned host memory");
}

int multiprocessor_count(int device) {
  static std::mutex mutex;
  static std::vector<int> counts;
  std::lock_guard<std::mutex> lock(mutex);
  if (device >= static_cast<int>(counts.size())) counts.resize(device + 1, 0);
  if (counts[device] == 0) {
    check_cuda(cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device),
               "cudaDeviceGetAttribute(multiProcessorCount)");
  }
  return counts[device];
}

template <HostLayout kLayout, Direction kDirection>
void launch_width(const TransferParams& p, int width, dim3 grid, cudaStream_t stream) {
  constexpr int kThreads = kThreadsPerBlock;
  switch (width) {
    case 16:
      transfer_kernel<kLayout, kDirection, int4><<<grid, kThreads, 0, stream>>>(p);
      break;
    case 8:
      transfer_kernel<kLayout, kDirection, int2><<<grid, kThreads, 0, stream>>>(p);
      break;
    case 4:
      transfer_kernel<kLayout, kDirection, int><<<grid, kThreads, 0, stream>>>(p);
      break;
    case 2:
      transfer_kernel<kLayout, kDirection, short><<<grid, kThreads, 0, stream>>>(p);
      break;
    default:
      transfer_kernel<kLayout, kDirection, char><<<grid, kThreads, 0, stream>>>(p);
      break;
  }
}

template <Direction kDirection>
void launch_layout(const TransferParams& p, HostLayout layout, int width, dim3 grid,
                   cudaStream_t stream) {
  switch (layout) {
    case HostLayout::kLayerFirst:
      return launch_width<HostLayout::kLayerFirst, kDirection>(p, width, grid, stream);
    case HostLayout::kPageFirst:
      return launch_width<HostLayout::kPageFirst, kDirection>(p, width, grid, stream);
    case HostLayout::kPageFirstDirect:
      return launch_width<HostLayout::kPageFirstDirect, kDirection>(p, width, grid, stream);
  }
}

template <HostLayout kLayout, Direction kDirection>
void emulate(const TransferParams& p) {
  const std::int64_t rows = num_rows(p);
  for (std::int64_t item = 0; item < rows; ++item) {
    const RowCopy copy = row_copy<kLayout, kDirection>(p, item);
    std::memcpy(copy.dst, copy.src, static_cast<std::size_t>(p.row_bytes));
  }
}

template <Direction kDirection>
void emulate_layout(const TransferParams& p, HostLayout layout) {
  switch (layout) {
    case HostLayout::kLayerFirst:
      return emulate<HostLayout::kLayerFirst, kDirection>(p);
    case HostLayout::kPageFirst:
      return emulate<HostLayout::kPageFirst, kDirection>(p);
    case HostLayout::kPageFirstDirect:
      return emulate<HostLayout::kPageFirstDirect, kDirection>(p);
  }
}

}  // namespace

int launch_transfer(const TransferParams& params, HostLayout layout, Direction direction,
                    std::uintptr_t stream) {
  const bool to_host = direction == Direction::kDeviceToHost;
  const std::string fn = std::string("transfer_kernel<") + layout_name(layout) +
                         (to_host ? ", device_to_host>" : ", host_to_device>");
  check_params(params, layout, direction, fn);
  if (params.num_tokens == 0) return 0;
  nvtx::ScopedRange range{to_host ? nvtx::kKernelBackup : nvtx::kKernelLoad};
  int device = 0;
  check_cuda(cudaGetDevice(&device), fn + ": cudaGetDevice");
  TransferParams p = params;
  for (int b = 0; b < p.num_buffers; ++b) {
    const std::string index = "[" + std::to_string(b) + "]";
    p.device_buffers[b] =
        device_address(p.device_buffers[b], false, device, fn, "device_buffers" + index);
    p.host_buffers[b] = device_address(p.host_buffers[b], true, device, fn, "host_buffers" + index);
  }
  p.device_indices = device_address(p.device_indices, false, device, fn, "device_indices");
  p.host_indices = device_address(p.host_indices, false, device, fn, "host_indices");
  const int width = access_bytes(p);
  constexpr std::int64_t kWarpsPerBlock = kThreadsPerBlock / kWarpSize;
  constexpr std::int64_t kBlocksPerMultiprocessor = 8;
  const std::int64_t wanted = (num_rows(p) + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const std::int64_t cap = kBlocksPerMultiprocessor * multiprocessor_count(device);
  const dim3 grid(static_cast<unsigned>(std::min(wanted, cap)));
  auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  if (to_host) {
    launch_layout<Direction::kDeviceToHost>(p, layout, width, grid, cuda_stream);
  } else {
    launch_layout<Direction::kHostToDevice>(p, layout, width, grid, cuda_stream);
  }
  check_cuda(cudaGetLastError(), fn + ": launch");
  return width;
}

void emulate_transfer(const TransferParams& params, HostLayout layout, Direction direction) {
  check_params(params, layout, direction, "emulate_transfer");
  if (params.num_tokens == 0) return;
  if (direction == Direction::kDeviceToHost) {
    emulate_layout<Direction::kDeviceToHost>(params, layout);
  } else {
    emulate_layout<Direction::kHostToDevice>(params, layout);
  }
}

int device_count() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return -static_cast<int>(err);
  }
  return count;
}

const char* device_error() {
  const int count = device_count();
  return count < 0 ? cudaGetErrorString(static_cast<cudaError_t>(-count)) : "";
}

}  // namespace hicache::cuda
