// Batch-1 matrix-vector kernels for benchmarks/matvec.py (not part of the package): what a
// streaming kernel reaches on this CPU. Each thread takes 4 rows of W at a time, one accumulator
// per row (two for float32), x read once per 4 rows. Built with g++ -O3 -march=native -fopenmp.
#include <immintrin.h>
#include <cstdint>
#include <omp.h>

static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// y[n] = sum_k W[n,k] x[k]; 4 rows per step, each its own accumulator pair
extern "C" void mv_f32(const float* W, const float* x, float* y, int64_t N, int64_t K) {
  #pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; n += 4) {
    const float* w0 = W + n * K; const float* w1 = w0 + K; const float* w2 = w1 + K; const float* w3 = w2 + K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int64_t k = 0; k < K; k += 32) {
      __m512 xa = _mm512_loadu_ps(x + k), xb = _mm512_loadu_ps(x + k + 16);
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + k), xa, a0); b0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + k + 16), xb, b0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1 + k), xa, a1); b1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1 + k + 16), xb, b1);
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w2 + k), xa, a2); b2 = _mm512_fmadd_ps(_mm512_loadu_ps(w2 + k + 16), xb, b2);
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w3 + k), xa, a3); b3 = _mm512_fmadd_ps(_mm512_loadu_ps(w3 + k + 16), xb, b3);
    }
    y[n] = hsum(_mm512_add_ps(a0, b0)); y[n + 1] = hsum(_mm512_add_ps(a1, b1));
    y[n + 2] = hsum(_mm512_add_ps(a2, b2)); y[n + 3] = hsum(_mm512_add_ps(a3, b3));
  }
}

extern "C" __attribute__((target("avx512bf16"))) void mv_bf16(const uint16_t* W, const uint16_t* x, uint16_t* y, int64_t N, int64_t K) {
  #pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; n += 4) {
    const uint16_t* w0 = W + n * K; const uint16_t* w1 = w0 + K; const uint16_t* w2 = w1 + K; const uint16_t* w3 = w2 + K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K; k += 32) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w0 + k), xv);
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w1 + k), xv);
      a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w2 + k), xv);
      a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w3 + k), xv);
    }
    float r[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
    for (int i = 0; i < 4; i++) { uint32_t b; __builtin_memcpy(&b, &r[i], 4); b += 0x7fff + ((b >> 16) & 1); y[n + i] = b >> 16; }
  }
}

// int8 weights, per-row scale, float32 x
extern "C" void mv_i8(const int8_t* W, const float* x, const float* s, float* y, int64_t N, int64_t K) {
  #pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; n += 4) {
    const int8_t* w0 = W + n * K; const int8_t* w1 = w0 + K; const int8_t* w2 = w1 + K; const int8_t* w3 = w2 + K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K; k += 16) {
      __m512 xv = _mm512_loadu_ps(x + k);
      a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w0 + k)))), xv, a0);
      a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w1 + k)))), xv, a1);
      a2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w2 + k)))), xv, a2);
      a3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w3 + k)))), xv, a3);
    }
    y[n] = s[n] * hsum(a0); y[n + 1] = s[n + 1] * hsum(a1); y[n + 2] = s[n + 2] * hsum(a2); y[n + 3] = s[n + 3] * hsum(a3);
  }
}
