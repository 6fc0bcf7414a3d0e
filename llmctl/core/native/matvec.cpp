// Batch-1 matrix-vector products for CPU decoding: y[1, N] = x[1, K] · W[N, K]ᵀ, streaming W once.
//
// llmctl::mv_float   float32 or bfloat16 W and x, float32 sums: FMA (AVX-512 or AVX2), bf16 by
//                    AVX512-BF16 vdpbf16ps or, on AVX2, widened to float32 (a shift and a mask)
// llmctl::mv_quant   int8 or int4 W as unsigned integers u with per-group scale s and offset z
//                    (w = s · (u − z)); x is quantized per block (64 inputs for int8, 128 for
//                    int4: 64 bytes of weights) to int8 with its own scale d, and u · q(x) runs as
//                    integer dot products: AVX512-VNNI vpdpbusd, or AVX2 vpmaddubsw + vpmaddwd
//                    (int8 read as signed u − 128, so that no pair of products saturates)
//
// Each thread takes a contiguous range of rows and reads them as one sequential stream: float rows
// one after another (measured 3–7 % faster for float32 and 20–30 % for bfloat16 than four rows side
// by side alone, 1.7× and 1.5× in the decode plan), integer rows four at a time from
// their interleaved layout. Products of one input (the decode plan's q, k, v and gate, up) run
// in one parallel region over their rows together, with the input quantized once: a region costs
// a few microseconds, and an int4 768 × 768 product is 295 KB. Threads come from ATen's pool
// (at::parallel_for), so torch.set_num_threads holds.
// Built by llmctl/core/native/__init__.py with -march=native; `llmctl::capabilities` says which
// kernels this build has (none without AVX2 + FMA), and Python routes everything else to torch.
#include "kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace llmctl {
namespace {

// inputs per activation scale: those whose weights fill 64 bytes (one 512-bit load)
constexpr int64_t block_of(int64_t bits) { return 512 / bits; }
constexpr int64_t ROWS = 4;     // integer rows per step

}  // namespace

int64_t capabilities() {
  int64_t caps = 0;
#ifdef LLMCTL_F32
  caps |= F32;
#endif
#ifdef LLMCTL_BF16
  caps |= BF16;
#endif
#ifdef LLMCTL_QUANT
  caps |= QUANT;
#endif
  return caps;
}

namespace {

// Calls row(i, n) for every row n of product i < count, n a multiple of `step` (the rows a call
// takes; N[i] % step == 0): one parallel region, contiguous ranges of rows spread over ATen's threads.
template <typename Row>
void each_row(int count, const int64_t N[], const Row& row, int64_t step = 1) {
  int64_t start[MAX_PRODUCTS + 1] = {0};
  for (int i = 0; i < count; ++i) start[i + 1] = start[i] + N[i] / step;
  at::parallel_for(0, start[count], step == 1 ? 64 : 16, [&](int64_t begin, int64_t end) {
    int i = 0;
    for (int64_t s = begin; s < end; ++s) {
      while (s >= start[i + 1]) ++i;
      row(i, (s - start[i]) * step);
    }
  });
}

#if defined(LLMCTL_AVX512)
struct FloatRow {  // 64 inputs a step (four loads, four sums), then a tail of 32
  const float* W; const float* x; float* y; int64_t K;
  void operator()(int64_t n) const {
    const float* w = W + n * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + k), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 16), _mm512_loadu_ps(x + k + 16), a1);
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 32), _mm512_loadu_ps(x + k + 32), a2);
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 48), _mm512_loadu_ps(x + k + 48), a3);
    }
    if (k < K) {
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + k), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 16), _mm512_loadu_ps(x + k + 16), a1);
    }
    y[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  }
};
#elif defined(LLMCTL_F32)
struct FloatRow {  // 32 inputs a step (four loads, four sums)
  const float* W; const float* x; float* y; int64_t K;
  void operator()(int64_t n) const {
    const float* w = W + n * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K; k += 32) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    y[n] = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  }
};
#endif

#if defined(LLMCTL_AVX512_BF16)
struct Bf16Row {  // 64 inputs a step (two loads: 4–20 % faster than one), then a tail of 32
  const uint16_t* W; const uint16_t* x; float* y; int64_t K;
  void operator()(int64_t n) const {
    const uint16_t* w = W + n * K;
    __m512 a = _mm512_setzero_ps(), b = a;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(w + k), (__m512bh)_mm512_loadu_si512(x + k));
      b = _mm512_dpbf16_ps(b, (__m512bh)_mm512_loadu_si512(w + k + 32), (__m512bh)_mm512_loadu_si512(x + k + 32));
    }
    if (k < K) a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(w + k), (__m512bh)_mm512_loadu_si512(x + k));
    y[n] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
  }
};
#elif defined(LLMCTL_BF16)
// A bf16 is the high half of its float32, so 16 weights (32 bytes) are two float32 vectors: the
// even ones shifted up, the odd ones masked in place. x comes split the same way: per 16 inputs,
// the 8 even ones then the 8 odd ones, as float32 (`split_even_odd`).
struct Bf16Row {  // 32 inputs a step
  const uint16_t* W; const float* x; float* y; int64_t K;
  void operator()(int64_t n) const {
    const uint16_t* w = W + n * K;
    const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K; k += 32) {
      const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k + 16));
      a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(u, 16)), _mm256_loadu_ps(x + k), a0);
      a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(u, high)), _mm256_loadu_ps(x + k + 8), a1);
      a2 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), _mm256_loadu_ps(x + k + 16), a2);
      a3 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, high)), _mm256_loadu_ps(x + k + 24), a3);
    }
    y[n] = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  }
};

inline float from_bf16(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// bf16 x[K] as float32, per 16 inputs the even ones then the odd ones (Bf16Row's order)
std::vector<float> split_even_odd(const uint16_t* x, int64_t K) {
  std::vector<float> out(K);
  for (int64_t k = 0; k < K; k += 16)
    for (int64_t j = 0; j < 8; ++j) {
      out[k + j] = from_bf16(x[k + 2 * j]);
      out[k + 8 + j] = from_bf16(x[k + 2 * j + 1]);
    }
  return out;
}
#endif

#ifdef LLMCTL_QUANT
// Unsigned BITS-bit weights, `group` inputs per (scale, offset). int8: one byte per input.
// int4: each block of 128 inputs is 64 bytes, byte j holding input j (low nibble) and 64 + j (high).
// Rows come in fours, their 64-byte pieces interleaved ([N / 4, K·bits / 512, 4, 64]), so that
// each step reads one sequential stream.
struct QuantArgs {
  const uint8_t* W; const int8_t* qx; const float* d; const float* xsum;
  const int32_t* ends;  // per block: the group it ends, or -1
  const float* scale; const float* zero; const float* bias; float* y;
  int64_t K, groups;
};

#endif

#if defined(LLMCTL_AVX512_VNNI)
// ONE_BLOCK_GROUPS: every group is one block (int4 g128, int8 g64), so the block's activation
// scale and the group's weight scale multiply its integer sums together: one FMA a row, no
// per-group accumulator
template <int BITS, bool ONE_BLOCK_GROUPS>
struct QuantRows : QuantArgs {
  void operator()(int64_t n) const {  // rows n … n + 3
    constexpr int R = ROWS;
    const int64_t row_bytes = K * BITS / 8;
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 acc[R], group_acc[R];
    float correction[R];
    for (int r = 0; r < R; ++r) { acc[r] = group_acc[r] = _mm512_setzero_ps(); correction[r] = 0.f; }
    const uint8_t* rows = W + n * row_bytes;  // ROWS rows interleaved per 64 bytes: one stream
    for (int64_t b = 0; b < row_bytes / 64; ++b) {  // 64 bytes of each row: one block of inputs
      _mm_prefetch(reinterpret_cast<const char*>(rows + (b + 16) * 64 * ROWS), _MM_HINT_T0);
      __m512i dot[R];  // Σ u · q(x) over the block, 16 partial sums
      if constexpr (BITS == 8) {
        const __m512i xv = _mm512_loadu_si512(qx + b * 64);
        for (int r = 0; r < R; ++r)
          dot[r] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(rows + (b * ROWS + r) * 64), xv);
      } else {  // low nibbles: inputs 0–63 of the block, high nibbles: 64–127
        const __m512i xlo = _mm512_loadu_si512(qx + b * 128), xhi = _mm512_loadu_si512(qx + b * 128 + 64);
        for (int r = 0; r < R; ++r) {
          const __m512i wv = _mm512_loadu_si512(rows + (b * ROWS + r) * 64);
          dot[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(wv, low), xlo),
                                       _mm512_and_si512(_mm512_srli_epi16(wv, 4), low), xhi);
        }
      }
      if constexpr (ONE_BLOCK_GROUPS) {  // Σ s·(u − z)·x = s·d·Σ u·q − s·z·Σ x
        for (int r = 0; r < R; ++r) {
          const float s = scale[(n + r) * groups + b];
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), _mm512_set1_ps(s * d[b]), acc[r]);
          correction[r] += s * zero[(n + r) * groups + b] * xsum[b];
        }
        continue;
      }
      const __m512 db = _mm512_set1_ps(d[b]);
      for (int r = 0; r < R; ++r) group_acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), db, group_acc[r]);
      const int64_t g = ends[b];
      if (g >= 0) {  // Σ s·(u − z)·x = s·(Σ u·x − z·Σ x)
        for (int r = 0; r < R; ++r) {
          const float s = scale[(n + r) * groups + g];
          acc[r] = _mm512_fmadd_ps(group_acc[r], _mm512_set1_ps(s), acc[r]);
          correction[r] += s * zero[(n + r) * groups + g] * xsum[g];
          group_acc[r] = _mm512_setzero_ps();
        }
      }
    }
    for (int r = 0; r < R; ++r)
      y[n + r] = _mm512_reduce_add_ps(acc[r]) - correction[r] + (bias ? bias[n + r] : 0.f);
  }
};
#elif defined(LLMCTL_QUANT)
// Σ w·x over 32 signed bytes w and x, as 8 int32 partial sums: vpmaddubsw takes an unsigned
// operand, so |w| times x carrying w's sign (pairs reach 2·128·127, inside int16)
inline __m256i signed_dot(__m256i w, __m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)), _mm256_set1_epi16(1));
}

// AVX2: as above, each 64-byte piece as two 32-byte halves. int8 weights are read as signed
// u − 128 (a pair of unsigned bytes times int8 inputs could pass int16), so the offset they are
// corrected by is z − 128; int4's unsigned nibbles go straight in (four pairs of 15·127 fit int16).
template <int BITS, bool ONE_BLOCK_GROUPS>
struct QuantRows : QuantArgs {
  void operator()(int64_t n) const {  // rows n … n + 3
    constexpr int R = ROWS;
    constexpr float SHIFT = BITS == 8 ? 128.f : 0.f;
    const int64_t row_bytes = K * BITS / 8;
    const __m256i low = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8(static_cast<char>(0x80));
    __m256 acc[R], group_acc[R];
    float correction[R];
    for (int r = 0; r < R; ++r) { acc[r] = group_acc[r] = _mm256_setzero_ps(); correction[r] = 0.f; }
    const uint8_t* rows = W + n * row_bytes;
    auto load = [](const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
    for (int64_t b = 0; b < row_bytes / 64; ++b) {
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(rows + ((b + 16) * ROWS + r) * 64), _MM_HINT_T0);
      __m256i dot[R];
      if constexpr (BITS == 8) {
        const __m256i x0 = load(qx + b * 64), x1 = load(qx + b * 64 + 32);
        for (int r = 0; r < R; ++r) {
          const uint8_t* w = rows + (b * ROWS + r) * 64;
          dot[r] = _mm256_add_epi32(signed_dot(_mm256_xor_si256(load(w), flip), x0),
                                    signed_dot(_mm256_xor_si256(load(w + 32), flip), x1));
        }
      } else {  // bytes 0–31: inputs 0–31 (low nibbles) and 64–95 (high); bytes 32–63: 32–63 and 96–127
        const int8_t* xb = qx + b * 128;
        const __m256i x0 = load(xb), x1 = load(xb + 32), x2 = load(xb + 64), x3 = load(xb + 96);
        for (int r = 0; r < R; ++r) {
          const uint8_t* w = rows + (b * ROWS + r) * 64;
          const __m256i u = load(w), v = load(w + 32);
          const __m256i lo = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(u, low), x0),
                                              _mm256_maddubs_epi16(_mm256_and_si256(v, low), x1));
          const __m256i hi = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(u, 4), low), x2),
                                              _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), low), x3));
          dot[r] = _mm256_madd_epi16(_mm256_add_epi16(lo, hi), _mm256_set1_epi16(1));
        }
      }
      if constexpr (ONE_BLOCK_GROUPS) {
        for (int r = 0; r < R; ++r) {
          const float s = scale[(n + r) * groups + b];
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r]), _mm256_set1_ps(s * d[b]), acc[r]);
          correction[r] += s * (zero[(n + r) * groups + b] - SHIFT) * xsum[b];
        }
        continue;
      }
      const __m256 db = _mm256_set1_ps(d[b]);
      for (int r = 0; r < R; ++r) group_acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r]), db, group_acc[r]);
      const int64_t g = ends[b];
      if (g >= 0) {
        for (int r = 0; r < R; ++r) {
          const float s = scale[(n + r) * groups + g];
          acc[r] = _mm256_fmadd_ps(group_acc[r], _mm256_set1_ps(s), acc[r]);
          correction[r] += s * (zero[(n + r) * groups + g] - SHIFT) * xsum[g];
          group_acc[r] = _mm256_setzero_ps();
        }
      }
    }
    for (int r = 0; r < R; ++r) y[n + r] = hsum(acc[r]) - correction[r] + (bias ? bias[n + r] : 0.f);
  }
};
#endif

#ifdef LLMCTL_QUANT
template <int BITS, bool ONE_BLOCK_GROUPS>
void quant_rows(int count, const int64_t N[], const QuantArgs args[]) {
  QuantRows<BITS, ONE_BLOCK_GROUPS> rows[MAX_PRODUCTS];
  for (int i = 0; i < count; ++i) rows[i] = QuantRows<BITS, ONE_BLOCK_GROUPS>{args[i]};
  each_row(count, N, [&](int i, int64_t n) { rows[i](n); }, ROWS);
}

template <int BITS>
void quant_rows(int count, const int64_t N[], const QuantArgs args[], bool one_block_groups) {
  if (one_block_groups) quant_rows<BITS, true>(count, N, args);
  else quant_rows<BITS, false>(count, N, args);
}

// x quantized per BLOCK inputs: q = round(x / d), d = max|x| / 127 (all-zero blocks: d = 0, q = 0);
// sums[b] = Σ q over the block
#if defined(LLMCTL_AVX512)
template <int64_t BLOCK>
void quantize_input(const float* x, int64_t K, int8_t* q, float* d, int32_t* sums) {
  for (int64_t b = 0; b < K / BLOCK; ++b) {
    __m512 v[BLOCK / 16], amax = _mm512_setzero_ps();
    for (int i = 0; i < BLOCK / 16; ++i) {
      v[i] = _mm512_loadu_ps(x + b * BLOCK + 16 * i);
      amax = _mm512_max_ps(amax, _mm512_abs_ps(v[i]));
    }
    const float db = _mm512_reduce_max_ps(amax) / 127.f;
    d[b] = db;
    sums[b] = 0;
    for (int i = 0; i < BLOCK / 16; ++i) {
      const __m512i qi = db > 0.f ? _mm512_cvtps_epi32(_mm512_div_ps(v[i], _mm512_set1_ps(db)))  // nearest even
                                  : _mm512_setzero_si512();
      sums[b] += _mm512_reduce_add_epi32(qi);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * BLOCK + 16 * i), _mm512_cvtsepi32_epi8(qi));
    }
  }
}
#else
template <int64_t BLOCK>
void quantize_input(const float* x, int64_t K, int8_t* q, float* d, int32_t* sums) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' lane interleave
  for (int64_t b = 0; b < K / BLOCK; ++b) {
    const float* xb = x + b * BLOCK;
    __m256 amax = _mm256_setzero_ps();
    for (int64_t i = 0; i < BLOCK; i += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + i)));
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    const float db = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m))) / 127.f;
    d[b] = db;
    __m256i total = _mm256_setzero_si256();
    for (int64_t i = 0; i < BLOCK; i += 32) {  // 32 inputs → 32 bytes
      __m256i qi[4];
      for (int j = 0; j < 4; ++j) {
        qi[j] = db > 0.f ? _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(xb + i + 8 * j), _mm256_set1_ps(db)))
                         : _mm256_setzero_si256();  // nearest even
        total = _mm256_add_epi32(total, qi[j]);
      }
      const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * BLOCK + i), _mm256_permutevar8x32_epi32(bytes, order));
    }
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
    sums[b] = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1)));
  }
}
#endif
#endif

void check(bool ok, const char* what) { TORCH_CHECK(ok, "llmctl native matvec: ", what); }

}  // namespace

void product_f32(int count, const float* const W[], float* const y[], const int64_t N[], const float* x, int64_t K) {
#ifdef LLMCTL_F32
  FloatRow rows[MAX_PRODUCTS];
  for (int i = 0; i < count; ++i) rows[i] = {W[i], x, y[i], K};
  each_row(count, N, [&](int i, int64_t n) { rows[i](n); });
#else
  check(false, "this build has no AVX2 + FMA");
#endif
}

void product_bf16(int count, const uint16_t* const W[], float* const y[], const int64_t N[], const uint16_t* x,
                  int64_t K) {
#if defined(LLMCTL_AVX512_BF16)
  Bf16Row rows[MAX_PRODUCTS];
  for (int i = 0; i < count; ++i) rows[i] = {W[i], x, y[i], K};
  each_row(count, N, [&](int i, int64_t n) { rows[i](n); });
#elif defined(LLMCTL_BF16)
  const std::vector<float> xs = split_even_odd(x, K);
  Bf16Row rows[MAX_PRODUCTS];
  for (int i = 0; i < count; ++i) rows[i] = {W[i], xs.data(), y[i], K};
  each_row(count, N, [&](int i, int64_t n) { rows[i](n); });
#else
  check(false, "this build has no AVX2 + FMA");
#endif
}

void product_quant(int count, const QuantWeights W[], const float* x, float* const y[]) {
#ifdef LLMCTL_QUANT
  const int64_t K = W[0].K, groups = W[0].groups, bits = W[0].bits, blocks = K / block_of(bits),
                per_group = blocks / groups;
  int64_t N[MAX_PRODUCTS];
  for (int i = 0; i < count; ++i) {
    check(W[i].K == K && W[i].groups == groups && W[i].bits == bits, "one input: the same K, groups and bits");
    check(W[i].N % ROWS == 0, "rows come in fours");
    N[i] = W[i].N;
  }
  std::vector<int8_t> qx(K);
  std::vector<float> d(blocks), xsum(groups, 0.f);
  std::vector<int32_t> sums(blocks), ends(blocks, -1);
  if (bits == 8) quantize_input<block_of(8)>(x, K, qx.data(), d.data(), sums.data());
  else quantize_input<block_of(4)>(x, K, qx.data(), d.data(), sums.data());
  for (int64_t b = 0; b < blocks; ++b) {  // xsum[g] = Σ over the group of d · q; ends: where groups end
    xsum[b / per_group] += d[b] * static_cast<float>(sums[b]);
    if ((b + 1) % per_group == 0) ends[b] = static_cast<int32_t>(b / per_group);
  }
  QuantArgs args[MAX_PRODUCTS];
  for (int i = 0; i < count; ++i)
    args[i] = {W[i].w, qx.data(), d.data(), xsum.data(), ends.data(), W[i].scale, W[i].zero, W[i].bias, y[i], K, groups};
  if (bits == 8) quant_rows<8>(count, N, args, per_group == 1);
  else quant_rows<4>(count, N, args, per_group == 1);
#else
  check(false, "this build has no AVX2 + FMA");
#endif
}

namespace {

at::Tensor mv_float(const at::Tensor& x, const at::Tensor& w) {
  check(x.dim() == 2 && x.size(0) == 1 && w.dim() == 2 && x.size(1) == w.size(1), "x must be [1, K], w [N, K]");
  check(x.scalar_type() == w.scalar_type() && w.is_contiguous() && w.size(1) % 32 == 0, "same dtype, K % 32 == 0");
  const int64_t N = w.size(0), K = w.size(1);
  at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({1, N}, x.options().dtype(at::kFloat));
  if (w.scalar_type() == at::kFloat) {
    const float* W[] = {w.data_ptr<float>()};
    float* Y[] = {y.data_ptr<float>()};
    product_f32(1, W, Y, &N, xc.data_ptr<float>(), K);
  } else {
    check(w.scalar_type() == at::kBFloat16, "float32 or bfloat16 weights");
    const uint16_t* W[] = {reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>())};
    float* Y[] = {y.data_ptr<float>()};
    product_bf16(1, W, Y, &N, reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()), K);
  }
  return y.to(x.scalar_type());
}

// y[..., N] = x[..., K] · Wᵀ for one row x (float32 or bfloat16) and the interleaved integer W
at::Tensor mv_quant(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero,
                    const std::optional<at::Tensor>& bias, int64_t bits) {
  check(bits == 8 || bits == 4, "bits must be 8 or 4");
  const int64_t N = w.size(0), K = x.size(-1), groups = scale.size(1);
  check(x.numel() == K && x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
        "x must be one contiguous float32 or bfloat16 row");
  check(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(), "w must be uint8 [N, K·bits/8]");
  const int64_t block = block_of(bits);
  check(w.size(1) * 8 == K * bits && K % block == 0 && N % ROWS == 0, "K and N must fit the packing");
  check(K % groups == 0 && (K / groups) % block == 0, "group size must be a multiple of the block");
  check(scale.scalar_type() == at::kFloat && zero.scalar_type() == at::kFloat && scale.is_contiguous()
        && zero.is_contiguous() && scale.size(0) == N && zero.sizes() == scale.sizes(), "float32 scale/zero [N, G]");
  check(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N),
        "bias must be float32 [N]");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor xf = x.to(at::kFloat), y = at::empty(shape, x.options().dtype(at::kFloat));  // bf16 → float32 exactly
  const QuantWeights W{w.data_ptr<uint8_t>(), scale.data_ptr<float>(), zero.data_ptr<float>(),
                       bias.has_value() ? bias->data_ptr<float>() : nullptr, N, K, groups, bits};
  float* Y[] = {y.data_ptr<float>()};
  product_quant(1, &W, xf.data_ptr<float>(), Y);
  return y.to(x.scalar_type());  // round to nearest even
}

}  // namespace
}  // namespace llmctl

TORCH_LIBRARY(llmctl, m) {
  m.def("capabilities() -> int", &llmctl::capabilities);
  m.def("mv_float(Tensor x, Tensor w) -> Tensor");
  m.def("mv_quant(Tensor x, Tensor w, Tensor scale, Tensor zero, Tensor? bias, int bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmctl, CPU, m) {
  m.impl("mv_float", &llmctl::mv_float);
  m.impl("mv_quant", &llmctl::mv_quant);
}
