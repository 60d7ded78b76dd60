// Peak FMA throughput of one core (roofline ceiling for RESULTS.md):
//   gcc -O2 benchmarks/peak_fma.c -o /tmp/peak_fma && /tmp/peak_fma
// 12 independent accumulators, no memory traffic; zmm (AVX-512) and ymm (AVX2) loops.
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#define N 100000000L
int main(){
  double t0=now();
  __asm__ volatile(
    "vxorps %%zmm0,%%zmm0,%%zmm0\n vmovaps %%zmm0,%%zmm1\n vmovaps %%zmm0,%%zmm2\n vmovaps %%zmm0,%%zmm3\n vmovaps %%zmm0,%%zmm4\n vmovaps %%zmm0,%%zmm5\n vmovaps %%zmm0,%%zmm6\n vmovaps %%zmm0,%%zmm7\n vmovaps %%zmm0,%%zmm8\n vmovaps %%zmm0,%%zmm9\n vmovaps %%zmm0,%%zmm10\n vmovaps %%zmm0,%%zmm11\n"
    "mov %0, %%rcx\n"
    "1:\n"
    "vfmadd231ps %%zmm14,%%zmm15,%%zmm0\n vfmadd231ps %%zmm14,%%zmm15,%%zmm1\n vfmadd231ps %%zmm14,%%zmm15,%%zmm2\n vfmadd231ps %%zmm14,%%zmm15,%%zmm3\n"
    "vfmadd231ps %%zmm14,%%zmm15,%%zmm4\n vfmadd231ps %%zmm14,%%zmm15,%%zmm5\n vfmadd231ps %%zmm14,%%zmm15,%%zmm6\n vfmadd231ps %%zmm14,%%zmm15,%%zmm7\n"
    "vfmadd231ps %%zmm14,%%zmm15,%%zmm8\n vfmadd231ps %%zmm14,%%zmm15,%%zmm9\n vfmadd231ps %%zmm14,%%zmm15,%%zmm10\n vfmadd231ps %%zmm14,%%zmm15,%%zmm11\n"
    "dec %%rcx\n jnz 1b\n" :: "r"(N) : "rcx","xmm0","xmm1","xmm2","xmm3","xmm4","xmm5","xmm6","xmm7","xmm8","xmm9","xmm10","xmm11");
  double t1=now();
  __asm__ volatile(
    "mov %0, %%rcx\n"
    "1:\n"
    "vfmadd231ps %%ymm14,%%ymm15,%%ymm0\n vfmadd231ps %%ymm14,%%ymm15,%%ymm1\n vfmadd231ps %%ymm14,%%ymm15,%%ymm2\n vfmadd231ps %%ymm14,%%ymm15,%%ymm3\n"
    "vfmadd231ps %%ymm14,%%ymm15,%%ymm4\n vfmadd231ps %%ymm14,%%ymm15,%%ymm5\n vfmadd231ps %%ymm14,%%ymm15,%%ymm6\n vfmadd231ps %%ymm14,%%ymm15,%%ymm7\n"
    "vfmadd231ps %%ymm14,%%ymm15,%%ymm8\n vfmadd231ps %%ymm14,%%ymm15,%%ymm9\n vfmadd231ps %%ymm14,%%ymm15,%%ymm10\n vfmadd231ps %%ymm14,%%ymm15,%%ymm11\n"
    "dec %%rcx\n jnz 1b\n" :: "r"(N) : "rcx","xmm0","xmm1","xmm2","xmm3","xmm4","xmm5","xmm6","xmm7","xmm8","xmm9","xmm10","xmm11");
  double t2=now();
  printf("1 core: zmm FMA %.1f GFLOP/s (%.2f ns per zmm FMA)  ymm FMA %.1f GFLOP/s\n", N*12*32/(t1-t0)/1e9, (t1-t0)/(N*12)*1e9, N*12*16/(t2-t1)/1e9);
}
