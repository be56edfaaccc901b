// Row formulas of the fused KD / DKD losses, shared by the CPU and the CUDA kernels.
//
// Notation for one row: a = s / T, b = t / T. A kernel subtracts a row maximum from each
// side (xa = a - max a, xb = b - max b), computes ea = exp(xa), eb = exp(xb) once per
// element and accumulates, in double,
//     sa = sum ea,   sb = sum eb,   sd = sum eb * (xb - xa).
// Because the shifts cancel,  KL(softmax b || softmax a) = sd / sb - log sb + log sa,
// so no per-element log is needed, and both sums are >= 1 (the maximum contributes 1).
// The gradients are then linear in (ea, eb):
//     d loss / d s_j = ea_j * ca - eb_j * cb
//     d loss / d t_j = eb_j * (t1 * (xb_j - xa_j) + t0)
// with per-row coefficients computed here. For DKD the sums run over the non-target
// classes only (shifted by the non-target maximum) and the target class gets its own
// gradient (gs_target, gt_target).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define KD_HD __host__ __device__
#else
#define KD_HD
#endif

namespace kdbench {

struct RowCoef {
  double loss;       // this row's contribution to the (already batch-averaged) loss
  double ca, cb;     // student gradient: ea * ca - eb * cb
  double t1, t0;     // teacher gradient: eb * (t1 * (xb - xa) + t0)
  double gs_target;  // DKD only: student gradient at the target class
  double gt_target;  // DKD only: teacher gradient at the target class
};

KD_HD inline double softplus(double x) {
  return (x > 0 ? x : 0.0) + ::log1p(::exp(-::fabs(x)));
}

KD_HD inline double sigmoid(double x) {
  if (x >= 0) return 1.0 / (1.0 + ::exp(-x));
  const double e = ::exp(x);
  return e / (1.0 + e);
}

// Hinton KD. `scale` is T / B; the loss is scaled by T^2 / B = scale * T.
KD_HD inline RowCoef kd_row_coef(double sa, double sb, double sd, double scale, double T) {
  RowCoef r{};
  const double mean_diff = sd / sb;  // sum_j p_j (xb_j - xa_j)
  r.loss = (mean_diff - ::log(sb) + ::log(sa)) * scale * T;
  r.ca = scale / sa;
  r.cb = scale / sb;
  r.t1 = scale / sb;
  r.t0 = -scale / sb * mean_diff;
  return r;
}

// Decoupled KD (Zhao et al. 2022). The sums sa, sb, sd are over the non-target classes,
// shifted by the non-target maxima; xa_g, xb_g are the target logits / T under the same
// shifts. `has_other` is false when C == 1 (no non-target class: both terms vanish).
KD_HD inline RowCoef dkd_row_coef(double sa, double sb, double sd, double xa_g, double xb_g,
                                  bool has_other, double alpha, double beta, double scale,
                                  double T) {
  RowCoef r{};
  if (!has_other) return r;
  const double log_sa = ::log(sa), log_sb = ::log(sb);
  // Binary (target vs rest) distributions: p(target) = sigmoid(u) for the student,
  // sigmoid(v) for the teacher, with u, v the target logit minus the rest's logsumexp.
  const double u = xa_g - log_sa;
  const double v = xb_g - log_sb;
  const double bs_g = sigmoid(u), bs_o = sigmoid(-u);
  const double bt_g = sigmoid(v), bt_o = sigmoid(-v);
  const double r_g = softplus(-u) - softplus(-v);  // log bt_g - log bs_g
  const double r_o = softplus(u) - softplus(v);    // log bt_o - log bs_o
  const double tckd = (bt_g > 0 ? bt_g * r_g : 0.0) + (bt_o > 0 ? bt_o * r_o : 0.0);
  const double mean_diff = sd / sb;
  const double nckd = mean_diff - log_sb + log_sa;
  r.loss = (alpha * tckd + beta * nckd) * scale * T;
  r.ca = scale * (alpha * (bs_o - bt_o) + beta) / sa;
  r.cb = scale * beta / sb;
  r.gs_target = scale * alpha * (bs_g - bt_g);
  r.t1 = scale * beta / sb;
  r.t0 = scale / sb * (alpha * bt_o * (r_o - tckd) - beta * mean_diff);
  r.gt_target = scale * alpha * bt_g * (r_g - tckd);
  return r;
}

// Per-element gradient formulas; V is a scalar type or a SIMD vector type.
template <typename V>
KD_HD inline V student_grad(V ea, V eb, V ca, V cb) {
  return ea * ca - eb * cb;
}

template <typename V>
KD_HD inline V teacher_grad(V eb, V diff, V t1, V t0) {
  return eb * (t1 * diff + t0);
}

}  // namespace kdbench
