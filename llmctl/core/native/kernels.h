// What matvec.cpp's batch-1 products offer the other native sources (decode.cpp).
#pragma once
#include <cstdint>

// Which kernels this build has. Every product has an AVX2 + FMA form; the AVX-512 forms replace
// them where the CPU has AVX-512 F (float32), AVX512-BF16 (bf16) and AVX512-BW + VNNI (int8/int4).
#if defined(__AVX2__) && defined(__FMA__)
#define LLMCTL_F32 1
#define LLMCTL_BF16 1
#define LLMCTL_QUANT 1
#include <immintrin.h>
#endif
#if defined(__AVX512F__)
#define LLMCTL_AVX512 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define LLMCTL_AVX512_BF16 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define LLMCTL_AVX512_VNNI 1
#endif

namespace llmctl {

enum Capability : int64_t { F32 = 1, BF16 = 2, QUANT = 4 };
int64_t capabilities();

#ifdef LLMCTL_F32
inline float hsum(__m256 v) {  // the sum of v's 8 lanes
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

// Products of one input x[K], all in one parallel region (count ≤ MAX_PRODUCTS): y[i][N[i]] =
// W[i][N[i], K] · x with float32 sums; K % 32 == 0. bf16 is passed as its 16 bits.
constexpr int MAX_PRODUCTS = 4;
void product_f32(int count, const float* const W[], float* const y[], const int64_t N[], const float* x, int64_t K);
void product_bf16(int count, const uint16_t* const W[], float* const y[], const int64_t N[], const uint16_t* x,
                  int64_t K);

// Unsigned `bits`-bit weights in mv_quant's interleaved layout, w = scale · (u − zero) per group.
struct QuantWeights {
  const uint8_t* w; const float* scale; const float* zero; const float* bias;  // bias may be null
  int64_t N, K, groups, bits;
};
// y[i] = W[i] · x + bias for count ≤ MAX_PRODUCTS products of the same K, groups and bits, in one
// parallel region; x quantized per block to int8 once (see matvec.cpp)
void product_quant(int count, const QuantWeights W[], const float* x, float* const y[]);

}  // namespace llmctl
