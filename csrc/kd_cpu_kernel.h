// CPU row kernels of the fused KD / DKD losses, written against at::vec::Vectorized.
//
// This header is compiled once per CPU capability (kd_cpu_default.cpp, kd_cpu_avx2.cpp);
// each translation unit sets KD_CPU_NS to its own namespace, and kd_cpu.cpp picks one at
// run time. Per row: one max pass, one exp pass (2 exp per element; ea is parked in the
// student-gradient output, eb in a row buffer that stays in cache), one pass that turns
// (ea, eb) into the gradient with the per-row coefficients of kd_math.h.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>

#include "kd_math.h"

namespace kdbench {
namespace KD_CPU_NS {

// Partial sums are flushed to double every kBlock elements, so the float accumulation
// error stays bounded whatever C is.
constexpr int64_t kBlock = 512;

struct Sums {
  double sa = 0, sb = 0, sd = 0;
};

template <typename scalar_t>
scalar_t reduce_sum(const at::vec::Vectorized<scalar_t>& v) {
  scalar_t buf[at::vec::Vectorized<scalar_t>::size()];
  v.store(buf);
  scalar_t acc = 0;
  for (int64_t i = 0; i < at::vec::Vectorized<scalar_t>::size(); ++i) acc += buf[i];
  return acc;
}

template <typename scalar_t>
scalar_t range_max(const scalar_t* x, int64_t lo, int64_t hi) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  scalar_t m = -std::numeric_limits<scalar_t>::infinity();
  int64_t j = lo;
  if (hi - j >= W) {
    Vec vm = Vec::loadu(x + j);
    for (j += W; j + W <= hi; j += W) vm = at::vec::maximum(vm, Vec::loadu(x + j));
    scalar_t buf[W];
    vm.store(buf);
    for (int64_t i = 0; i < W; ++i) m = (buf[i] > m || std::isnan(buf[i])) ? buf[i] : m;
  }
  for (; j < hi; ++j) m = (x[j] > m || std::isnan(x[j])) ? x[j] : m;
  return m;
}

// ea = exp((s - ms) / T), eb = exp((t - mt) / T) over [lo, hi), accumulating the row sums.
template <typename scalar_t>
void exp_range(const scalar_t* s, const scalar_t* t, scalar_t* ea, scalar_t* eb, int64_t lo,
               int64_t hi, scalar_t ms, scalar_t mt, scalar_t inv_T, Sums& acc) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  const Vec vms(ms), vmt(mt), vinv(inv_T);
  int64_t j = lo;
  while (j + W <= hi) {
    const int64_t blk_end = std::min(hi, j + kBlock);
    Vec va(0), vb(0), vd(0);
    for (; j + W <= blk_end; j += W) {
      const Vec xa = (Vec::loadu(s + j) - vms) * vinv;
      const Vec xb = (Vec::loadu(t + j) - vmt) * vinv;
      // exp_u20: at::vec's polynomial exp (a few ulp in float; the exact exp for double).
      const Vec ev_a = xa.exp_u20();
      const Vec ev_b = xb.exp_u20();
      ev_a.store(ea + j);
      ev_b.store(eb + j);
      va = va + ev_a;
      vb = vb + ev_b;
      vd = at::vec::fmadd(ev_b, xb - xa, vd);
    }
    acc.sa += reduce_sum(va);
    acc.sb += reduce_sum(vb);
    acc.sd += reduce_sum(vd);
  }
  for (; j < hi; ++j) {
    const scalar_t xa = (s[j] - ms) * inv_T;
    const scalar_t xb = (t[j] - mt) * inv_T;
    ea[j] = std::exp(xa);
    eb[j] = std::exp(xb);
    acc.sa += ea[j];
    acc.sb += eb[j];
    acc.sd += static_cast<double>(eb[j]) * (xb - xa);
  }
}

// gs <- ea * ca - eb * cb in place (gs holds ea on entry).
template <typename scalar_t>
void student_grad_row(scalar_t* gs, const scalar_t* eb, int64_t C, scalar_t ca, scalar_t cb) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  const Vec vca(ca), vcb(cb);
  int64_t j = 0;
  for (; j + W <= C; j += W) {
    student_grad(Vec::loadu(gs + j), Vec::loadu(eb + j), vca, vcb).store(gs + j);
  }
  for (; j < C; ++j) gs[j] = student_grad(gs[j], eb[j], ca, cb);
}

template <typename scalar_t>
void teacher_grad_row(scalar_t* gt, const scalar_t* s, const scalar_t* t, const scalar_t* eb,
                      int64_t C, scalar_t ms, scalar_t mt, scalar_t inv_T, scalar_t t1,
                      scalar_t t0) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  const Vec vms(ms), vmt(mt), vinv(inv_T), vt1(t1), vt0(t0);
  int64_t j = 0;
  for (; j + W <= C; j += W) {
    const Vec diff = (Vec::loadu(t + j) - vmt) * vinv - (Vec::loadu(s + j) - vms) * vinv;
    teacher_grad(Vec::loadu(eb + j), diff, vt1, vt0).store(gt + j);
  }
  for (; j < C; ++j) {
    const scalar_t diff = (t[j] - mt) * inv_T - (s[j] - ms) * inv_T;
    gt[j] = teacher_grad(eb[j], diff, t1, t0);
  }
}

// One row of KD (target == nullptr) or DKD. Writes the student gradient (and the teacher
// gradient when gt != nullptr) and returns the row's loss contribution.
template <typename scalar_t>
double loss_row(const scalar_t* s, const scalar_t* t, const int64_t* target, scalar_t* gs,
                scalar_t* gt, scalar_t* eb, int64_t C, double T, double alpha, double beta,
                double scale) {
  const scalar_t inv_T = static_cast<scalar_t>(1.0 / T);
  Sums acc;
  RowCoef coef;
  int64_t g = -1;
  scalar_t ms, mt;
  if (target == nullptr) {
    ms = range_max(s, 0, C);
    mt = range_max(t, 0, C);
    exp_range(s, t, gs, eb, 0, C, ms, mt, inv_T, acc);
    coef = kd_row_coef(acc.sa, acc.sb, acc.sd, scale, T);
  } else {
    g = *target;
    ms = std::max(range_max(s, 0, g), range_max(s, g + 1, C));
    mt = std::max(range_max(t, 0, g), range_max(t, g + 1, C));
    if (C == 1) ms = mt = 0;
    exp_range(s, t, gs, eb, 0, g, ms, mt, inv_T, acc);
    exp_range(s, t, gs, eb, g + 1, C, ms, mt, inv_T, acc);
    gs[g] = 0;
    eb[g] = 0;
    const double xa_g = (static_cast<double>(s[g]) - ms) / T;
    const double xb_g = (static_cast<double>(t[g]) - mt) / T;
    coef = dkd_row_coef(acc.sa, acc.sb, acc.sd, xa_g, xb_g, C > 1, alpha, beta, scale, T);
  }
  if (gt != nullptr) {
    teacher_grad_row(gt, s, t, eb, C, ms, mt, inv_T, static_cast<scalar_t>(coef.t1),
                     static_cast<scalar_t>(coef.t0));
    if (g >= 0) gt[g] = static_cast<scalar_t>(coef.gt_target);
  }
  student_grad_row(gs, eb, C, static_cast<scalar_t>(coef.ca), static_cast<scalar_t>(coef.cb));
  if (g >= 0) gs[g] = static_cast<scalar_t>(coef.gs_target);
  return coef.loss;
}

template <typename scalar_t>
void loss_rows(const scalar_t* s, const scalar_t* t, const int64_t* target, scalar_t* gs,
               scalar_t* gt, double* row_loss, int64_t B, int64_t C, double T, double alpha,
               double beta) {
  const double scale = T / static_cast<double>(B);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    // A plain heap buffer rather than std::vector: inline library code instantiated in this
    // ISA-specific translation unit could be shared with (and picked for) the portable build.
    const std::unique_ptr<scalar_t[]> eb(new scalar_t[static_cast<size_t>(C)]);
    for (int64_t b = begin; b < end; ++b) {
      row_loss[b] = loss_row(s + b * C, t + b * C, target ? target + b : nullptr, gs + b * C,
                             gt ? gt + b * C : nullptr, eb.get(), C, T, alpha, beta, scale);
    }
  });
}

// Non-template entry points (declared in kd_cpu.h); this header is included by exactly one
// translation unit per capability namespace.
void loss_rows_float(const float* s, const float* t, const int64_t* target, float* gs,
                            float* gt, double* row_loss, int64_t B, int64_t C, double T,
                            double alpha, double beta) {
  loss_rows<float>(s, t, target, gs, gt, row_loss, B, C, T, alpha, beta);
}

void loss_rows_double(const double* s, const double* t, const int64_t* target,
                             double* gs, double* gt, double* row_loss, int64_t B, int64_t C,
                             double T, double alpha, double beta) {
  loss_rows<double>(s, t, target, gs, gt, row_loss, B, C, T, alpha, beta);
}

}  // namespace KD_CPU_NS
}  // namespace kdbench
