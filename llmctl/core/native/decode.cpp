// One batch-1 decode step of a plain pre-norm decoder, every layer in one call (llmctl::DecodePlan).
//
// From a token id (`step_token`: its embedding row, scaled, and the rotary tables' row for its
// position, where decode.py hands the embedding over) or a given hidden state (`step`); then
// per layer: norm → q, k, v products → rotary → the new key/value into
// the cache → attention over the cached positions (sliding window) → o product → residual →
// norm → gate/up products → activation → down product → residual; after the last layer the final
// norm and the head, where decode.py hands them over. The residual stream, norms,
// rotations and attention run in float32; products take the weights as stored (float32, bf16,
// or the int8/int4 layout of mv_quant); the cache keeps its dtype (float32 or bf16).
//
// What Python's eager step spends between the products — a hundred small torch calls per layer,
// or a compiled graph's guards and wrapper — this does in a few microseconds; each product and
// the attention spread over ATen's threads. `llmctl/core/native/decode.py` builds the plan from
// a model and decides which models it takes.
#include "kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <initializer_list>
#include <utility>
#include <cmath>
#include <vector>

namespace llmctl {
namespace {

void check(bool ok, const char* what) { TORCH_CHECK(ok, "llmctl native decode: ", what); }

enum Weights : int64_t { ABSENT = 0, FLOAT32 = 1, BFLOAT16 = 2, INT4 = 4, INT8 = 8 };
enum Norm : int64_t { RMS = 0, LAYER = 1 };
enum Activation : int64_t { SILU = 0, GELU = 1, GELU_TANH = 2, RELU = 3, RELU2 = 4 };

// x float32 [n] to bf16 bits, rounded to nearest even (n % 32 == 0: every product's K)
inline void to_bf16(const float* x, uint16_t* out, int64_t n) {
#ifdef LLMCTL_AVX512_BF16
  for (int64_t i = 0; i < n; i += 32)
    _mm512_storeu_si512(out + i, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i)));
#else
  for (int64_t i = 0; i < n; ++i) out[i] = c10::BFloat16(x[i]).x;
#endif
}

// The weights of y[N] = W · x + bias, x float32 [K] (`products` runs it)
struct Product {
  int64_t kind = ABSENT, N = 0, K = 0;
  at::Tensor w, scale, zero, bias;  // scale/zero: integer kinds; bias float32 or undefined

  Product() = default;
  Product(int64_t kind_, at::Tensor w_, at::Tensor scale_, at::Tensor zero_, at::Tensor bias_)
      : kind(kind_), w(std::move(w_)), scale(std::move(scale_)), zero(std::move(zero_)), bias(std::move(bias_)) {
    if (kind == ABSENT) return;
    check(w.dim() == 2 && w.is_contiguous(), "weights must be contiguous [N, ·]");
    N = w.size(0);
    K = kind == FLOAT32 || kind == BFLOAT16 ? w.size(1) : w.size(1) * 8 / kind;
    check(kind != FLOAT32 || w.scalar_type() == at::kFloat, "float32 weights");
    check(kind != BFLOAT16 || w.scalar_type() == at::kBFloat16, "bfloat16 weights");
    check(kind == FLOAT32 || kind == BFLOAT16 || (w.scalar_type() == at::kByte && scale.size(0) == N
          && scale.scalar_type() == at::kFloat && zero.scalar_type() == at::kFloat), "integer weights");
    check(!bias.defined() || (bias.scalar_type() == at::kFloat && bias.numel() == N), "float32 bias [N]");
    check(K % 32 == 0, "K % 32 == 0");
  }

  QuantWeights quant() const {
    return {w.data_ptr<uint8_t>(), scale.data_ptr<float>(), zero.data_ptr<float>(),
            bias.defined() ? bias.data_ptr<float>() : nullptr, N, K, scale.size(1), kind};
  }

  // whether `other` can share this product's parallel region: the same kind and input width
  bool shares_input(const Product& other) const {
    return kind == other.kind && K == other.K
           && (kind == FLOAT32 || kind == BFLOAT16 || scale.size(1) == other.scale.size(1));
  }
};

// y_i = P_i · x + bias_i for products that read the same x (q, k, v; gate, up): one parallel
// region where they share a kind and width, else one after another. Absent products are skipped.
void products(std::initializer_list<std::pair<const Product*, float*>> list, const float* x,
              std::vector<uint16_t>& scratch) {
  const Product* P[MAX_PRODUCTS];
  float* y[MAX_PRODUCTS];
  int count = 0;
  for (auto [p, out] : list)
    if (p->kind != ABSENT) { P[count] = p; y[count++] = out; }
  if (count == 0) return;
  for (int i = 1; i < count; ++i)
    if (!P[0]->shares_input(*P[i])) {
      for (int j = 0; j < count; ++j) products({{P[j], y[j]}}, x, scratch);
      return;
    }
  const int64_t K = P[0]->K;
  int64_t N[MAX_PRODUCTS];
  for (int i = 0; i < count; ++i) N[i] = P[i]->N;
  if (P[0]->kind == FLOAT32) {
    const float* W[MAX_PRODUCTS];
    for (int i = 0; i < count; ++i) W[i] = P[i]->w.data_ptr<float>();
    product_f32(count, W, y, N, x, K);
  } else if (P[0]->kind == BFLOAT16) {
    scratch.resize(K);
    to_bf16(x, scratch.data(), K);
    const uint16_t* W[MAX_PRODUCTS];
    for (int i = 0; i < count; ++i) W[i] = reinterpret_cast<const uint16_t*>(P[i]->w.data_ptr<at::BFloat16>());
    product_bf16(count, W, y, N, scratch.data(), K);
  } else {
    QuantWeights W[MAX_PRODUCTS];
    for (int i = 0; i < count; ++i) W[i] = P[i]->quant();
    product_quant(count, W, x, y);
    return;  // the biases are in
  }
  for (int i = 0; i < count; ++i)
    if (P[i]->bias.defined()) {
      const float* b = P[i]->bias.data_ptr<float>();
      for (int64_t n = 0; n < N[i]; ++n) y[i][n] += b[n];
    }
}

struct LayerNormParams {
  int64_t kind = RMS;
  at::Tensor weight, bias;  // float32 [hidden]; the effective scale (Gemma's 1 + w folded in)

  void operator()(const float* x, float* y, int64_t n, double eps) const {
    const float* w = weight.data_ptr<float>();
    float mean = 0.f, sq = 0.f;
    if (kind == LAYER) {
#pragma omp simd reduction(+ : mean)
      for (int64_t i = 0; i < n; ++i) mean += x[i];
      mean /= n;
    }
#pragma omp simd reduction(+ : sq)
    for (int64_t i = 0; i < n; ++i) sq += (x[i] - mean) * (x[i] - mean);
    const float r = 1.f / std::sqrt(sq / n + static_cast<float>(eps));
    for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - mean) * r * w[i];
    if (bias.defined()) {
      const float* b = bias.data_ptr<float>();
      for (int64_t i = 0; i < n; ++i) y[i] += b[i];
    }
  }
};

struct Layer {
  int64_t heads, kv_heads, head_dim, window;  // window 0: every cached position
  LayerNormParams attn_norm, mlp_norm;
  Product q, k, v, o, gate, up, down;  // gate ABSENT: a plain (ungated) feed-forward
};

template <typename T> inline float as_float(T v) { return static_cast<float>(v); }

#if defined(LLMCTL_AVX512)
constexpr int64_t LANES = 16;
using Vec = __m512;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vset(float w) { return _mm512_set1_ps(w); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vload(const c10::BFloat16* p) {  // a bf16's bits are the high half of its float32 (exact)
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(Vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(LLMCTL_F32)
constexpr int64_t LANES = 8;
using Vec = __m256;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vset(float w) { return _mm256_set1_ps(w); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vload(const c10::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(Vec v) { return hsum(v); }
#endif

// Σ a[i]·b[i], float32 a, cached b (float32 or bf16)
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#ifdef LLMCTL_F32
  Vec acc = vzero();
  for (; i + LANES <= n; i += LANES) acc = vfma(vload(a + i), vload(b + i), acc);
  s = vsum(acc);
#endif
  for (; i < n; ++i) s += a[i] * as_float(b[i]);
  return s;
}

// y[i] += w·b[i], cached b (float32 or bf16)
template <typename T>
inline void axpy(float* y, float w, const T* b, int64_t n) {
  int64_t i = 0;
#ifdef LLMCTL_F32
  const Vec wv = vset(w);
  for (; i + LANES <= n; i += LANES) vstore(y + i, vfma(wv, vload(b + i), vload(y + i)));
#endif
  for (; i < n; ++i) y[i] += w * as_float(b[i]);
}

// x [heads, D] rotated in place: x·cos + rotate_half(x)·sin (Hugging Face's halves, not pairs)
void rotate(float* x, int64_t heads, int64_t D, const float* cos, const float* sin) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* r = x + h * D;
    for (int64_t i = 0; i < half; ++i) {
      const float a = r[i], b = r[i + half];
      r[i] = a * cos[i] - b * sin[i];
      r[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

template <typename T>
void store(const at::Tensor& cache, const float* x, int64_t kv_heads, int64_t D, int64_t pos) {
  T* c = cache.data_ptr<T>();
  const int64_t len = cache.size(2);
  for (int64_t g = 0; g < kv_heads; ++g)
    for (int64_t i = 0; i < D; ++i) c[(g * len + pos) * D + i] = static_cast<T>(x[g * D + i]);
}

#ifdef LLMCTL_F32
// The sums of 8 vectors' lanes, [Σa[0], …, Σa[7]], each added in the order of GCC's
// _mm512_reduce_add_ps after its first step (halves + halves, then lanes 0+2 and 1+3, then those
// two): the same bits as `dot`'s one-at-a-time sums
inline __m256 sums8(const __m256 a[8]) {
  __m256 s[4];
  for (int j = 0; j < 4; ++j) {  // [a[2j]'s 128-bit halves added | a[2j+1]'s], then lanes 0+2, 1+3
    const __m256 x = _mm256_add_ps(_mm256_permute2f128_ps(a[2 * j], a[2 * j + 1], 0x31),
                                   _mm256_permute2f128_ps(a[2 * j], a[2 * j + 1], 0x20));
    s[j] = _mm256_add_ps(x, _mm256_permute_ps(x, 0x4E));
  }
  // hadd: lane 0 + lane 1 of each half → [Σa0, ·, Σa2, · | Σa1, ·, Σa3, ·] and likewise for a4…a7
  const __m256 lo = _mm256_hadd_ps(s[0], s[1]), hi = _mm256_hadd_ps(s[2], s[3]);
  const __m256i order = _mm256_setr_epi32(0, 4, 2, 6, 0, 4, 2, 6);
  return _mm256_blend_ps(_mm256_permutevar8x32_ps(lo, order), _mm256_permutevar8x32_ps(hi, order), 0xF0);
}
#ifdef LLMCTL_AVX512
inline __m256 halves(__m512 v) {  // its two 256-bit halves added
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}
#else
inline __m256 halves(__m256 v) { return v; }
#endif

// s[t] = scale · q · k[t] for 8 positions k[t] = k + t·D at once: eight sums kept apart, one reduction
template <typename T>
inline void dots8(const float* q, const T* k, int64_t D, float scale, float* s) {
  Vec acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = vzero();
  for (int64_t i = 0; i < D; i += LANES) {
    const Vec qv = vload(q + i);
    for (int j = 0; j < 8; ++j) acc[j] = vfma(qv, vload(k + j * D + i), acc[j]);
  }
  __m256 h[8];
  for (int j = 0; j < 8; ++j) h[j] = halves(acc[j]);
  _mm256_storeu_ps(s, _mm256_mul_ps(sums8(h), _mm256_set1_ps(scale)));
}

// o[C·LANES] = Σ_t p[t] · v[t][C·LANES], the rows v + t·stride: the sums stay in registers
template <int C, typename T>
inline void weighted_rows(float* o, const float* p, const T* v, int64_t n, int64_t stride) {
  Vec acc[C];
  for (int c = 0; c < C; ++c) acc[c] = vzero();
  for (int64_t t = 0; t < n; ++t) {
    const Vec w = vset(p[t]);
    for (int c = 0; c < C; ++c) acc[c] = vfma(w, vload(v + t * stride + c * LANES), acc[c]);
  }
  for (int c = 0; c < C; ++c) vstore(o + c * LANES, acc[c]);
}
#endif

// s[t] = scale · q · k[t] for n rows of D (k + t·D)
template <typename T>
void scores(const float* q, const T* k, int64_t n, int64_t D, float scale, float* s) {
  int64_t t = 0;
#ifdef LLMCTL_F32
  if (D % LANES == 0)
    for (; t + 8 <= n; t += 8) dots8(q, k + t * D, D, scale, s + t);
#endif
  for (; t < n; ++t) s[t] = dot(q, k + t * D, D) * scale;
}

// o[D] = Σ_t p[t] · v[t] for n rows of D (v + t·D)
template <typename T>
void weighted_sum(float* o, const float* p, const T* v, int64_t n, int64_t D) {
  int64_t i = 0;
#ifdef LLMCTL_F32
  constexpr int64_t WIDE = 4 * LANES;  // four vectors of sums at a time
  for (; i + WIDE <= D; i += WIDE) weighted_rows<4>(o + i, p, v + i, n, D);
  for (; i + LANES <= D; i += LANES) weighted_rows<1>(o + i, p, v + i, n, D);
#endif
  if (i == D) return;
  std::fill(o + i, o + D, 0.f);
  for (int64_t t = 0; t < n; ++t) axpy(o + i, p[t], v + t * D + i, D - i);
}

// out[h] = softmax(q[h] · K[g]ᵀ / √D) · V[g] over positions first … pos, g = h's key/value head
template <typename T>
void attend(const Layer& L, const float* q, const at::Tensor& keys, const at::Tensor& values, int64_t first,
            int64_t pos, float* out) {
  const int64_t H = L.heads, D = L.head_dim, group = H / L.kv_heads, len = keys.size(2), n = pos - first + 1;
  const T* K = keys.data_ptr<T>();
  const T* V = values.data_ptr<T>();
  at::Tensor probs = at::empty({H, n}, at::kFloat);
  float* s = probs.data_ptr<float>();
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  at::parallel_for(0, H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h)
      scores(q + h * D, K + ((h / group) * len + first) * D, n, D, scale, s + h * n);
  });
  probs = at::softmax(probs, -1);  // torch's vectorised exp
  const float* p = probs.data_ptr<float>();
  at::parallel_for(0, H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h)
      weighted_sum(out + h * D, p + h * n, V + ((h / group) * len + first) * D, n, D);
  });
}

void activate(float* x, int64_t n, int64_t act) {
  at::Tensor t = at::from_blob(x, {n}, at::kFloat);
  switch (act) {
    case SILU: at::silu_(t); break;
    case GELU: at::gelu_(t, "none"); break;
    case GELU_TANH: at::gelu_(t, "tanh"); break;
    case RELU: at::relu_(t); break;
    case RELU2: at::relu_(t).mul_(t); break;
    default: check(false, "unknown activation");
  }
}

}  // namespace

// Built once per generation from `decode.py`'s flat description of the model:
//   meta   hidden, activation, the final norm's kind (-1: no tail — `step` returns the hidden
//          state) and the head's product kind, then per layer heads, kv_heads, head_dim, window,
//          norm kind, and the kind of each of its seven products (q, k, v, o, gate, up, down)
//   tensors the final norm's weight, bias and the head's weights, scale, zero, bias (undefined
//          without a tail); then per layer: attention norm weight, bias; feed-forward norm
//          weight, bias; then per product its weights, scale, zero, bias (undefined where absent)
struct DecodePlan : torch::CustomClassHolder {
  int64_t hidden, act;
  double eps;
  std::vector<Layer> layers;
  bool tail = false;  // the final norm and the head run here too
  LayerNormParams final_norm;
  Product head;

  DecodePlan(std::vector<at::Tensor> tensors, std::vector<int64_t> meta, double eps_) : eps(eps_) {
    check(meta.size() >= 4 && (meta.size() - 4) % 12 == 0 && tensors.size() == 6 + (meta.size() - 4) / 12 * 32,
          "malformed plan");
    hidden = meta[0];
    act = meta[1];
    auto defined = [](const at::Tensor& x) { return x.defined() && x.numel() > 0 ? x : at::Tensor(); };
    if (meta[2] >= 0) {
      tail = true;
      final_norm = {meta[2], tensors[0], defined(tensors[1])};
      head = Product(meta[3], tensors[2], defined(tensors[3]), defined(tensors[4]), defined(tensors[5]));
      check(head.K == hidden && final_norm.weight.numel() == hidden, "inconsistent head");
    }
    auto t = tensors.begin() + 6;
    auto m = meta.begin() + 4;
    while (m != meta.end()) {
      Layer L;
      L.heads = m[0]; L.kv_heads = m[1]; L.head_dim = m[2]; L.window = m[3];
      L.attn_norm = {m[4], t[0], defined(t[1])};
      L.mlp_norm = {m[4], t[2], defined(t[3])};
      Product* products[] = {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down};
      for (int i = 0; i < 7; ++i) {
        auto p = t + 4 + 4 * i;
        *products[i] = Product(m[5 + i], p[0], defined(p[1]), defined(p[2]), defined(p[3]));
      }
      check(L.heads % L.kv_heads == 0 && L.q.N == L.heads * L.head_dim && L.k.N == L.kv_heads * L.head_dim
            && L.v.N == L.k.N && L.o.K == L.q.N && L.o.N == hidden && L.down.N == hidden, "inconsistent shapes");
      layers.push_back(std::move(L));
      t += 32;
      m += 12;
    }
  }

  // The token embedding table [vocab, hidden] (float32 or bf16) `step_token` reads, and the
  // factor its rows are multiplied by (1: none) in the table's dtype, as the eager step does
  void set_embedding(at::Tensor table, double scale) {
    check(table.dim() == 2 && table.size(1) == hidden && table.is_contiguous()
          && (table.scalar_type() == at::kFloat || table.scalar_type() == at::kBFloat16), "embedding [vocab, hidden]");
    embedding = table;
    embed_scale = scale;
  }

  // `step` for token `token` whose rotary angles are row `position` of the tables cos, sin
  // [positions, head_dim] (empty: no rotation); its keys and values go into slot `pos`
  at::Tensor step_token(int64_t token, int64_t pos, int64_t position, at::Tensor cos, at::Tensor sin,
                        std::vector<at::Tensor> keys, std::vector<at::Tensor> values) {
    check(embedding.defined() && token >= 0 && token < embedding.size(0), "token outside the embedding table");
    at::Tensor x = embedding[token].to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
    if (embed_scale != 1.0) {  // in the table's dtype: bf16 × bf16 rounds to bf16
      x.mul_(static_cast<float>(embed_scale));
      if (embedding.scalar_type() == at::kBFloat16) x = x.to(at::kBFloat16).to(at::kFloat);
    }
    if (cos.numel() == 0) return run(x, pos, cos, sin, keys, values);
    check(cos.dim() == 2 && sin.sizes() == cos.sizes() && position >= 0 && position < cos.size(0),
          "rotary tables [positions, head_dim] past the position");
    return run(x, pos, cos[position], sin[position], keys, values);
  }

  // One token x [hidden] at position `pos` (its rotary cos/sin [head_dim], or empty for no
  // rotation) through every layer: float32 logits [vocab] with a tail, else the hidden state
  // float32 [hidden]. Its keys and values go into slot `pos` of each layer's cache
  // [1, kv_heads, length, head_dim].
  at::Tensor step(at::Tensor x_in, int64_t pos, at::Tensor cos, at::Tensor sin, std::vector<at::Tensor> keys,
                  std::vector<at::Tensor> values) {
    check(x_in.numel() == hidden, "x must be [hidden]");
    return run(x_in.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous(), pos, cos, sin, keys, values);
  }

 private:
  at::Tensor embedding;  // undefined: `step` only
  double embed_scale = 1.0;

  // `step` on x float32 [hidden], ours to update
  at::Tensor run(at::Tensor x, int64_t pos, const at::Tensor& cos, const at::Tensor& sin,
                 const std::vector<at::Tensor>& keys, const std::vector<at::Tensor>& values) {
    check(keys.size() == layers.size() && values.size() == layers.size(), "one cache per layer");
    float* xp = x.data_ptr<float>();
    const bool rotary = cos.numel() > 0;
    at::Tensor cf = rotary ? cos.to(at::kFloat).contiguous() : cos, sf = rotary ? sin.to(at::kFloat).contiguous() : sin;
    std::vector<float> h(hidden), r(hidden), q, k, v, att, a, b;
    std::vector<uint16_t> scratch;
    for (size_t l = 0; l < layers.size(); ++l) {
      const Layer& L = layers[l];
      const at::Tensor& kc = keys[l];
      const at::Tensor& vc = values[l];
      check(kc.dim() == 4 && kc.size(0) == 1 && kc.size(1) == L.kv_heads && kc.size(3) == L.head_dim
            && kc.is_contiguous() && vc.sizes() == kc.sizes() && vc.is_contiguous()
            && vc.scalar_type() == kc.scalar_type() && pos < kc.size(2), "cache must be [1, kv_heads, length, head_dim]");
      q.resize(L.q.N); k.resize(L.k.N); v.resize(L.v.N); att.resize(L.q.N);
      L.attn_norm(xp, h.data(), hidden, eps);
      products({{&L.q, q.data()}, {&L.k, k.data()}, {&L.v, v.data()}}, h.data(), scratch);
      if (rotary) {
        check(cf.numel() == L.head_dim, "cos/sin must be [head_dim]");
        rotate(q.data(), L.heads, L.head_dim, cf.data_ptr<float>(), sf.data_ptr<float>());
        rotate(k.data(), L.kv_heads, L.head_dim, cf.data_ptr<float>(), sf.data_ptr<float>());
      }
      const int64_t first = L.window ? std::max<int64_t>(0, pos - L.window + 1) : 0;
      if (kc.scalar_type() == at::kFloat) {
        store<float>(kc, k.data(), L.kv_heads, L.head_dim, pos);
        store<float>(vc, v.data(), L.kv_heads, L.head_dim, pos);
        attend<float>(L, q.data(), kc, vc, first, pos, att.data());
      } else {
        check(kc.scalar_type() == at::kBFloat16, "the cache must be float32 or bfloat16");
        store<c10::BFloat16>(kc, k.data(), L.kv_heads, L.head_dim, pos);
        store<c10::BFloat16>(vc, v.data(), L.kv_heads, L.head_dim, pos);
        attend<c10::BFloat16>(L, q.data(), kc, vc, first, pos, att.data());
      }
      products({{&L.o, r.data()}}, att.data(), scratch);
      for (int64_t i = 0; i < hidden; ++i) xp[i] += r[i];

      L.mlp_norm(xp, h.data(), hidden, eps);
      a.resize(L.up.N);
      b.resize(L.gate.N);
      products({{&L.gate, b.data()}, {&L.up, a.data()}}, h.data(), scratch);  // the arena's order
      if (L.gate.kind != ABSENT) {
        activate(b.data(), L.gate.N, act);
        for (int64_t i = 0; i < L.up.N; ++i) a[i] *= b[i];
      } else {
        activate(a.data(), L.up.N, act);
      }
      products({{&L.down, r.data()}}, a.data(), scratch);
      for (int64_t i = 0; i < hidden; ++i) xp[i] += r[i];
    }
    if (!tail) return x;
    final_norm(xp, h.data(), hidden, eps);
    at::Tensor logits = at::empty({head.N}, at::kFloat);
    products({{&head, logits.data_ptr<float>()}}, h.data(), scratch);
    return logits;
  }
};

}  // namespace llmctl

TORCH_LIBRARY_FRAGMENT(llmctl, m) {
  m.class_<llmctl::DecodePlan>("DecodePlan")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, double>())
      .def("set_embedding", &llmctl::DecodePlan::set_embedding)
      .def("step_token", &llmctl::DecodePlan::step_token)
      .def("step", &llmctl::DecodePlan::step);
}
