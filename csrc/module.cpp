// The Python module sparsekern._C. Kernels register themselves with the dispatcher
// (TORCH_LIBRARY_IMPL in cpu/ and cuda/); this only exposes build facts to Python.
#include <torch/extension.h>

namespace sparsekern {
std::string cpu_isa();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_isa", &sparsekern::cpu_isa, "Widest ISA the CPU kernels use on this machine.");
#ifdef SPARSEKERN_WITH_CUDA
  m.attr("cuda_compiled") = true;
#else
  m.attr("cuda_compiled") = false;
#endif
}
