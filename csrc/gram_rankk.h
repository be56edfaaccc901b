// The loop structure shared by the rank-k kernels of the centred Gram (gram_avx2.cpp,
// gram_avx512.cpp): column means, centring while packing, and the sweep over the register
// tiles that touch the upper triangle. Each kernel's file includes this header after its
// `#pragma GCC target`, so every function here is compiled for that file's instruction set.
// Everything is in an unnamed namespace: each translation unit keeps its own copy, and the
// linker can never merge the AVX-512 copy into the AVX2 path (which must run on CPUs
// without AVX-512).
//
// GotoBLAS-style: the feature dimension is cut into chunks of kKc columns; each chunk's
// column means are taken (accumulated in double, row by row, while the chunk is brought
// into cache), the chunk is centred while it is packed once (panels of NR rows, k-major,
// transposed 8 x 8 at a time), then an MR x NR register tile accumulates every tile that
// touches the upper triangle. Only tiles crossing the diagonal compute a few entries below
// it; the strictly lower triangle of G is otherwise left as it was.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace kdbench {
namespace {

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

// Packs the centred chunk x[:, k0:k0+kc] - mean into panels of NR rows, k-major:
// out[p][k][r] = x[p*NR + r, k0 + k] - mean[k0 + k]; rows past n are zero.
template <int64_t NR>
void pack_centred(const float* x, int64_t ldx, const float* mean, int64_t n, int64_t k0,
                  int64_t kc, float* out) {
  static_assert(NR % 8 == 0, "panels are packed 8 rows at a time");
  const int64_t panels = (n + NR - 1) / NR;
  const int64_t kv = kc / 8 * 8;
  for (int64_t p = 0; p < panels; ++p) {
    float* dst = out + p * kc * NR;
    for (int64_t k = 0; k < kv; k += 8) {
      const __m256 m = _mm256_loadu_ps(mean + k0 + k);
      for (int64_t g = 0; g < NR; g += 8) {
        __m256 v[8];
        for (int64_t r = 0; r < 8; ++r) {
          const int64_t row = p * NR + g + r;
          v[r] = row < n ? _mm256_sub_ps(_mm256_loadu_ps(x + row * ldx + k0 + k), m)
                         : _mm256_setzero_ps();
        }
        transpose8(v);
        for (int64_t j = 0; j < 8; ++j) _mm256_storeu_ps(dst + (k + j) * NR + g, v[j]);
      }
    }
    for (int64_t k = kv; k < kc; ++k) {
      for (int64_t r = 0; r < NR; ++r) {
        const int64_t row = p * NR + r;
        dst[k * NR + r] = row < n ? x[row * ldx + k0 + k] - mean[k0 + k] : 0.0f;
      }
    }
  }
}

// Writes a tile's MR x NR accumulators (in `tile`, row-major) into c[0:rows, 0:cols],
// adding to what is there when `add`.
template <int64_t MR, int64_t NR>
void store_tile(const float* tile, float* c, int64_t ldc, bool add, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    float* dst = c + r * ldc;
    const float* src = tile + r * NR;
    if (cols == NR) {
      for (int64_t j = 0; j < NR; j += 8) {
        __m256 v = _mm256_loadu_ps(src + j);
        if (add) v = _mm256_add_ps(v, _mm256_loadu_ps(dst + j));
        _mm256_storeu_ps(dst + j, v);
      }
    } else {
      for (int64_t j = 0; j < cols; ++j) dst[j] = add ? dst[j] + src[j] : src[j];
    }
  }
}

inline int64_t rankk_workspace(int64_t n, int64_t d, int64_t nr) {
  return (n + nr - 1) / nr * nr * min64(kKc, d) + 3 * d;
}

// The upper triangle of the centred Gram of x ([n, d] row-major) into g ([n, n]).
// Tile(a, b, kc, c, ldc, add, rows, cols) computes one MR x NR tile: `a` is an MR-row
// slice of a packed panel (stride NR per k), `b` a whole panel.
template <int64_t MR, int64_t NR, typename Tile>
void gram_upper_rankk(const float* x, int64_t n, int64_t d, float* g, float* work, Tile tile) {
  static_assert(NR % MR == 0, "a row tile must not cross a panel");
  const int64_t panels = (n + NR - 1) / NR;
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
    for (int64_t k = k0; k < k0 + kc; ++k) {
      mean[k] = static_cast<float>(acc[k] / static_cast<double>(n));
    }
    pack_centred<NR>(x, d, mean, n, k0, kc, work);
    for (int64_t jb = 0; jb < panels; ++jb) {
      const int64_t c0 = jb * NR;
      const int64_t cols = min64(NR, n - c0);
      const float* b = work + jb * kc * NR;
      // row tiles whose first row is at or above the panel's last column
      for (int64_t r0 = 0; r0 <= c0 + cols - 1 && r0 < n; r0 += MR) {
        const float* a = work + (r0 / NR) * kc * NR + r0 % NR;
        tile(a, b, kc, g + r0 * n + c0, n, k0 > 0, min64(MR, n - r0), cols);
      }
    }
  }
}

}  // namespace
}  // namespace kdbench
