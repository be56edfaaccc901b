// CPU implementations of kd_loss_fwd / dkd_loss_fwd: argument checks, dtype handling and
// the run-time choice of the row kernel build (AVX2 or portable).
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

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

at::Tensor empty_like_huge_pages(const at::Tensor& like) {
  at::Tensor out = at::empty(like.sizes(), like.options());
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // Large gradient buffers are written once, right after allocation; backing them with
  // transparent huge pages (where the kernel allows it on request) cuts the page-fault
  // cost of that first touch several-fold. Best effort: failure changes nothing.
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (out.nbytes() >= 2 * kHuge) {
    const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t last = (begin + out.nbytes()) & ~(kHuge - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return out;
}

at::Tensor scale_grad_cpu(const at::Tensor& grad, const at::Tensor& g) {
  at::Tensor out = empty_like_huge_pages(grad);
  at::mul_out(out, grad, g.to(grad.scalar_type()));
  return out;
}

namespace {

enum class Isa { kDefault, kAvx2, kAvx512 };

// The widest row-kernel build this CPU runs (KDBENCH_CPU_ISA=default|avx2 caps it).
Isa cpu_isa() {
  static const Isa isa = [] {
#if defined(__GNUC__) && defined(__x86_64__)
    const char* cap = std::getenv("KDBENCH_CPU_ISA");
    const std::string limit = cap != nullptr ? cap : "";
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512dq");
    if (limit == "default") return Isa::kDefault;
    if (avx512 && limit != "avx2") return Isa::kAvx512;
    if (avx2) return Isa::kAvx2;
#endif
    return Isa::kDefault;
  }();
  return isa;
}

template <typename F>
F pick(F f_default, F f_avx2, F f_avx512) {
  switch (cpu_isa()) {
    case Isa::kAvx512: return f_avx512;
    case Isa::kAvx2: return f_avx2;
    default: return f_default;
  }
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
  at::Tensor gs = empty_like_huge_pages(s);
  at::Tensor gt = teacher_grad ? empty_like_huge_pages(t) : at::empty({0}, s.options());
  at::Tensor row_loss = at::empty({B}, s.options().dtype(at::kDouble));
  if (acc == at::kFloat) {
    auto fn = pick(&cpu_default::loss_rows_float, &cpu_avx2::loss_rows_float,
                   &cpu_avx512::loss_rows_float);
    fn(s.data_ptr<float>(), t.data_ptr<float>(), target, gs.data_ptr<float>(),
       teacher_grad ? gt.data_ptr<float>() : nullptr, row_loss.data_ptr<double>(), B, C, T,
       alpha, beta);
  } else {
    auto fn = pick(&cpu_default::loss_rows_double, &cpu_avx2::loss_rows_double,
                   &cpu_avx512::loss_rows_double);
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
