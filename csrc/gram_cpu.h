// The AVX2 kernel for the upper triangle of a centred float32 Gram (csrc/gram_avx2.cpp).
#pragma once

#include <cstdint>

namespace kdbench {

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
constexpr bool kGramAvx2Built = true;
#else
constexpr bool kGramAvx2Built = false;
#endif

// Floats of scratch space gram_upper_avx2 needs for an [n, d] input (8-byte aligned).
int64_t gram_upper_avx2_workspace(int64_t n, int64_t d);

// g[i, j] = (x_i - m) . (x_j - m) for i <= j, m the column mean of x (and a few entries
// just below the diagonal); x is [n, d] row-major contiguous, g is [n, n] row-major.
// Needs AVX2 + FMA.
void gram_upper_avx2(const float* x, int64_t n, int64_t d, float* g, float* work);

}  // namespace kdbench
