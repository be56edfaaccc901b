// AVX2 + FMA kernel for the upper triangle of a centred Gram matrix, G = Xc Xc^T with
// Xc = X - 1 mean^T, float32 (a symmetric rank-k update: about half the FLOPs of a GEMM).
// The chunking, packing and tile sweep are gram_rankk.h's; this file holds the 4 x 24
// register tile. Compiled with the AVX2 target for this translation unit only; the caller
// checks the CPU.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC target("avx2,fma")
#define KDBENCH_GRAM_AVX2 1
// No standard-library templates here: anything instantiated in this translation unit is
// built for AVX2 and could be merged with the portable copies of other units.
#include "gram_rankk.h"
#endif

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
  store_tile<kMr, kNr>(&tile[0][0], c, ldc, add, rows, cols);
}

}  // namespace

int64_t gram_upper_avx2_workspace(int64_t n, int64_t d) { return rankk_workspace(n, d, kNr); }

void gram_upper_avx2(const float* x, int64_t n, int64_t d, float* g, float* work) {
  gram_upper_rankk<kMr, kNr>(x, n, d, g, work, tile_4x24);
}

#else  // not x86 with GCC/Clang: never selected (kGramAvx2Built is false)

int64_t gram_upper_avx2_workspace(int64_t, int64_t) { return 0; }
void gram_upper_avx2(const float*, int64_t, int64_t, float*, float*) {}

#endif

}  // namespace kdbench
