// avx2 instantiation of the micro-kernels (see kernels_impl.h). Only selected at run time when
// the CPU reports the ISA (ops_cpu.cpp), so this file can never raise an illegal instruction.
#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace sparsekern {
namespace isa_avx2 {
#define VEC_BYTES 32
#include "kernels_impl.h"
#undef VEC_BYTES
}  // namespace isa_avx2
}  // namespace sparsekern
#pragma GCC pop_options

namespace sparsekern {
KernelTable<float> kernels_f32_avx2() { return isa_avx2::table<float>("avx2"); }
KernelTable<double> kernels_f64_avx2() { return isa_avx2::table<double>("avx2"); }
}  // namespace sparsekern
