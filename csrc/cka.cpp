// Linear CKA between every pair of layer activations, written with ATen so the same code
// runs on CPU (BLAS) and CUDA (cuBLAS).
//
// Forward: each layer's Gram X X^T is computed once (one GEMM), centred in place (double
// centring for the biased HSIC, U-centring for the unbiased estimator of Song et al. 2012
// used by Nguyen et al. 2021), and all Lx x Ly HSIC values come from one GEMM over the
// flattened centred Grams; self-HSIC values are their squared norms.
// Backward: the same structure in reverse. Both centring maps are self-adjoint on symmetric
// matrices, so dX = 2 * centre(sym(dK)) @ X, one GEMM per layer.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <limits>
#include <vector>

#include "kd_ops.h"

namespace kdbench {
namespace {

// Centres a symmetric n x n matrix in place.
void centre_(at::Tensor& g, bool unbiased) {
  const int64_t n = g.size(0);
  if (!unbiased) {
    const at::Tensor r = g.mean(1);  // = column means, g is symmetric
    const at::Tensor total = r.mean();
    g.sub_(r.unsqueeze(1)).sub_(r.unsqueeze(0)).add_(total);
    return;
  }
  g.diagonal().zero_();
  const at::Tensor r = g.sum(1);
  const at::Tensor total = r.sum();
  g.sub_(r.unsqueeze(1), 1.0 / (n - 2))
      .sub_(r.unsqueeze(0), 1.0 / (n - 2))
      .add_(total, 1.0 / ((n - 1.0) * (n - 2.0)));
  g.diagonal().zero_();
}

// [L, n * n]: the centred Gram of every layer, flattened.
at::Tensor centred_grams(at::TensorList xs, bool unbiased) {
  const int64_t n = xs[0].size(0);
  at::Tensor out = at::empty({static_cast<int64_t>(xs.size()), n, n}, xs[0].options());
  for (size_t l = 0; l < xs.size(); ++l) {
    const at::Tensor x = xs[l].reshape({n, -1});
    at::Tensor g = out[static_cast<int64_t>(l)];
    at::mm_out(g, x, x.t());
    centre_(g, unbiased);
  }
  return out.view({static_cast<int64_t>(xs.size()), n * n});
}

void check_inputs(at::TensorList xs, at::TensorList ys, bool unbiased) {
  TORCH_CHECK(!xs.empty() && !ys.empty(), "kdbench: cka_matrix needs at least one activation ",
              "in xs and in ys");
  const at::Tensor& ref = xs[0];
  TORCH_CHECK(ref.dim() >= 1, "kdbench: activations must be [n, ...]");
  const int64_t n = ref.size(0);
  for (const auto& a : {xs, ys}) {
    for (const at::Tensor& x : a) {
      TORCH_CHECK(x.dim() >= 1 && x.size(0) == n, "kdbench: all activations need the same ",
                  "number of samples; got ", x.sizes(), " and n = ", n);
      TORCH_CHECK(x.scalar_type() == ref.scalar_type() &&
                      (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
                  "kdbench: activations must all be float32 or all float64, got ",
                  x.scalar_type(), " and ", ref.scalar_type());
      TORCH_CHECK(x.device() == ref.device(), "kdbench: activations on different devices");
      TORCH_CHECK(x.numel() > 0, "kdbench: empty activation of shape ", x.sizes());
    }
  }
  TORCH_CHECK(n >= 1, "kdbench: activations need at least one sample");
  TORCH_CHECK(!unbiased || n >= 4, "kdbench: the unbiased CKA estimator needs at least 4 ",
              "samples, got ", n);
}

double tiny(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? std::numeric_limits<double>::min()
                                        : std::numeric_limits<float>::min();
}

std::vector<at::Tensor> grams_backward(const at::Tensor& dk, at::TensorList xs, bool unbiased) {
  const int64_t n = xs[0].size(0);
  std::vector<at::Tensor> out;
  out.reserve(xs.size());
  for (size_t l = 0; l < xs.size(); ++l) {
    const at::Tensor w = dk[static_cast<int64_t>(l)].view({n, n});
    at::Tensor ws = (w + w.t()).mul_(0.5);
    centre_(ws, unbiased);
    const at::Tensor x = xs[l].reshape({n, -1});
    out.push_back(at::mm(ws, x).mul_(2.0).view(xs[l].sizes()));
  }
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cka_matrix_fwd(
    at::TensorList xs, at::TensorList ys, bool unbiased) {
  check_inputs(xs, ys, unbiased);
  at::Tensor kx = centred_grams(xs, unbiased);
  at::Tensor ky = centred_grams(ys, unbiased);
  const at::Tensor hsic = at::mm(kx, ky.t());
  at::Tensor nx = kx.norm(2, {1});
  at::Tensor ny = ky.norm(2, {1});
  const double eps = tiny(hsic);
  at::Tensor cka = hsic / (nx.unsqueeze(1) * ny.unsqueeze(0)).clamp_min(eps);
  return {cka, kx, ky, nx, ny};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> cka_matrix_bwd(
    const at::Tensor& grad, at::TensorList xs, at::TensorList ys, const at::Tensor& kx,
    const at::Tensor& ky, const at::Tensor& cka, const at::Tensor& nx, const at::Tensor& ny,
    bool unbiased, bool need_x, bool need_y) {
  const double eps = tiny(cka);
  const at::Tensor g = grad.to(cka.scalar_type());
  // cka = hsic / (nx ny^T): d/dhsic = g / (nx ny^T), d/dnx_i = -sum_j g_ij cka_ij / nx_i.
  const at::Tensor gh = g / (nx.unsqueeze(1) * ny.unsqueeze(0)).clamp_min(eps);
  const at::Tensor gc = g * cka;
  std::vector<at::Tensor> dxs, dys;
  if (need_x) {
    const at::Tensor coef = -gc.sum(1) / (nx * nx).clamp_min(eps);  // d/dkx of nx = kx / nx
    const at::Tensor dkx = at::addmm(kx * coef.unsqueeze(1), gh, ky);
    dxs = grams_backward(dkx, xs, unbiased);
  }
  if (need_y) {
    const at::Tensor coef = -gc.sum(0) / (ny * ny).clamp_min(eps);
    const at::Tensor dky = at::addmm(ky * coef.unsqueeze(1), gh.t(), kx);
    dys = grams_backward(dky, ys, unbiased);
  }
  return {dxs, dys};
}

}  // namespace kdbench
