// CUDA implementations of kd_loss_fwd / dkd_loss_fwd, plus the CUDA registrations of the
// (device-generic, cuBLAS-backed) CKA ops.
//
// One row per warp (small C, several rows per block) or per block (large C). Each thread
// keeps its ITEMS elements of the row in registers, so the row is read from global memory
// once, exp is evaluated twice per element, and the gradient is written once; there are
// no B x C temporaries. Rows longer than 16384 (float) / 8192 (double) classes use the
// streaming variant (ITEMS == 0), which re-reads the row and recomputes the exponentials. The per-row formulas are the
// ones the CPU kernels use (kd_math.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "kd_math.h"
#include "kd_ops.h"

namespace kdbench {
namespace {

struct MaxOp {
  __device__ double operator()(double a, double b) const { return (b > a || b != b) ? b : a; }
};
struct SumOp {
  __device__ double operator()(double a, double b) const { return a + b; }
};

// Reduces v over the TPR threads of this row (threadIdx.x), result in every thread.
template <int TPR, typename Op>
__device__ double row_reduce(double v, Op op, double* smem) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
  if constexpr (TPR > 32) {
    constexpr int kWarps = TPR / 32;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // smem may still be read by the previous reduction
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    v = smem[0];
#pragma unroll
    for (int i = 1; i < kWarps; ++i) v = op(v, smem[i]);
  }
  return v;
}

template <int TPR>
constexpr int block_threads() {
  return TPR >= 256 ? TPR : 256;
}

template <typename scalar_t, int TPR, int ITEMS>
__global__ void __launch_bounds__(block_threads<TPR>()) loss_rows_kernel(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t,
                                 const int64_t* __restrict__ target, scalar_t* __restrict__ gs,
                                 scalar_t* __restrict__ gt, double* __restrict__ row_loss,
                                 int64_t B, int64_t C, double T, double alpha, double beta,
                                 double scale) {
  constexpr int kRows = TPR >= 256 ? 1 : 256 / TPR;
  __shared__ double smem_all[kRows * (TPR / 32)];
  double* smem = smem_all + threadIdx.y * (TPR / 32);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.y;
  if (row >= B) return;  // kRows > 1 only for warp-per-row, which never calls __syncthreads
  const int lane = threadIdx.x;
  const scalar_t* sr = s + row * C;
  const scalar_t* tr = t + row * C;
  scalar_t* gsr = gs + row * C;
  scalar_t* gtr = gt != nullptr ? gt + row * C : nullptr;
  int64_t g = -1;
  if (target != nullptr) {
    g = target[row];  // range-checked by the host wrapper
  }
  const scalar_t neg_inf = static_cast<scalar_t>(-INFINITY);
  const scalar_t inv_T = static_cast<scalar_t>(1.0 / T);

  // Pass 1: row maxima (over the non-target classes for DKD).
  scalar_t va[ITEMS > 0 ? ITEMS : 1], vb[ITEMS > 0 ? ITEMS : 1];
  double ms = -INFINITY, mt = -INFINITY;
  if constexpr (ITEMS > 0) {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t j = static_cast<int64_t>(i) * TPR + lane;
      const bool valid = j < C && j != g;
      va[i] = valid ? sr[j] : neg_inf;
      vb[i] = valid ? tr[j] : neg_inf;
      ms = MaxOp()(ms, va[i]);
      mt = MaxOp()(mt, vb[i]);
    }
  } else {
    for (int64_t j = lane; j < C; j += TPR) {
      if (j == g) continue;
      ms = MaxOp()(ms, sr[j]);
      mt = MaxOp()(mt, tr[j]);
    }
  }
  ms = row_reduce<TPR>(ms, MaxOp(), smem);
  mt = row_reduce<TPR>(mt, MaxOp(), smem);
  if (g >= 0 && C == 1) ms = mt = 0;
  const scalar_t msv = static_cast<scalar_t>(ms), mtv = static_cast<scalar_t>(mt);

  // Pass 2: the two exponentials per element and the row sums.
  double sa = 0, sb = 0, sd = 0;
  if constexpr (ITEMS > 0) {
    scalar_t pa = 0, pb = 0, pd = 0;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t j = static_cast<int64_t>(i) * TPR + lane;
      const bool valid = j < C && j != g;
      const scalar_t xa = (va[i] - msv) * inv_T;
      const scalar_t xb = (vb[i] - mtv) * inv_T;
      const scalar_t ea = valid ? exp(xa) : scalar_t(0);
      const scalar_t eb = valid ? exp(xb) : scalar_t(0);
      pa += ea;
      pb += eb;
      pd += valid ? eb * (xb - xa) : scalar_t(0);
      va[i] = ea;
      vb[i] = eb;
    }
    sa = pa;
    sb = pb;
    sd = pd;
  } else {
    for (int64_t j = lane; j < C; j += TPR) {
      if (j == g) continue;
      const scalar_t xa = (sr[j] - msv) * inv_T;
      const scalar_t xb = (tr[j] - mtv) * inv_T;
      const scalar_t ea = exp(xa), eb = exp(xb);
      sa += ea;
      sb += eb;
      sd += static_cast<double>(eb) * (xb - xa);
    }
  }
  sa = row_reduce<TPR>(sa, SumOp(), smem);
  sb = row_reduce<TPR>(sb, SumOp(), smem);
  sd = row_reduce<TPR>(sd, SumOp(), smem);

  RowCoef coef;
  if (g < 0) {
    coef = kd_row_coef(sa, sb, sd, scale, T);
  } else {
    const double xa_g = (static_cast<double>(sr[g]) - ms) / T;
    const double xb_g = (static_cast<double>(tr[g]) - mt) / T;
    coef = dkd_row_coef(sa, sb, sd, xa_g, xb_g, C > 1, alpha, beta, scale, T);
  }
  const scalar_t ca = static_cast<scalar_t>(coef.ca), cb = static_cast<scalar_t>(coef.cb);
  const scalar_t t1 = static_cast<scalar_t>(coef.t1), t0 = static_cast<scalar_t>(coef.t0);

  // Pass 3: gradients.
  auto write = [&](int64_t j, scalar_t ea, scalar_t eb) {
    if (j == g) {
      gsr[j] = static_cast<scalar_t>(coef.gs_target);
      if (gtr != nullptr) gtr[j] = static_cast<scalar_t>(coef.gt_target);
      return;
    }
    gsr[j] = student_grad(ea, eb, ca, cb);
    if (gtr != nullptr) {
      const scalar_t diff = (tr[j] - mtv) * inv_T - (sr[j] - msv) * inv_T;
      gtr[j] = teacher_grad(eb, diff, t1, t0);
    }
  };
  if constexpr (ITEMS > 0) {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t j = static_cast<int64_t>(i) * TPR + lane;
      if (j < C) write(j, va[i], vb[i]);
    }
  } else {
    for (int64_t j = lane; j < C; j += TPR) {
      if (j == g) {
        write(j, 0, 0);
        continue;
      }
      write(j, exp((sr[j] - msv) * inv_T), exp((tr[j] - mtv) * inv_T));
    }
  }
  if (lane == 0) row_loss[row] = coef.loss;
}

template <typename scalar_t, int TPR, int ITEMS>
void launch_rows(const scalar_t* s, const scalar_t* t, const int64_t* target, scalar_t* gs,
                 scalar_t* gt, double* row_loss, int64_t B, int64_t C, double T, double alpha,
                 double beta) {
  constexpr int kRows = TPR >= 256 ? 1 : 256 / TPR;
  const dim3 block(TPR, kRows);
  const dim3 grid(static_cast<unsigned>((B + kRows - 1) / kRows));
  const double scale = T / static_cast<double>(B);
  loss_rows_kernel<scalar_t, TPR, ITEMS><<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(
      s, t, target, gs, gt, row_loss, B, C, T, alpha, beta, scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Row-cache sizes keep the cached values within 64 32-bit registers per thread (half as
// many items for double), so every configuration fits its block size without spilling.
template <typename scalar_t>
void loss_rows_cuda(const scalar_t* s, const scalar_t* t, const int64_t* target, scalar_t* gs,
                    scalar_t* gt, double* row_loss, int64_t B, int64_t C, double T,
                    double alpha, double beta) {
  constexpr int kWide = sizeof(scalar_t) == 4 ? 32 : 16;  // items per thread, large rows
  if (C <= 128) {
    launch_rows<scalar_t, 32, 4>(s, t, target, gs, gt, row_loss, B, C, T, alpha, beta);
  } else if (C <= 32 * kWide) {
    launch_rows<scalar_t, 32, kWide>(s, t, target, gs, gt, row_loss, B, C, T, alpha, beta);
  } else if (C <= 256 * 16) {
    launch_rows<scalar_t, 256, 16>(s, t, target, gs, gt, row_loss, B, C, T, alpha, beta);
  } else if (C <= 512 * kWide) {
    launch_rows<scalar_t, 512, kWide>(s, t, target, gs, gt, row_loss, B, C, T, alpha, beta);
  } else {
    // longer rows: re-read the row (from L2) and recompute the exponentials
    launch_rows<scalar_t, 1024, 0>(s, t, target, gs, gt, row_loss, B, C, T, alpha, beta);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_fwd_cuda(const at::Tensor& s_in,
                                                             const at::Tensor& t_in,
                                                             const at::Tensor* target_in,
                                                             double T, double alpha,
                                                             double beta, bool teacher_grad) {
  const c10::cuda::CUDAGuard guard(s_in.device());
  const auto out_dtype = s_in.scalar_type();
  const auto acc = loss_dtype(out_dtype);
  const at::Tensor s = s_in.to(acc).contiguous();
  const at::Tensor t = t_in.to(acc).contiguous();
  at::Tensor target;
  if (target_in != nullptr) target = target_in->to(at::kLong).contiguous();
  const int64_t B = s.size(0), C = s.size(1);
  at::Tensor gs = at::empty_like(s);
  at::Tensor gt = teacher_grad ? at::empty_like(t) : at::empty({0}, s.options());
  at::Tensor row_loss = at::empty({B}, s.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(acc, "kdbench_loss_rows_cuda", [&] {
    loss_rows_cuda<scalar_t>(s.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(),
                             target_in != nullptr ? target.data_ptr<int64_t>() : nullptr,
                             gs.data_ptr<scalar_t>(),
                             teacher_grad ? gt.data_ptr<scalar_t>() : nullptr,
                             row_loss.data_ptr<double>(), B, C, T, alpha, beta);
  });
  at::Tensor loss = row_loss.sum().to(acc);
  return {loss, gs.to(out_dtype), gt.to(out_dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_fwd_cuda(const at::Tensor& s,
                                                                const at::Tensor& t, double T,
                                                                bool teacher_grad) {
  check_logits(s, t, T);
  return loss_fwd_cuda(s, t, nullptr, T, 0.0, 0.0, teacher_grad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dkd_loss_fwd_cuda(
    const at::Tensor& s, const at::Tensor& t, const at::Tensor& target, double alpha,
    double beta, double T, bool teacher_grad) {
  check_logits(s, t, T);
  check_target(target, s);
  // Checked here (one small reduction and a sync) so a bad label is a clear error rather
  // than a device-side assert that poisons the CUDA context.
  // Compared as int64: in a narrower target dtype (int8 / uint8 / int16) the bound C would
  // be cast to that dtype and wrap, rejecting valid labels.
  const int64_t C = s.size(1);
  const at::Tensor target_l = target.to(at::kLong);
  TORCH_CHECK(((target_l >= 0) & (target_l < C)).all().item<bool>(),
              "kdbench: target holds a value that is not a class index in [0, ", C, ")");
  return loss_fwd_cuda(s, t, &target_l, T, alpha, beta, teacher_grad);
}

}  // namespace
}  // namespace kdbench

TORCH_LIBRARY_IMPL(kdbench, CUDA, m) {
  m.impl("kd_loss_fwd", &kdbench::kd_loss_fwd_cuda);
  m.impl("dkd_loss_fwd", &kdbench::dkd_loss_fwd_cuda);
  m.impl("scale_grad", [](const at::Tensor& grad, const at::Tensor& g) {
    return grad * g.to(grad.scalar_type());
  });
  m.impl("cka_matrix_fwd", &kdbench::cka_matrix_fwd);
  m.impl("cka_matrix_bwd", &kdbench::cka_matrix_bwd);
}
