// The rank-k kernels for the upper triangle of a centred float32 Gram (csrc/gram_avx2.cpp,
// csrc/gram_avx512.cpp; their shared loops are in gram_rankk.h).
#pragma once

#include <cstdint>

namespace kdbench {

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
constexpr bool kGramAvx2Built = true;
constexpr bool kGramAvx512Built = true;
#else
constexpr bool kGramAvx2Built = false;
constexpr bool kGramAvx512Built = false;
#endif

// Floats of scratch space gram_upper_avx2 / gram_upper_avx512 need for an [n, d] input
// (8-byte aligned).
int64_t gram_upper_avx2_workspace(int64_t n, int64_t d);
int64_t gram_upper_avx512_workspace(int64_t n, int64_t d);

// g[i, j] = (x_i - m) . (x_j - m) for i <= j, m the column mean of x (and a few entries
// just below the diagonal); x is [n, d] row-major contiguous, g is [n, n] row-major.
// gram_upper_avx2 needs AVX2 + FMA, gram_upper_avx512 AVX-512F.
void gram_upper_avx2(const float* x, int64_t n, int64_t d, float* g, float* work);
void gram_upper_avx512(const float* x, int64_t n, int64_t d, float* g, float* work);

}  // namespace kdbench
