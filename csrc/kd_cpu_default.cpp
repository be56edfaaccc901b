// Portable build of the CPU row kernels (whatever the compiler targets by default).
#define KD_CPU_NS cpu_default
#include "kd_cpu.h"
#include "kd_cpu_kernel.h"
