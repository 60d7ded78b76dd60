// base instantiation of the micro-kernels (see kernels_impl.h). Only selected at run time when
// the CPU reports the ISA (ops_cpu.cpp), so this file can never raise an illegal instruction.
#include "kernels.h"

#pragma GCC push_options
// baseline x86-64 (SSE2): no target pragma
namespace sparsekern {
namespace isa_base {
#define VEC_BYTES 16
#include "kernels_impl.h"
#undef VEC_BYTES
}  // namespace isa_base
}  // namespace sparsekern
#pragma GCC pop_options

namespace sparsekern {
KernelTable<float> kernels_f32_base() { return isa_base::table<float>("base"); }
KernelTable<double> kernels_f64_base() { return isa_base::table<double>("base"); }
}  // namespace sparsekern
