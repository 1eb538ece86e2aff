// The Python module the build produces: importing it registers the torch.library ops (static
// initialisers in adam_op.cpp) and exposes build facts for `python -m offload_engine.info`.
#include <torch/extension.h>

#include "cpu/simd_dispatch.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "offload_engine native ops";
  m.def("selected_simd_path", [] { return std::string(offload_engine::simd_path_name(offload_engine::selected_simd_path())); },
        "The CPU kernel path used now (honours OFFLOAD_ENGINE_SIMD).");
  m.def("supported_simd_paths", &offload_engine::supported_simd_paths, "Paths this CPU can run, widest first.");
  m.def("build_info", [] {
    pybind11::dict d;
#if defined(__VERSION__)
    d["compiler"] = __VERSION__;
#endif
#if defined(OFFLOAD_ENGINE_WITH_CUDA)
    d["cuda"] = true;  // ops/csrc/cuda compiled in: the ops have CUDA registrations
#else
    d["cuda"] = false;
#endif
    return d;
  });
}
