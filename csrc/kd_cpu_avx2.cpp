// AVX2 + FMA build of the CPU row kernels, selected at run time when the CPU has them.
// The target pragma and the capability macros must come before any ATen header so that
// at::vec::Vectorized picks its 256-bit implementation in this translation unit only.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
// sleef.h declares its 256-bit entry points only under these macros, which the pragma does
// not set; the functions themselves live in libtorch_cpu.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#endif
#define KD_CPU_NS cpu_avx2
#include "kd_cpu.h"
#include "kd_cpu_kernel.h"
