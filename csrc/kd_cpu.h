// Entry points of the CPU row kernels, one namespace per CPU capability.
#pragma once

#include <cstdint>

namespace kdbench {

#define KDBENCH_DECLARE_CPU_ROWS(NS)                                                       \
  namespace NS {                                                                           \
  void loss_rows_float(const float* s, const float* t, const int64_t* target, float* gs,   \
                       float* gt, double* row_loss, int64_t B, int64_t C, double T,        \
                       double alpha, double beta);                                         \
  void loss_rows_double(const double* s, const double* t, const int64_t* target,           \
                        double* gs, double* gt, double* row_loss, int64_t B, int64_t C,    \
                        double T, double alpha, double beta);                              \
  }

KDBENCH_DECLARE_CPU_ROWS(cpu_default)
KDBENCH_DECLARE_CPU_ROWS(cpu_avx2)
KDBENCH_DECLARE_CPU_ROWS(cpu_avx512)

#undef KDBENCH_DECLARE_CPU_ROWS

}  // namespace kdbench
