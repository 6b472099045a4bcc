// Attention for one query per sequence (a decoding step), over the KV cache where it lies.
//
// PyTorch it mirrors (kernels/fused.py, FastAttention.attend, for T = 1):
//     F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
// with q (B, H, 1, hd), k and v (B, Hkv, S, hd), mask (B, 1, 1, S) bool (True = attend), query head h
// reading key/value head h / (H / Hkv). For each row b and query head h, in float32:
//     s[j] = scale * sum_d q[b, h, d] * k[b, g, j, d]      for the unmasked j
//     p = softmax(s);   out[b, h, :] = sum_j p[j] * v[b, g, j, :]       rounded once to bf16
// Why not SDPA: for one query its CPU kernels pay for blocking meant for many queries, and with GQA
// the key/value heads are read once per query head. Here one task per (row, key/value head) reads
// that head's keys and values once, from the cache's own storage (any strides: the cache is
// (B_max, Hkv, S_max, hd) and k, v are views of its first S positions), for all H / Hkv query heads
// that share it; the tasks are split across torch's threads.
//
// Vectorised (AVX-512) when hd is a multiple of 32: q . k with vdpbf16ps (bf16 products summed
// in float32), exp with a polynomial (below), the value sum with float32 FMAs; plain loops otherwise.
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

namespace llama_kernels {

namespace {

#ifdef LLAMA_KERNELS_AVX512
// exp(x) for 16 floats: x = (n + f) * ln 2 with n an integer and |f| <= 1/2; 2^f by its Taylor series
// to degree 7 (relative error < 1e-7, float32's rounding), times 2^n by vscalefps. x below -100 gives
// 0 (exp(-100) is 4e-44, below float32's normal range): softmax's masked or negligible terms.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-100.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));  // x / ln 2
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147180559945309f));  // f ln 2
  // e^(f ln 2) = sum_i (f ln 2)^i / i!, Horner
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
#endif

struct Strides {
  int64_t b, h, s;  // of dims 0, 1, 2 (dim 3, hd, is contiguous)
};

// One (row b, key/value head g) task: the n_rep query heads g * n_rep .. of row b.
void head_group(const bf16* q, Strides qs, const bf16* k, Strides ks, const bf16* v, Strides vs, const bool* mask,
                int64_t b, int64_t g, int64_t n_rep, int64_t S, int64_t hd, float scale, bf16* out, int64_t H) {
  const bf16* kb = k + b * ks.b + g * ks.h;
  const bf16* vb = v + b * vs.b + g * vs.h;
  const bool* mb = mask + b * S;
  std::vector<float> p(n_rep * S);    // scores, then probabilities: p[r * S + j]
  std::vector<float> acc(n_rep * hd, 0.f);  // sum_j p v, per query head
  std::vector<float> qf(n_rep * hd);  // q as float (the plain loops)
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < n_rep; r++)
    for (int64_t d = 0; d < hd; d++) qf[r * hd + d] = bf16_to_float(q[b * qs.b + (g * n_rep + r) * qs.h + d]);
#ifdef LLAMA_KERNELS_AVX512
  const bool vector = hd % 32 == 0;
#else
  const bool vector = false;
#endif
  // scores
  for (int64_t j = 0; j < S; j++) {
    const bf16* kj = kb + j * ks.s;
    for (int64_t r = 0; r < n_rep; r++) {
      if (!mb[j]) {
        p[r * S + j] = neg_inf;
        continue;
      }
      float dot = 0.f;
#ifdef LLAMA_KERNELS_AVX512
      if (vector) {
        const bf16* qr = q + b * qs.b + (g * n_rep + r) * qs.h;
        __m512 sum = _mm512_setzero_ps();
        for (int64_t d = 0; d < hd; d += 32)
          sum = _mm512_dpbf16_ps(sum, (__m512bh)_mm512_loadu_si512(qr + d), (__m512bh)_mm512_loadu_si512(kj + d));
        dot = _mm512_reduce_add_ps(sum);
      }
#endif
      if (!vector)
        for (int64_t d = 0; d < hd; d++) dot += qf[r * hd + d] * bf16_to_float(kj[d]);
      p[r * S + j] = dot * scale;
    }
  }
  // softmax over j, per query head
  for (int64_t r = 0; r < n_rep; r++) {
    float* pr = p.data() + r * S;
    float top = neg_inf;
    for (int64_t j = 0; j < S; j++) top = std::fmax(top, pr[j]);
    float total = 0.f;
    int64_t j = 0;
#ifdef LLAMA_KERNELS_AVX512
    const __m512 top16 = _mm512_set1_ps(top);
    __m512 total16 = _mm512_setzero_ps();
    for (; j + 16 <= S; j += 16) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(pr + j), top16));
      _mm512_storeu_ps(pr + j, e);
      total16 = _mm512_add_ps(total16, e);
    }
    total = _mm512_reduce_add_ps(total16);
#endif
    for (; j < S; j++) {
      pr[j] = std::exp(pr[j] - top);  // exp(-inf) = 0 for the masked ones
      total += pr[j];
    }
    const float inverse = 1.f / total;
    for (j = 0; j < S; j++) pr[j] *= inverse;
  }
  // out = p @ v
  for (int64_t j = 0; j < S; j++) {
    if (!mb[j]) continue;
    const bf16* vj = vb + j * vs.s;
#ifdef LLAMA_KERNELS_AVX512
    if (vector) {
      for (int64_t d = 0; d < hd; d += 16) {
        const __m512 vd = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(vj + d))), 16));
        for (int64_t r = 0; r < n_rep; r++) {
          float* a = acc.data() + r * hd + d;
          _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(p[r * S + j]), vd, _mm512_loadu_ps(a)));
        }
      }
      continue;
    }
#endif
    for (int64_t d = 0; d < hd; d++) {
      const float vd = bf16_to_float(vj[d]);
      for (int64_t r = 0; r < n_rep; r++) acc[r * hd + d] += p[r * S + j] * vd;
    }
  }
  for (int64_t r = 0; r < n_rep; r++)
    for (int64_t d = 0; d < hd; d++) out[(b * H + g * n_rep + r) * hd + d] = float_to_bf16(acc[r * hd + d]);
}

}  // namespace

void decode_attention(const bf16* q, const int64_t* q_strides, const bf16* k, const int64_t* k_strides, const bf16* v,
                      const int64_t* v_strides, const bool* mask, int64_t B, int64_t H, int64_t Hkv, int64_t S,
                      int64_t hd, float scale, bf16* out) {
  const Strides qs{q_strides[0], q_strides[1], 0}, ks{k_strides[0], k_strides[1], k_strides[2]},
      vs{v_strides[0], v_strides[1], v_strides[2]};
  const int64_t n_rep = H / Hkv;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; t++) head_group(q, qs, k, ks, v, vs, mask, t / Hkv, t % Hkv, n_rep, S, hd, scale, out, H);
  });
}

}  // namespace llama_kernels
