// pybind11 declarations of hicache._cuda_ops: the transfer launchers of transfer.h. Pointers, sizes
// and the stream cross as integers, so the module does not link libtorch and survives torch
// upgrades; hicache.transfer validates the tensors and fills TransferParams.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "transfer.h"

namespace py = pybind11;
using hicache::cuda::Direction;
using hicache::cuda::HostLayout;
using hicache::cuda::TransferParams;

namespace {

// Property accessors of the two buffer-address arrays; setting device_buffers sets num_buffers.
std::vector<std::uintptr_t> get_buffers(const std::uintptr_t (&buffers)[2], int num_buffers) {
  return {buffers, buffers + num_buffers};
}

void set_buffers(std::uintptr_t (&buffers)[2], const std::vector<std::uintptr_t>& values,
                 const char* name) {
  if (values.empty() || values.size() > 2)
    throw std::invalid_argument(std::string("TransferParams.") + name +
                                ": expected 1 (MLA) or 2 (MHA K and V) addresses, got " +
                                std::to_string(values.size()));
  buffers[0] = values[0];
  buffers[1] = values.size() == 2 ? values[1] : 0;
}

}  // namespace

PYBIND11_MODULE(_cuda_ops, m) {
  m.doc() = "hicache's CUDA KV transfer kernels (raw pointers; use hicache.transfer instead)";

  py::enum_<HostLayout>(m, "HostLayout", "Host KV layout (hicache.HostLayout values)")
      .value("layer_first", HostLayout::kLayerFirst)
      .value("page_first", HostLayout::kPageFirst)
      .value("page_first_direct", HostLayout::kPageFirstDirect);
  py::enum_<Direction>(m, "Direction", "Direction of a transfer")
      .value("device_to_host", Direction::kDeviceToHost)
      .value("host_to_device", Direction::kHostToDevice);

  py::class_<TransferParams>(m, "TransferParams",
                             "What one launch copies; fields as in cuda/transfer.h (bytes, tokens)")
      .def(py::init<>())
      .def_property(
          "device_buffers",
          [](const TransferParams& p) { return get_buffers(p.device_buffers, p.num_buffers); },
          [](TransferParams& p, const std::vector<std::uintptr_t>& v) {
            set_buffers(p.device_buffers, v, "device_buffers");
            p.num_buffers = static_cast<int>(v.size());
          },
          "Device buffer addresses: [K, V] (MHA) or [latent] (MLA); sets num_buffers")
      .def_property(
          "host_buffers",
          [](const TransferParams& p) { return get_buffers(p.host_buffers, p.num_buffers); },
          [](TransferParams& p, const std::vector<std::uintptr_t>& v) {
            set_buffers(p.host_buffers, v, "host_buffers");
          },
          "Pinned host buffer addresses, one per device buffer")
      .def_readonly("num_buffers", &TransferParams::num_buffers)
      .def_readwrite("device_indices", &TransferParams::device_indices, "int64 array address")
      .def_readwrite("host_indices", &TransferParams::host_indices, "int64 array address")
      .def_readwrite("num_tokens", &TransferParams::num_tokens)
      .def_readwrite("row_bytes", &TransferParams::row_bytes, "bytes of one token of one layer")
      .def_readwrite("device_num_slots", &TransferParams::device_num_slots)
      .def_readwrite("host_num_slots", &TransferParams::host_num_slots)
      .def_readwrite("num_layers", &TransferParams::num_layers)
      .def_readwrite("layer_begin", &TransferParams::layer_begin)
      .def_readwrite("layer_end", &TransferParams::layer_end)
      .def_readwrite("page_size", &TransferParams::page_size, "host page size, tokens");

  m.def(
      "transfer",
      [](const TransferParams& params, HostLayout layout, Direction direction,
         std::uintptr_t stream) {
        py::gil_scoped_release release;
        return hicache::cuda::launch_transfer(params, layout, direction, stream);
      },
      py::arg("params"), py::arg("layout"), py::arg("direction"), py::arg("stream"),
      R"doc(Launches one KV transfer on ``stream`` (a cudaStream_t as int); does not synchronise.

Returns the access width in bytes (16 when alignment allows; 0 when num_tokens is 0).
Raises ValueError for a bad argument (null, misaligned or non-pinned pointer, bad sizes or layer
range), RuntimeError for a CUDA error.)doc");

  m.def(
      "emulate_transfer",
      [](const TransferParams& params, HostLayout layout, Direction direction) {
        py::gil_scoped_release release;
        hicache::cuda::emulate_transfer(params, layout, direction);
      },
      py::arg("params"), py::arg("layout"), py::arg("direction"),
      R"doc(Runs the kernel's row decomposition and layout offsets on the CPU over CPU memory.

For testing the offsets on machines without a GPU; not a transfer backend. Raises ValueError
as ``transfer`` for the checks that need no CUDA.)doc");

  m.def("device_count", &hicache::cuda::device_count,
        "Number of CUDA devices, or a negative cudaError_t if the runtime cannot start.");
  m.def("device_error", &hicache::cuda::device_error,
        "Why the CUDA runtime cannot start (cudaGetErrorString), or '' when it can.");
}
