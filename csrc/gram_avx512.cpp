// AVX-512 kernel for the upper triangle of a centred Gram matrix (see gram_avx2.cpp): the
// same rank-k update, half the FLOPs of a GEMM, with 512-bit FMAs. On an Intel CPU with
// AVX-512 MKL's GEMM runs at the 512-bit rate, where the AVX2 kernel's half of the FLOPs
// no longer wins by much; this one keeps the halving at the same vector width.
// The chunking, packing and tile sweep are gram_rankk.h's; this file holds the 8 x 32
// register tile (16 accumulators; panels of 32 rows, so n = 64, 128, 256 fill them).
// Compiled with the AVX-512 target for this translation unit only; the caller checks the CPU.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC target("avx512f,avx2,fma")
#define KDBENCH_GRAM_AVX512 1
// No standard-library templates here (see gram_avx2.cpp).
#include "gram_rankk.h"
#endif

#include <cstdint>

#include "gram_cpu.h"

namespace kdbench {

#if defined(KDBENCH_GRAM_AVX512)

namespace {

constexpr int64_t kMr512 = 8;
constexpr int64_t kNr512 = 32;

// c[0:rows, 0:cols] (+)= a^T b over kc for one 8 x 32 tile; a and b step by 32 per k.
void tile_8x32(const float* a, const float* b, int64_t kc, float* c, int64_t ldc, bool add,
               int64_t rows, int64_t cols) {
  __m512 c0[kMr512], c1[kMr512];
  for (int64_t r = 0; r < kMr512; ++r) c0[r] = c1[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_loadu_ps(b);
    const __m512 b1 = _mm512_loadu_ps(b + 16);
#pragma GCC unroll 8
    for (int64_t r = 0; r < kMr512; ++r) {
      const __m512 av = _mm512_set1_ps(a[r]);
      c0[r] = _mm512_fmadd_ps(av, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(av, b1, c1[r]);
    }
    a += kNr512;
    b += kNr512;
  }
  alignas(64) float tile[kMr512 * kNr512];
#pragma GCC unroll 8
  for (int64_t r = 0; r < kMr512; ++r) {
    _mm512_store_ps(tile + r * kNr512, c0[r]);
    _mm512_store_ps(tile + r * kNr512 + 16, c1[r]);
  }
  store_tile<kMr512, kNr512>(tile, c, ldc, add, rows, cols);
}

}  // namespace

int64_t gram_upper_avx512_workspace(int64_t n, int64_t d) { return rankk_workspace(n, d, kNr512); }

void gram_upper_avx512(const float* x, int64_t n, int64_t d, float* g, float* work) {
  gram_upper_rankk<kMr512, kNr512>(x, n, d, g, work, tile_8x32);
}

#else  // not x86 with GCC/Clang: never selected (kGramAvx2Built is false)

int64_t gram_upper_avx512_workspace(int64_t, int64_t) { return 0; }
void gram_upper_avx512(const float*, int64_t, int64_t, float*, float*) {}

#endif

}  // namespace kdbench
