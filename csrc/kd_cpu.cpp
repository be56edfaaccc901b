// CPU implementations of kd_loss_fwd / dkd_loss_fwd: argument checks, dtype handling and
// the run-time choice of the row kernel build (AVX2 or portable).
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "kd_cpu.h"
#include "kd_ops.h"

namespace kdbench {

void check_logits(const at::Tensor& s, const at::Tensor& t, double T) {
  TORCH_CHECK(s.dim() == 2, "kdbench: student logits must be [B, C], got shape ", s.sizes());
  TORCH_CHECK(s.sizes() == t.sizes(), "kdbench: student logits ", s.sizes(),
              " and teacher logits ", t.sizes(), " must have the same shape");
  TORCH_CHECK(s.scalar_type() == t.scalar_type(), "kdbench: student and teacher logits must ",
              "have the same dtype, got ", s.scalar_type(), " and ", t.scalar_type());
  TORCH_CHECK(at::isFloatingType(s.scalar_type()), "kdbench: logits must be floating point, got ",
              s.scalar_type());
  TORCH_CHECK(s.device() == t.device(), "kdbench: logits on different devices");
  TORCH_CHECK(s.size(0) > 0 && s.size(1) > 0, "kdbench: logits must be non-empty, got shape ",
              s.sizes());
  TORCH_CHECK(std::isfinite(T) && T > 0, "kdbench: temperature must be positive, got ", T);
}

void check_target(const at::Tensor& target, const at::Tensor& s) {
  TORCH_CHECK(target.dim() == 1 && target.size(0) == s.size(0), "kdbench: target must be [B] = [",
              s.size(0), "], got shape ", target.sizes());
  TORCH_CHECK(!at::isFloatingType(target.scalar_type()) && target.scalar_type() != at::kBool,
              "kdbench: target must hold integer class indices, got ", target.scalar_type());
  TORCH_CHECK(target.device() == s.device(), "kdbench: target and logits on different devices");
}

at::ScalarType loss_dtype(at::ScalarType logits) {
  return logits == at::kDouble ? at::kDouble : at::kFloat;
}

namespace {

bool use_avx2() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_fwd_cpu(const at::Tensor& s_in,
                                                            const at::Tensor& t_in,
                                                            const int64_t* target, double T,
                                                            double alpha, double beta,
                                                            bool teacher_grad) {
  const auto out_dtype = s_in.scalar_type();
  const auto acc = loss_dtype(out_dtype);
  const at::Tensor s = s_in.to(acc).contiguous();
  const at::Tensor t = t_in.to(acc).contiguous();
  const int64_t B = s.size(0), C = s.size(1);
  at::Tensor gs = at::empty_like(s);
  at::Tensor gt = teacher_grad ? at::empty_like(t) : at::empty({0}, s.options());
  at::Tensor row_loss = at::empty({B}, s.options().dtype(at::kDouble));
  const bool avx2 = use_avx2();
  if (acc == at::kFloat) {
    auto fn = avx2 ? cpu_avx2::loss_rows_float : cpu_default::loss_rows_float;
    fn(s.data_ptr<float>(), t.data_ptr<float>(), target, gs.data_ptr<float>(),
       teacher_grad ? gt.data_ptr<float>() : nullptr, row_loss.data_ptr<double>(), B, C, T,
       alpha, beta);
  } else {
    auto fn = avx2 ? cpu_avx2::loss_rows_double : cpu_default::loss_rows_double;
    fn(s.data_ptr<double>(), t.data_ptr<double>(), target, gs.data_ptr<double>(),
       teacher_grad ? gt.data_ptr<double>() : nullptr, row_loss.data_ptr<double>(), B, C, T,
       alpha, beta);
  }
  at::Tensor loss = row_loss.sum().to(acc);
  return {loss, gs.to(out_dtype), gt.to(out_dtype)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_fwd_cpu(const at::Tensor& s,
                                                               const at::Tensor& t, double T,
                                                               bool teacher_grad) {
  check_logits(s, t, T);
  return loss_fwd_cpu(s, t, nullptr, T, 0.0, 0.0, teacher_grad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dkd_loss_fwd_cpu(
    const at::Tensor& s, const at::Tensor& t, const at::Tensor& target_in, double alpha,
    double beta, double T, bool teacher_grad) {
  check_logits(s, t, T);
  check_target(target_in, s);
  const at::Tensor target = target_in.to(at::kLong).contiguous();
  const int64_t C = s.size(1);
  const int64_t* tp = target.data_ptr<int64_t>();
  for (int64_t b = 0; b < target.size(0); ++b) {
    TORCH_CHECK(tp[b] >= 0 && tp[b] < C, "kdbench: target[", b, "] = ", tp[b],
                " is not a class index in [0, ", C, ")");
  }
  return loss_fwd_cpu(s, t, tp, T, alpha, beta, teacher_grad);
}

}  // namespace kdbench
