// NVTX ranges of hicache's C++/CUDA code: the domain and the stage names it may emit.
//
// The names mirror `src/hicache/profiling.py` (STAGES, CPP_STAGES): a test parses this header and
// checks that every name here is listed there, so a timeline keyed on a name keeps working. The
// ranges come from the NVTX3 header-only C++ API of the CUDA toolkit: without a profiler attached
// a range costs a load and a branch (no tool is injected), so they wrap launches, never rows.
#pragma once

#include <nvtx3/nvtx3.hpp>

namespace hicache::nvtx {

// The NVTX domain tag (nvtx3's `domain::get<D>()` reads `name`); the same "hicache" domain as the
// Python ranges, so both nest in one timeline row.
struct Domain {
  static constexpr const char* name{"hicache"};
};

// Kernel launches: one range around each launch of the transfer kernel, on the launching thread.
inline constexpr const char* kKernelBackup = "kernel_backup";  // device -> host, one launch
inline constexpr const char* kKernelLoad = "kernel_load";      // host -> device, one launch

// A push/pop range in the hicache domain for the enclosing scope.
using ScopedRange = nvtx3::scoped_range_in<Domain>;

}  // namespace hicache::nvtx
