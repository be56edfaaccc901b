// AVX-512 build of the CPU row kernels, selected at run time when the CPU has them.
// See kd_cpu_avx2.cpp for why the pragma and macros come before any header.
#if defined(__GNUC__) && defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#endif
#define KD_CPU_NS cpu_avx512
#include "kd_cpu.h"
#include "kd_cpu_kernel.h"
