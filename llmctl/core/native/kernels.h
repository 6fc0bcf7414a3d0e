// What matvec.cpp's batch-1 products offer the other native sources (decode.cpp).
#pragma once
#include <cstdint>

#if defined(__AVX512F__)  // which kernels this build has
#define LLMCTL_F32 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define LLMCTL_BF16 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define LLMCTL_VNNI 1
#endif

namespace llmctl {

enum Capability : int64_t { F32 = 1, BF16 = 2, VNNI = 4 };
int64_t capabilities();

// y[N] = W[N, K] · x[K] with float32 sums; K % 32 == 0. bf16 is passed as its 16 bits.
void product_f32(const float* W, const float* x, float* y, int64_t N, int64_t K);
void product_bf16(const uint16_t* W, const uint16_t* x, float* y, int64_t N, int64_t K);

// Unsigned `bits`-bit weights in mv_quant's interleaved layout, w = scale · (u − zero) per group.
struct QuantWeights {
  const uint8_t* w; const float* scale; const float* zero; const float* bias;  // bias may be null
  int64_t N, K, groups, bits;
};
// y[N] = W · x + bias, x quantized per block to int8 (see matvec.cpp)
void product_quant(const QuantWeights& W, const float* x, float* y);

}  // namespace llmctl
