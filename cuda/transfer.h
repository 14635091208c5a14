// Launchers of hicache's KV transfer kernels: device KV pool <-> pinned host KV pool.
//
// Plain C++ (no CUDA or pybind11 include) so that bindings.cpp compiles with the host compiler and
// the device code (transfer_kernels.cuh) sees the same parameter struct.
//
// Units: sizes in bytes are named `*_bytes`; slot counts and indices are in tokens; every index is
// int64. A "row" is one token of one layer of one K/V buffer: `row_bytes` contiguous bytes, on the
// device at `device_buffers[b] + (layer * device_num_slots + slot) * row_bytes` (the device pool is
// `[num_layers, device_num_slots, heads, head_dim]`), on the host at `host_buffers[b] + row *
// row_bytes` where `row` is the host layout's offset function (host_pool.py HostKVPool.row_indices).
#pragma once

#include <cstdint>

namespace hicache::cuda {

// Host KV layouts; the values are the order of HostLayout in src/hicache/memory/host_pool.py.
enum class HostLayout : int {
  kLayerFirst = 0,       // row = layer * host_num_slots + slot
  kPageFirst = 1,        // row = slot * num_layers + layer
  kPageFirstDirect = 2,  // row = ((slot / page_size) * num_layers + layer) * page_size + slot % page_size
};

enum class Direction : int {
  kDeviceToHost = 0,  // backup (SGLang's backup_from_device_all_layer)
  kHostToDevice = 1,  // load-back (SGLang's load_to_device_per_layer / all layers)
};

// What one launch copies: for every token t in [0, num_tokens), layer in [layer_begin, layer_end)
// and buffer b in [0, num_buffers), the row of device slot device_indices[t] and the row of host
// slot host_indices[t], in the direction of the launch. The caller guarantees that indices are in
// range (the Python wrapper checks them); the launcher checks everything it can without reading
// them.
struct TransferParams {
  // Device pool buffers (K, V for MHA; the latent buffer for MLA): device memory.
  std::uintptr_t device_buffers[2] = {0, 0};
  // Host pool buffers, one per device buffer: pinned (page-locked) host memory, which the kernel
  // reads and writes through its device mapping.
  std::uintptr_t host_buffers[2] = {0, 0};
  int num_buffers = 0;  // 2 for MHA, 1 for MLA
  // [num_tokens] int64 slot indices, device memory (or pinned host memory).
  std::uintptr_t device_indices = 0;
  std::uintptr_t host_indices = 0;
  std::int64_t num_tokens = 0;
  std::int64_t row_bytes = 0;         // bytes of one token of one layer of one buffer
  std::int64_t device_num_slots = 0;  // device pool size, tokens
  std::int64_t host_num_slots = 0;    // host pool size, tokens
  int num_layers = 0;                 // layers of both pools
  int layer_begin = 0;                // first layer copied
  int layer_end = 0;                  // one past the last layer copied
  int page_size = 1;                  // host page size, tokens (used by kPageFirstDirect)
};

// Checks `params`, picks the widest access (16, 8, 4, 2 or 1 bytes) that divides row_bytes and every
// buffer address, translates the host buffers to their device mapping and launches the transfer on
// `stream` (a cudaStream_t as an integer; 0 is the legacy default stream). Does not synchronise.
// Returns the access width in bytes. Zero tokens launch nothing and return 0.
// Throws std::invalid_argument for a bad argument (the message names it), std::runtime_error for a
// CUDA error (the message names the kernel and the CUDA error).
int launch_transfer(const TransferParams& params, HostLayout layout, Direction direction,
                    std::uintptr_t stream);

// Runs the kernel's row decomposition and offset functions on the CPU, over CPU memory (every
// pointer in `params` is a host pointer). This is how CPU-only machines test the offsets the
// kernel uses; it is not a transfer backend. Same checks as launch_transfer, minus the CUDA ones.
void emulate_transfer(const TransferParams& params, HostLayout layout, Direction direction);

// The CUDA runtime's view of this process: the number of devices, or a negative cudaError_t when
// the runtime cannot start (no driver, no device). Never throws.
int device_count();

// cudaGetErrorString of device_count()'s error, or "" when there is none.
const char* device_error();

}  // namespace hicache::cuda
