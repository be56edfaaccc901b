// AVX2 + FMA kernel for the upper triangle of a centred Gram matrix, G = Xc Xc^T with
// Xc = X - 1 mean^T, float32 (a symmetric rank-k update: about half the FLOPs of a GEMM).
//
// GotoBLAS-style: the feature dimension is cut into chunks of KC columns; each chunk's
// column means are taken, the chunk is centred while it is packed once (24-row panels,
// transposed 8 x 8 at a time), then a 4 x 24 register-tile kernel accumulates every tile
// that touches the upper triangle. Only tiles crossing the diagonal compute a few entries
// below it.
// The strictly lower triangle of G is left as it was (callers read the upper triangle).
// Compiled with the AVX2 target for this translation unit only; the caller checks the CPU.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC target("avx2,fma")
#define KDBENCH_GRAM_AVX2 1
#include <immintrin.h>
#endif

// No standard-library templates here: anything instantiated in this translation unit is
// built for AVX2 and could be merged with the portable copies of other units.
#include <cstdint>

#include "gram_cpu.h"

namespace kdbench {

#if defined(KDBENCH_GRAM_AVX2)

namespace {

// Register tile: 4 rows x 24 columns (12 accumulators). Both operands are rows of the same
// centred chunk, so one packing serves both: panels of 24 rows, k-major (out[p][k][r]); a
// 4-row slice of a panel is the left operand (stride 24 per k), the panel the right one.
constexpr int64_t kMr = 4;
constexpr int64_t kNr = 24;
constexpr int64_t kKc = 256;  // feature chunk: the packed chunk (n x 256) stays in L2

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

inline void transpose8(__m256* v) {
  const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
  const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
  const __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
  const __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  v[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  v[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  v[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  v[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  v[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  v[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  v[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  v[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// Packs the centred chunk x[:, k0:k0+kc] - mean into panels of kNr rows, k-major:
// out[p][k][r] = x[p*kNr + r, k0 + k] - mean[k0 + k]; rows past n are zero.
void pack_centred(const float* x, int64_t ldx, const float* mean, int64_t n, int64_t k0,
                  int64_t kc, float* out) {
  const int64_t panels = (n + kNr - 1) / kNr;
  const int64_t kv = kc / 8 * 8;
  for (int64_t p = 0; p < panels; ++p) {
    float* dst = out + p * kc * kNr;
    for (int64_t k = 0; k < kv; k += 8) {
      const __m256 m = _mm256_loadu_ps(mean + k0 + k);
      for (int64_t g = 0; g < kNr; g += 8) {
        __m256 v[8];
        for (int64_t r = 0; r < 8; ++r) {
          const int64_t row = p * kNr + g + r;
          v[r] = row < n ? _mm256_sub_ps(_mm256_loadu_ps(x + row * ldx + k0 + k), m)
                         : _mm256_setzero_ps();
        }
        transpose8(v);
        for (int64_t j = 0; j < 8; ++j) _mm256_storeu_ps(dst + (k + j) * kNr + g, v[j]);
      }
    }
    for (int64_t k = kv; k < kc; ++k) {
      for (int64_t r = 0; r < kNr; ++r) {
        const int64_t row = p * kNr + r;
        dst[k * kNr + r] = row < n ? x[row * ldx + k0 + k] - mean[k0 + k] : 0.0f;
      }
    }
  }
}

// c[0:rows, 0:cols] (+)= a^T b over kc for one 4 x 24 tile; a steps by kNr per k.
void tile_4x24(const float* a, const float* b, int64_t kc, float* c, int64_t ldc, bool add,
               int64_t rows, int64_t cols) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c02 = _mm256_setzero_ps();
  __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps(), c12 = _mm256_setzero_ps();
  __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(), c22 = _mm256_setzero_ps();
  __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps(), c32 = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b);
    const __m256 b1 = _mm256_loadu_ps(b + 8);
    const __m256 b2 = _mm256_loadu_ps(b + 16);
    __m256 av = _mm256_broadcast_ss(a + 0);
    c00 = _mm256_fmadd_ps(av, b0, c00);
    c01 = _mm256_fmadd_ps(av, b1, c01);
    c02 = _mm256_fmadd_ps(av, b2, c02);
    av = _mm256_broadcast_ss(a + 1);
    c10 = _mm256_fmadd_ps(av, b0, c10);
    c11 = _mm256_fmadd_ps(av, b1, c11);
    c12 = _mm256_fmadd_ps(av, b2, c12);
    av = _mm256_broadcast_ss(a + 2);
    c20 = _mm256_fmadd_ps(av, b0, c20);
    c21 = _mm256_fmadd_ps(av, b1, c21);
    c22 = _mm256_fmadd_ps(av, b2, c22);
    av = _mm256_broadcast_ss(a + 3);
    c30 = _mm256_fmadd_ps(av, b0, c30);
    c31 = _mm256_fmadd_ps(av, b1, c31);
    c32 = _mm256_fmadd_ps(av, b2, c32);
    a += kNr;
    b += kNr;
  }
  alignas(32) float tile[kMr][kNr];
  _mm256_store_ps(tile[0], c00);
  _mm256_store_ps(tile[0] + 8, c01);
  _mm256_store_ps(tile[0] + 16, c02);
  _mm256_store_ps(tile[1], c10);
  _mm256_store_ps(tile[1] + 8, c11);
  _mm256_store_ps(tile[1] + 16, c12);
  _mm256_store_ps(tile[2], c20);
  _mm256_store_ps(tile[2] + 8, c21);
  _mm256_store_ps(tile[2] + 16, c22);
  _mm256_store_ps(tile[3], c30);
  _mm256_store_ps(tile[3] + 8, c31);
  _mm256_store_ps(tile[3] + 16, c32);
  if (cols == kNr) {
    for (int64_t r = 0; r < rows; ++r) {
      float* dst = c + r * ldc;
      for (int64_t j = 0; j < kNr; j += 8) {
        __m256 v = _mm256_load_ps(tile[r] + j);
        if (add) v = _mm256_add_ps(v, _mm256_loadu_ps(dst + j));
        _mm256_storeu_ps(dst + j, v);
      }
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* dst = c + r * ldc;
    for (int64_t j = 0; j < cols; ++j) dst[j] = add ? dst[j] + tile[r][j] : tile[r][j];
  }
}

}  // namespace

int64_t gram_upper_avx2_workspace(int64_t n, int64_t d) {
  return (n + kNr - 1) / kNr * kNr * min64(kKc, d) + 3 * d;
}

void gram_upper_avx2(const float* x, int64_t n, int64_t d, float* g, float* work) {
  const int64_t panels = (n + kNr - 1) / kNr;
  double* acc = reinterpret_cast<double*>(work);
  float* mean = work + 2 * d;
  work += 3 * d;
  for (int64_t k0 = 0; k0 < d; k0 += kKc) {
    const int64_t kc = min64(kKc, d - k0);
    // this chunk's column means, accumulated in double row by row; the chunk (n x kc) is
    // then still in cache for the packing, so X is read from memory once
    for (int64_t k = k0; k < k0 + kc; ++k) acc[k] = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const float* row = x + i * d;
      for (int64_t k = k0; k < k0 + kc; ++k) acc[k] += row[k];
    }
    for (int64_t k = k0; k < k0 + kc; ++k) mean[k] = static_cast<float>(acc[k] / static_cast<double>(n));
    pack_centred(x, d, mean, n, k0, kc, work);
    for (int64_t jb = 0; jb < panels; ++jb) {
      const int64_t c0 = jb * kNr;
      const int64_t cols = min64(kNr, n - c0);
      const float* b = work + jb * kc * kNr;
      // row tiles whose first row is at or above the panel's last column
      for (int64_t r0 = 0; r0 <= c0 + cols - 1 && r0 < n; r0 += kMr) {
        const float* a = work + (r0 / kNr) * kc * kNr + r0 % kNr;
        tile_4x24(a, b, kc, g + r0 * n + c0, n, k0 > 0, min64(kMr, n - r0), cols);
      }
    }
  }
}

#else  // not x86 with GCC/Clang: never selected (kGramAvx2Built is false)

int64_t gram_upper_avx2_workspace(int64_t, int64_t) { return 0; }
void gram_upper_avx2(const float*, int64_t, int64_t, float*, float*) {}

#endif

}  // namespace kdbench
