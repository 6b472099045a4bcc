// RMSNorm, rotary embeddings and SwiGLU's gating in one pass each, for the steps of a decoding token
// that are not matrix products.
//
// Why: the PyTorch versions are a chain of small operators (RMSNorm: x.float(), pow, mean, add,
// rsqrt, mul, type_as, mul; RoPE: two casts, four multiplies, a subtract, an add, two copies, and
// the views between them). For one token each operator does almost no arithmetic and costs its
// dispatch and a pass over memory, and a Llama 3.2 1B step calls these chains 33 and 32 times.
//
// Both compute what the PyTorch code computes, operation for operation in float32, and round to
// bfloat16 the way c10::BFloat16 does (to nearest, ties to even; float_to_bf16), so:
//   - rope_ gives the same bits as kernels/fused.py's rope_ and llama/core/model.py's apply_rope
//     (a * cos - b * sin is two products and a difference, each rounded: the build has
//     -ffp-contract=off, so the compiler does not fuse them into one multiply-add);
//   - rms_norm differs from RMSNorm only in the order of the float32 sum of squares, which moves the
//     result by a few float32 rounding steps and the bf16 output by one step now and then;
//   - silu_mul's exp (exp16, a polynomial) differs from PyTorch's by about one float32 rounding step,
//     so a bf16 output differs by one step now and then.
#include <cmath>

#include "common.h"

namespace llama_kernels {

namespace {

#ifdef LLAMA_KERNELS_AVX512
// 16 bf16 values (32 bytes) -> 16 float32: the 16 bits become the top half of each lane.
inline __m512 load16(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// 16 float32 -> 16 bf16 as 32-bit lanes (bits in the low half), rounded as float_to_bf16 does:
// to nearest, ties to even, NaN to 0x7fc0. (vcvtneps2bf16 would flush denormal inputs to zero.)
inline __m512i round16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_blend_epi32(nan, rounded, _mm512_set1_epi32(0x7fc0));
}

inline void store16(bf16* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(round16(v))); }
#endif

// One row of D values: y = bf16(bf16(x * r) * w) with r = 1 / sqrt(mean(x^2) + eps).
void rms_norm_row(const bf16* x, const bf16* w, int64_t D, float eps, bf16* y) {
  int64_t d = 0;
  float sum = 0.f;
#ifdef LLAMA_KERNELS_AVX512
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (; d + 64 <= D; d += 64)
    for (int j = 0; j < 4; j++) {
      const __m512 v = load16(x + d + 16 * j);
      acc[j] = _mm512_fmadd_ps(v, v, acc[j]);
    }
  for (; d + 16 <= D; d += 16) {
    const __m512 v = load16(x + d);
    acc[0] = _mm512_fmadd_ps(v, v, acc[0]);
  }
  sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
#endif
  for (; d < D; d++) {
    const float v = bf16_to_float(x[d]);
    sum += v * v;
  }
  const float r = 1.f / std::sqrt(sum / float(D) + eps);
  d = 0;
#ifdef LLAMA_KERNELS_AVX512
  const __m512 rv = _mm512_set1_ps(r);
  for (; d + 16 <= D; d += 16) {
    const __m512 normed = _mm512_castsi512_ps(_mm512_slli_epi32(round16(_mm512_mul_ps(load16(x + d), rv)), 16));
    store16(y + d, _mm512_mul_ps(normed, load16(w + d)));
  }
#endif
  for (; d < D; d++) y[d] = float_to_bf16(bf16_to_float(float_to_bf16(bf16_to_float(x[d]) * r)) * bf16_to_float(w[d]));
}

// One head's vector of hd values, rotated in place: pairs (a, b) = (x[2i], x[2i + 1]) become
// (a cos_i - b sin_i, a sin_i + b cos_i).
void rope_head(bf16* x, const float* cos, const float* sin, int64_t hd) {
  int64_t i = 0;
#ifdef LLAMA_KERNELS_AVX512
  for (; 2 * i + 32 <= hd; i += 16) {  // 16 pairs: one 64-byte load, a in the low halves, b in the high
    const __m512i v = _mm512_loadu_si512(x + 2 * i);
    const __m512 a = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    const __m512 b = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xffff0000u))));
    const __m512 c = _mm512_loadu_ps(cos + i), s = _mm512_loadu_ps(sin + i);
    const __m512i new_a = round16(_mm512_sub_ps(_mm512_mul_ps(a, c), _mm512_mul_ps(b, s)));
    const __m512i new_b = round16(_mm512_add_ps(_mm512_mul_ps(a, s), _mm512_mul_ps(b, c)));
    _mm512_storeu_si512(x + 2 * i, _mm512_or_si512(new_a, _mm512_slli_epi32(new_b, 16)));
  }
#endif
  for (; 2 * i < hd; i++) {
    const float a = bf16_to_float(x[2 * i]), b = bf16_to_float(x[2 * i + 1]);
    x[2 * i] = float_to_bf16(a * cos[i] - b * sin[i]);
    x[2 * i + 1] = float_to_bf16(a * sin[i] + b * cos[i]);
  }
}

// One row: y = bf16(bf16(g / (1 + exp(-g))) * u), what F.silu(gate) * up computes for bf16 tensors.
void silu_mul_row(const bf16* g, const bf16* u, int64_t F, bf16* y) {
  int64_t i = 0;
#ifdef LLAMA_KERNELS_AVX512
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + 16 <= F; i += 16) {
    const __m512 gv = load16(g + i);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
    const __m512 silu = _mm512_castsi512_ps(_mm512_slli_epi32(round16(_mm512_div_ps(gv, _mm512_add_ps(one, e))), 16));
    store16(y + i, _mm512_mul_ps(silu, load16(u + i)));
  }
#endif
  for (; i < F; i++) {
    const float gf = bf16_to_float(g[i]);
    y[i] = float_to_bf16(bf16_to_float(float_to_bf16(gf / (1.f + std::exp(-gf)))) * bf16_to_float(u[i]));
  }
}

}  // namespace

void silu_mul(const bf16* gate, int64_t ld_gate, const bf16* up, int64_t ld_up, int64_t rows, int64_t F, bf16* y) {
  at::parallel_for(0, rows, grain_for(F * 2 * 8), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) silu_mul_row(gate + r * ld_gate, up + r * ld_up, F, y + r * F);
  });
}

void rms_norm(const bf16* x, const bf16* w, int64_t rows, int64_t D, float eps, bf16* y) {
  at::parallel_for(0, rows, grain_for(D * 2 * 8), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) rms_norm_row(x + r * D, w, D, eps, y + r * D);
  });
}

void rope_(bf16* x, const int64_t* strides, int64_t B, int64_t T, int64_t n, int64_t hd, const float* cos,
           const float* sin) {
  at::parallel_for(0, B * T, grain_for(n * hd * 2 * 8), [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; bt++) {
      const int64_t b = bt / T, t = bt % T;
      const float* c = cos + bt * (hd / 2);
      const float* s = sin + bt * (hd / 2);
      for (int64_t h = 0; h < n; h++) rope_head(x + b * strides[0] + t * strides[1] + h * strides[2], c, s, hd);
    }
  });
}

}  // namespace llama_kernels
