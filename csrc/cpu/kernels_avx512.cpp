// avx512 instantiation of the micro-kernels (see kernels_impl.h). Only selected at run time when
// the CPU reports the ISA (ops_cpu.cpp), so this file can never raise an illegal instruction.
#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
namespace sparsekern {
namespace isa_avx512 {
#define VEC_BYTES 64
#include "kernels_impl.h"
#undef VEC_BYTES
}  // namespace isa_avx512
}  // namespace sparsekern
#pragma GCC pop_options

namespace sparsekern {
KernelTable<float> kernels_f32_avx512() { return isa_avx512::table<float>("avx512"); }
KernelTable<double> kernels_f64_avx512() { return isa_avx512::table<double>("avx512"); }
}  // namespace sparsekern
