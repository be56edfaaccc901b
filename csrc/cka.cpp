// Linear CKA between every pair of layer activations. Device-generic ATen code (CPU BLAS,
// cuBLAS), with an AVX2 kernel for the float32 Grams on CPU.
//
// Which kernel computes the float32 CPU Grams is decided once per process (gram_choice),
// by CPU capability: the AVX-512 rank-k kernel where the CPU has AVX-512F, else the AVX2
// one, else GEMMs through ATen's BLAS on the upper-triangle tiles. A rank-k kernel does
// half a GEMM's FLOPs; at the vector width BLAS's GEMM runs at, it wins (an AVX2 kernel
// does not beat MKL's 512-bit GEMM by enough, hence the AVX-512 one). The choice is by CPU,
// not by a timing, so that every process on a machine computes the same bits;
// KDBENCH_GRAM=avx2|avx512|blas forces one, KDBENCH_GRAM=measure times every available one
// at first use. torch.ops.kdbench.gram_backend() says which runs and why.
//
// Forward, per layer: the features are centred (Xc = X - 1 mean^T) and only the upper
// triangle of the Gram Xc Xc^T is computed (a symmetric rank-k update: half a GEMM's
// FLOPs); for the biased HSIC that Gram is already the doubly centred one. The unbiased
// estimator (Song et al. 2012, as used by Nguyen et al. 2021) U-centres it; U-centring
// removes any a 1^T + 1 a^T term, so centring the features first changes nothing there but
// rounding. Each centred Gram K is stored packed: its n(n+1)/2 upper-triangle entries with
// the off-diagonal ones scaled by sqrt(2), so that <pack K, pack L> = <K, L>_F. All
// Lx x Ly HSIC values are then one GEMM over the packed Grams (half the flattened size),
// and the self-HSIC norms are their norms. On CPU the layers run in parallel (one thread
// per layer, each GEMM single-threaded inside the parallel region).
// Backward: the packed gradient is unpacked into a symmetric n x n matrix S; both centring
// maps are self-adjoint on symmetric matrices and their results have zero row sums, so
// dX = 2 centre(S) @ X, one GEMM per layer (no centred copy of X is kept).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "gram_cpu.h"
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

// Whether x takes the CPU-specific code (AVX2 Grams, plain-loop packing, layers in
// parallel). KDBENCH_CKA_GENERIC=1 sends CPU tensors through the device-generic ATen code
// that CUDA runs, so that the tests check it on machines without a GPU.
bool cpu_path(const at::Tensor& x) {
  static const bool generic = std::getenv("KDBENCH_CKA_GENERIC") != nullptr &&
                              std::string(std::getenv("KDBENCH_CKA_GENERIC")) == "1";
  return x.device().is_cpu() && !generic;
}

// --- which kernel computes the float32 Grams on CPU: decided once per process ----------

enum class GramImpl { kAvx2, kAvx512, kBlas };

struct GramChoice {
  GramImpl impl;
  std::string reason;
};

bool cpu_has_avx2() {
  static const bool ok = kGramAvx2Built && [] {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return false;
#endif
  }();
  return ok;
}

bool cpu_has_avx512() {
  static const bool ok = kGramAvx512Built && [] {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("fma");
#else
    return false;
#endif
  }();
  return ok;
}

const char* gram_name(GramImpl impl) {
  switch (impl) {
    case GramImpl::kAvx2:
      return "avx2";
    case GramImpl::kAvx512:
      return "avx512";
    default:
      return "blas";
  }
}

void centred_gram_upper_impl(const at::Tensor& x, at::Tensor g, std::vector<float>& work,
                             GramImpl impl);

// Seconds (best of `repeats`) for the centred Gram of a [n, d] float32 input with `impl`,
// each thread of the pool timing its own copy at once (the load of the real op); the
// slowest thread's time.
double time_gram(int64_t n, int64_t d, GramImpl impl, int64_t repeats) {
  const int64_t T = std::max<int64_t>(1, at::get_num_threads());
  std::vector<double> best(static_cast<size_t>(T), std::numeric_limits<double>::infinity());
  // fixed pseudo-random data (no draw from torch's generator: the probe changes no state)
  const at::Tensor xs = at::arange(T * n * d, at::TensorOptions().dtype(at::kDouble))
                            .mul_(0.6180339887498949)
                            .frac_()
                            .to(at::kFloat)
                            .view({T, n, d});
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    c10::AutoGradMode no_grad(false);
    at::Tensor g = at::empty({n, n}, xs.options());
    std::vector<float> work;
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t r = 0; r < repeats; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        centred_gram_upper_impl(xs[t], g, work, impl);
        const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
        best[t] = std::min(best[t], dt.count());
      }
    }
  });
  return *std::max_element(best.begin(), best.end());
}

constexpr int64_t kProbeN = 256, kProbeD = 2048, kProbeRepeats = 5;

GramChoice decide_gram() {
  const char* env = std::getenv("KDBENCH_GRAM");
  const std::string want = env == nullptr ? "" : env;  // unset or empty: by CPU
  TORCH_CHECK(want.empty() || want == "avx2" || want == "avx512" || want == "blas" ||
                  want == "measure",
              "kdbench: KDBENCH_GRAM must be avx2, avx512, blas or measure, got '", want, "'");
  if (want == "blas") return {GramImpl::kBlas, "KDBENCH_GRAM=blas"};
  if (want == "avx512") {
    TORCH_CHECK(cpu_has_avx512(), "kdbench: KDBENCH_GRAM=avx512 but the CPU (or build) has "
                "no AVX-512F; use avx2, blas or measure");
    return {GramImpl::kAvx512, "KDBENCH_GRAM=avx512"};
  }
  if (!cpu_has_avx2()) return {GramImpl::kBlas, "the CPU (or build) has no AVX2 + FMA"};
  if (want == "avx2") return {GramImpl::kAvx2, "KDBENCH_GRAM=avx2"};
  if (want == "measure") {
    std::vector<GramImpl> impls = {GramImpl::kAvx2, GramImpl::kBlas};
    if (cpu_has_avx512()) impls.insert(impls.begin(), GramImpl::kAvx512);
    std::string times = "KDBENCH_GRAM=measure: 256x2048 Gram";
    GramImpl best = impls[0];
    double best_s = std::numeric_limits<double>::infinity();
    for (const GramImpl impl : impls) {
      const double s = time_gram(kProbeN, kProbeD, impl, kProbeRepeats);
      times += std::string(" ") + gram_name(impl) + " " + std::to_string(s * 1e3) + " ms";
      if (s < best_s) best = impl, best_s = s;
    }
    return {best, times};
  }
  if (cpu_has_avx512()) {
    return {GramImpl::kAvx512, "CPU with AVX-512F: AVX-512 rank-k kernel (half a GEMM's FLOPs)"};
  }
  return {GramImpl::kAvx2, "AVX2 CPU: AVX2 rank-k kernel (half a GEMM's FLOPs)"};
}

const GramChoice& gram_choice() {
  static const GramChoice choice = decide_gram();
  return choice;
}

// The kernel for the Grams of activations like x ([n, ...]). Small Grams take the AVX2
// kernel when the choice is BLAS but the CPU has AVX2 (measure chose BLAS): a GEMM per tile
// and chunk costs more in calls than it saves there. Same shape, same kernel: the choice
// stays deterministic.
GramImpl gram_impl_for(const at::Tensor& x) {
  if (!cpu_path(x) || x.scalar_type() != at::kFloat) return GramImpl::kBlas;
  const int64_t n = x.size(0), d = x.numel() / std::max<int64_t>(n, 1);
  const bool small = n < 128 || d < 256;
  static const bool forced = [] {
    const char* env = std::getenv("KDBENCH_GRAM");
    return env != nullptr && (std::string(env) == "avx2" || std::string(env) == "avx512" ||
                              std::string(env) == "blas");
  }();
  const GramImpl chosen = gram_choice().impl;
  if (small && chosen == GramImpl::kBlas && cpu_has_avx2() && !forced) return GramImpl::kAvx2;
  return chosen;
}

// CPU BLAS: the features in chunks of kBlasKc columns; each chunk is centred into a small
// buffer (it stays in cache, X is read from memory once more for the means only) and its
// row blocks right of the diagonal are added by GEMM (5/8 of a full GEMM's FLOPs, n = 256).
void gram_upper_blas(const at::Tensor& x, at::Tensor g) {
  constexpr int64_t kBlasKc = 256;
  constexpr int64_t kBlock = 64;
  const int64_t n = x.size(0), d = x.size(1);
  const at::Tensor buf = at::empty({n, std::min(kBlasKc, d)}, x.options());
  for (int64_t k0 = 0; k0 < d; k0 += kBlasKc) {
    const int64_t kc = std::min(kBlasKc, d - k0);
    const at::Tensor chunk = x.narrow(1, k0, kc);
    at::Tensor xc = buf.narrow(1, 0, kc);
    at::sub_out(xc, chunk, chunk.mean(0));
    for (int64_t r = 0; r < n; r += kBlock) {
      const int64_t rows = std::min(kBlock, n - r);
      at::Tensor out = g.narrow(0, r, rows).narrow(1, r, n - r);
      const at::Tensor a = xc.narrow(0, r, rows), b = xc.narrow(0, r, n - r).t();
      if (k0 == 0) {
        at::mm_out(out, a, b);
      } else {
        out.addmm_(a, b);
      }
    }
  }
}

// Writes the upper triangle (i <= j) of the centred Gram of x ([n, d] contiguous) into g
// ([n, n] contiguous); entries below the diagonal are unspecified. `work` is scratch space.
void centred_gram_upper_impl(const at::Tensor& x, at::Tensor g, std::vector<float>& work,
                             GramImpl impl) {
  const int64_t n = x.size(0);
  if (impl == GramImpl::kAvx2) {
    const int64_t d = x.size(1);
    work.resize(static_cast<size_t>(gram_upper_avx2_workspace(n, d)));
    gram_upper_avx2(x.data_ptr<float>(), n, d, g.data_ptr<float>(), work.data());
    return;
  }
  if (impl == GramImpl::kAvx512) {
    const int64_t d = x.size(1);
    work.resize(static_cast<size_t>(gram_upper_avx512_workspace(n, d)));
    gram_upper_avx512(x.data_ptr<float>(), n, d, g.data_ptr<float>(), work.data());
    return;
  }
  if (!cpu_path(x)) {
    const at::Tensor xc = x - x.mean(0);
    at::mm_out(g, xc, xc.t());
    return;
  }
  gram_upper_blas(x, g);
}

void centred_gram_upper(const at::Tensor& act, at::Tensor g, std::vector<float>& work,
                        GramImpl impl) {
  centred_gram_upper_impl(act.reshape({act.size(0), -1}).contiguous(), g, work, impl);
}

// Copies the upper triangle of g ([n, n]) row by row into p ([n(n+1)/2]), off-diagonal
// entries times `off` (sqrt(2) for the weighted packing, 1 for the raw one).
void pack_upper_cpu(const at::Tensor& g, at::Tensor p, double off) {
  const int64_t n = g.size(0);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "kdbench_pack_upper", [&] {
    const scalar_t* src = g.data_ptr<scalar_t>();
    scalar_t* dst = p.data_ptr<scalar_t>();
    const auto w = static_cast<scalar_t>(off);
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t* row = src + i * n;
      *dst++ = row[i];
      for (int64_t j = i + 1; j < n; ++j) *dst++ = row[j] * w;
    }
  });
}

// Index tensors of the packed upper triangle of an n x n matrix.
struct Triangle {
  at::Tensor rows, cols;  // [m] long: entry k is (rows[k], cols[k]), rows[k] <= cols[k]
  at::Tensor flat;        // rows * n + cols
  at::Tensor flat_t;      // cols * n + rows
  at::Tensor diag;        // [m] bool
  at::Tensor weight;      // [m]: 1 on the diagonal, sqrt(2) off it
};

Triangle triangle(int64_t n, const at::TensorOptions& opts) {
  Triangle t;
  const at::Tensor ij = at::triu_indices(n, n, 0, opts.dtype(at::kLong));
  t.rows = ij[0];
  t.cols = ij[1];
  t.flat = t.rows * n + t.cols;
  t.flat_t = t.cols * n + t.rows;
  t.diag = t.rows == t.cols;
  t.weight = at::where(t.diag, at::ones({}, opts), at::full({}, std::sqrt(2.0), opts));
  return t;
}

// [L, n(n+1)/2]: every layer's centred (or U-centred) Gram, packed and weighted. On CPU
// the layers run in parallel, each Gram packed right after it is computed (still in cache).
at::Tensor packed_grams(at::TensorList acts, bool unbiased, const Triangle& tri) {
  const int64_t n = acts[0].size(0);
  const auto L = static_cast<int64_t>(acts.size());
  const at::TensorOptions opts = acts[0].options();
  at::Tensor p;
  const GramImpl impl = gram_impl_for(acts[0]);  // decided here, outside the parallel region
  if (cpu_path(acts[0])) {
    p = at::empty({L, n * (n + 1) / 2}, opts);
    const double off = unbiased ? 1.0 : std::sqrt(2.0);
    at::parallel_for(0, L, 1, [&](int64_t begin, int64_t end) {
      c10::AutoGradMode no_grad(false);  // worker threads do not inherit the caller's grad mode
      at::Tensor g = at::empty({n, n}, opts);
      std::vector<float> work;
      for (int64_t l = begin; l < end; ++l) {
        centred_gram_upper(acts[l], g, work, impl);
        pack_upper_cpu(g, p[l], off);
      }
    });
    if (!unbiased) return p;
  } else {
    at::Tensor grams = at::empty({L, n, n}, opts);
    std::vector<float> work;
    for (int64_t l = 0; l < L; ++l) centred_gram_upper(acts[l], grams[l], work, impl);
    p = grams.view({L, n * n}).index_select(1, tri.flat);
    if (!unbiased) return p.mul_(tri.weight);
  }
  // U-centring on the packed entries: zero diagonal, full-matrix row sums r, then
  // K_ij - (r_i + r_j) / (n - 2) + sum(r) / ((n - 1)(n - 2)) off the diagonal.
  p.masked_fill_(tri.diag, 0);
  at::Tensor r = at::zeros({L, n}, p.options());
  r.index_add_(1, tri.rows, p).index_add_(1, tri.cols, p);
  const at::Tensor total = r.sum(1, true);
  p.sub_(r.index_select(1, tri.rows).add_(r.index_select(1, tri.cols)), 1.0 / (n - 2))
      .add_(total, 1.0 / ((n - 1.0) * (n - 2.0)));
  p.masked_fill_(tri.diag, 0);
  return p.mul_(tri.weight);
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

// 2 * centre(S) for one layer on CPU, S the symmetric matrix with <pack K, v> = <K, S>:
// S_ij = S_ji = w_ij v_ij / 2 off the diagonal, S_ii = v_ii (v = packed gradient [m]).
// Plain loops, so that nothing inside the parallel region starts another one.
void unpack_centred_cpu(const at::Tensor& v, at::Tensor s, bool unbiased) {
  const int64_t n = s.size(0);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "kdbench_unpack_centred", [&] {
    const scalar_t* src = v.data_ptr<scalar_t>();
    scalar_t* S = s.data_ptr<scalar_t>();
    const auto r2 = static_cast<scalar_t>(std::sqrt(2.0));  // 2 * sqrt(2) / 2
    for (int64_t i = 0; i < n; ++i) {
      S[i * n + i] = unbiased ? scalar_t(0) : 2 * *src;
      ++src;
      for (int64_t j = i + 1; j < n; ++j, ++src) S[i * n + j] = S[j * n + i] = r2 * *src;
    }
    std::vector<double> r(static_cast<size_t>(n));
    double total = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      double acc = 0.0;
      for (int64_t j = 0; j < n; ++j) acc += S[i * n + j];
      r[i] = acc;
      total += acc;
    }
    if (!unbiased) {  // H S H: subtract row and column means, add the grand mean
      for (int64_t i = 0; i < n; ++i) r[i] /= static_cast<double>(n);
      const double mean = total / (static_cast<double>(n) * n);
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < n; ++j) S[i * n + j] -= static_cast<scalar_t>(r[i] + r[j] - mean);
      }
      return;
    }
    const double a = 1.0 / (n - 2.0), c = total / ((n - 1.0) * (n - 2.0));
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        S[i * n + j] = i == j ? scalar_t(0)
                              : static_cast<scalar_t>(S[i * n + j] - (r[i] + r[j]) * a + c);
      }
    }
  });
}

// d/dX of every layer from the gradient w.r.t. its packed Gram ([L, n(n+1)/2]).
std::vector<at::Tensor> grams_backward(const at::Tensor& dp, at::TensorList acts, bool unbiased,
                                       const Triangle& tri) {
  const int64_t n = acts[0].size(0);
  const auto L = static_cast<int64_t>(acts.size());
  std::vector<at::Tensor> out(acts.size());
  if (cpu_path(dp)) {
    const at::Tensor v = dp.contiguous();
    at::parallel_for(0, L, 1, [&](int64_t begin, int64_t end) {
      c10::AutoGradMode no_grad(false);  // worker threads do not inherit the caller's grad mode
      at::Tensor s = at::empty({n, n}, dp.options());
      for (int64_t l = begin; l < end; ++l) {
        unpack_centred_cpu(v[l], s, unbiased);
        const at::Tensor x = acts[l].reshape({n, -1});
        at::Tensor dx = at::empty({n, x.size(1)}, x.options());
        at::mm_out(dx, s, x);
        out[l] = dx.view(acts[l].sizes());
      }
    });
    return out;
  }
  // Device-generic: S from the packed gradient by scatter, then centre(S) @ X per layer.
  const at::Tensor half = dp * tri.weight.mul(0.5);
  at::Tensor s = at::zeros({L, n * n}, dp.options());
  s.index_add_(1, tri.flat, half).index_add_(1, tri.flat_t, half);
  s = s.view({L, n, n});
  for (int64_t l = 0; l < L; ++l) {
    at::Tensor sl = s[l];
    centre_(sl, unbiased);
    const at::Tensor x = acts[l].reshape({n, -1});
    out[l] = at::mm(sl, x).mul_(2.0).view(acts[l].sizes());
  }
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cka_matrix_fwd(
    at::TensorList xs, at::TensorList ys, bool unbiased) {
  check_inputs(xs, ys, unbiased);
  // the index tensors are only needed by the device-generic code and for U-centring
  const bool need_tri = unbiased || !cpu_path(xs[0]);
  const Triangle tri = need_tri ? triangle(xs[0].size(0), xs[0].options()) : Triangle{};
  at::Tensor kx = packed_grams(xs, unbiased, tri);
  at::Tensor ky = packed_grams(ys, unbiased, tri);
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
  const Triangle tri = cpu_path(kx) ? Triangle{} : triangle(xs[0].size(0), kx.options());
  // cka = hsic / (nx ny^T): d/dhsic = g / (nx ny^T), d/dnx_i = -sum_j g_ij cka_ij / nx_i.
  const at::Tensor gh = g / (nx.unsqueeze(1) * ny.unsqueeze(0)).clamp_min(eps);
  const at::Tensor gc = g * cka;
  std::vector<at::Tensor> dxs, dys;
  if (need_x) {
    const at::Tensor coef = -gc.sum(1) / (nx * nx).clamp_min(eps);  // d/dkx of nx = kx / nx
    const at::Tensor dkx = at::addmm(kx * coef.unsqueeze(1), gh, ky);
    dxs = grams_backward(dkx, xs, unbiased, tri);
  }
  if (need_y) {
    const at::Tensor coef = -gc.sum(0) / (ny * ny).clamp_min(eps);
    const at::Tensor dky = at::addmm(ky * coef.unsqueeze(1), gh.t(), kx);
    dys = grams_backward(dky, ys, unbiased, tri);
  }
  return {dxs, dys};
}

namespace {

// ("avx2", "avx512" or "blas", why): the kernel of the float32 CPU Grams in this process.
std::tuple<std::string, std::string> gram_backend() {
  const GramChoice& c = gram_choice();
  return {gram_name(c.impl), c.reason};
}

// [avx2, avx512, blas] seconds (NaN where the CPU lacks the instructions): the best of
// `repeats` centred float32 [n, d] Grams with each kernel, every thread of the pool timing
// its own at once.
std::vector<double> gram_probe(int64_t n, int64_t d, int64_t repeats) {
  TORCH_CHECK(n >= 1 && d >= 1 && repeats >= 1, "kdbench: gram_probe needs n, d, repeats >= 1");
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double avx2 = cpu_has_avx2() ? time_gram(n, d, GramImpl::kAvx2, repeats) : nan;
  const double avx512 = cpu_has_avx512() ? time_gram(n, d, GramImpl::kAvx512, repeats) : nan;
  return {avx2, avx512, time_gram(n, d, GramImpl::kBlas, repeats)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kdbench, m) {
  m.def("gram_backend() -> (str, str)", &gram_backend);
  m.def("gram_probe(int n, int d, int repeats) -> float[]", &gram_probe);
}

}  // namespace kdbench
