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
// (B_max, Hkv, S_max, hd) and k, v are views of its first S positions), for all n_rep = H / Hkv
// query heads that share it; the tasks are split across torch's threads. Each row visits only the
// positions from its first to its last unmasked one: in a batch whose rows sit at different
// positions, a short row does not pay for the longest one's S.
//
// Vectorised (AVX-512) when hd is a multiple of 32, up to 256: q . k with vdpbf16ps (bf16 products
// summed in float32) for 16 keys at a time, whose 16 partial-sum vectors are summed across lanes
// together (sum16); exp with a polynomial (exp16); the value sum with float32 FMAs, the sums of up
// to 4 query heads x 64 dims in registers over all keys. Plain loops otherwise.
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

namespace llama_kernels {

namespace {

struct Strides {
  int64_t b, h, s;  // of dims 0, 1, 2 (dim 3, hd, is contiguous)
};

// The arguments every task shares.
struct Problem {
  const bf16* q;
  Strides qs;
  const bf16* k;
  Strides ks;
  const bf16* v;
  Strides vs;
  const bool* mask;  // (B, S)
  int64_t H, n_rep, S, hd;
  float scale;
  bf16* out;  // (B, H, hd)
};

// [lo, hi): row b's positions from its first unmasked one to its last (lo == hi: none).
inline void unmasked_range(const bool* mb, int64_t S, int64_t& lo, int64_t& hi) {
  lo = 0, hi = S;
  while (lo < S && !mb[lo]) lo++;
  while (hi > lo && !mb[hi - 1]) hi--;
}

// One (row b, key/value head g) task in plain loops: the n_rep query heads g * n_rep .. of row b.
void head_group_plain(const Problem& P, int64_t b, int64_t g) {
  const int64_t n_rep = P.n_rep, hd = P.hd;
  const bf16* kb = P.k + b * P.ks.b + g * P.ks.h;
  const bf16* vb = P.v + b * P.vs.b + g * P.vs.h;
  const bool* mb = P.mask + b * P.S;
  int64_t lo, hi;
  unmasked_range(mb, P.S, lo, hi);
  const int64_t L = hi - lo;
  std::vector<float> p(n_rep * L);             // scores, then exp(score - max): p[r * L + j - lo]
  std::vector<float> acc(n_rep * hd, 0.f);     // sum_j p v, per query head
  std::vector<float> qf(n_rep * hd), total(n_rep, 0.f);
  for (int64_t r = 0; r < n_rep; r++)
    for (int64_t d = 0; d < hd; d++) qf[r * hd + d] = bf16_to_float(P.q[b * P.qs.b + (g * n_rep + r) * P.qs.h + d]);
  for (int64_t r = 0; r < n_rep; r++) {
    float* pr = p.data() + r * L;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t j = lo; j < hi; j++) {
      if (!mb[j]) {
        pr[j - lo] = -std::numeric_limits<float>::infinity();
        continue;
      }
      const bf16* kj = kb + j * P.ks.s;
      float dot = 0.f;
      for (int64_t d = 0; d < hd; d++) dot += qf[r * hd + d] * bf16_to_float(kj[d]);
      pr[j - lo] = dot * P.scale;
      top = std::fmax(top, pr[j - lo]);
    }
    for (int64_t j = 0; j < L; j++) {
      pr[j] = std::exp(pr[j] - top);  // exp(-inf) = 0 for the masked ones
      total[r] += pr[j];
    }
  }
  for (int64_t j = lo; j < hi; j++) {
    if (!mb[j]) continue;
    const bf16* vj = vb + j * P.vs.s;
    for (int64_t d = 0; d < hd; d++) {
      const float vd = bf16_to_float(vj[d]);
      for (int64_t r = 0; r < n_rep; r++) acc[r * hd + d] += p[r * L + j - lo] * vd;
    }
  }
  for (int64_t r = 0; r < n_rep; r++)
    for (int64_t d = 0; d < hd; d++)
      P.out[(b * P.H + g * n_rep + r) * hd + d] = float_to_bf16(L > 0 ? acc[r * hd + d] / total[r] : 0.f);
}

#ifdef LLAMA_KERNELS_AVX512

// The lane sums of 16 vectors in one: lane i = sum of v[i]'s 16 lanes. Halving the count at each
// step (pairs of vectors, then of 64-bit pairs, then of 128-bit quarters), 45 instructions instead
// of 16 horizontal sums of ~8 each.
inline __m512 sum16(const __m512* v) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; i++)  // per 128-bit quarter: (a0+a2, b0+b2, a1+a3, b1+b3) of a = v[2i], b = v[2i+1]
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; i++) {  // per quarter: the quarter's sums of v[4i], v[4i+1], v[4i+2], v[4i+3]
    const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // quarter q of the result: the four quarters of u[q] added
  const __m512 y0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 y1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y0, y1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(y0, y1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// 16 bf16 values as float32.
inline __m512 widen16(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// out[r, d0 : d0 + 16 DC] = sum_j p[r * ps + j] v[j, d0 : ...] / total[r] for NR query heads r and
// the L positions j, the sums in registers over all of them (NR x DC).
template <int NR, int DC>
void value_sum(const float* p, int64_t ps, int64_t L, const float* total, const bf16* v, int64_t vs, const bool* mb,
               int64_t d0, bf16* out, int64_t hd) {
  __m512 acc[NR][DC];
  for (int r = 0; r < NR; r++)
    for (int c = 0; c < DC; c++) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < L; j++) {
    if (!mb[j]) continue;  // p is 0 there; the cache may hold anything
    __m512 vj[DC];
    for (int c = 0; c < DC; c++) vj[c] = widen16(v + j * vs + d0 + 16 * c);
    for (int r = 0; r < NR; r++) {
      const __m512 pr = _mm512_set1_ps(p[r * ps + j]);
      for (int c = 0; c < DC; c++) acc[r][c] = _mm512_fmadd_ps(pr, vj[c], acc[r][c]);
    }
  }
  for (int r = 0; r < NR; r++) {
    const __m512 inverse = _mm512_set1_ps(1.f / total[r]);
    for (int c = 0; c < DC; c++)
      _mm256_storeu_si256((__m256i*)(out + r * hd + d0 + 16 * c),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][c], inverse)));
  }
}

template <int NR>
void value_sums(const float* p, int64_t ps, int64_t L, const float* total, const bf16* v, int64_t vs, const bool* mb,
                bf16* out, int64_t hd) {
  int64_t d0 = 0;
  for (; d0 + 64 <= hd; d0 += 64) value_sum<NR, 4>(p, ps, L, total, v, vs, mb, d0, out, hd);
  if (d0 < hd) value_sum<NR, 2>(p, ps, L, total, v, vs, mb, d0, out, hd);  // hd % 64 == 32
}

// One (row b, key/value head g) task, vectorised (hd % 32 == 0, hd <= 256).
void head_group_avx512(const Problem& P, int64_t b, int64_t g) {
  const int64_t n_rep = P.n_rep, hd = P.hd, chunks = hd / 32;
  const bool* mb = P.mask + b * P.S;
  bf16* out = P.out + (b * P.H + g * n_rep) * hd;  // (n_rep, hd)
  int64_t lo, hi;
  unmasked_range(mb, P.S, lo, hi);
  if (lo == hi) {  // nothing to attend to: zeros
    for (int64_t i = 0; i < n_rep * hd; i++) out[i] = 0;
    return;
  }
  mb += lo;
  const bf16* kb = P.k + b * P.ks.b + g * P.ks.h + lo * P.ks.s;  // position lo
  const bf16* vb = P.v + b * P.vs.b + g * P.vs.h + lo * P.vs.s;
  const int64_t L = hi - lo, L16 = (L + 15) / 16 * 16;
  thread_local std::vector<float> scratch;
  scratch.resize(n_rep * (L16 + 1));
  float* p = scratch.data();             // p[r * L16 + j]: scores, then exp(score - max)
  float* total = p + n_rep * L16;        // (n_rep,) the sums of exp
  const __m512 scale = _mm512_set1_ps(P.scale), minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t r = 0; r < n_rep; r++) {
    const bf16* qr = P.q + b * P.qs.b + (g * n_rep + r) * P.qs.h;
    __m512bh qv[8];
    for (int64_t c = 0; c < chunks; c++) qv[c] = (__m512bh)_mm512_loadu_si512(qr + 32 * c);
    float* pr = p + r * L16;
    __m512 top16 = minus_inf;
    for (int64_t j0 = 0; j0 < L; j0 += 16) {  // scores of 16 positions at a time
      const int64_t n = L - j0 < 16 ? L - j0 : 16;
      __m512 part[16];
      for (int64_t i = 0; i < 16; i++) {
        part[i] = _mm512_setzero_ps();
        if (i >= n) continue;
        const bf16* kj = kb + (j0 + i) * P.ks.s;
        for (int64_t c = 0; c < chunks; c++)
          part[i] = _mm512_dpbf16_ps(part[i], qv[c], (__m512bh)_mm512_loadu_si512(kj + 32 * c));
      }
      const __mmask16 in_range = n == 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
      const __m128i m = _mm_maskz_loadu_epi8(in_range, mb + j0);  // the mask's bytes, 0 past n
      const __m512 s = _mm512_mask_mul_ps(minus_inf, _mm_test_epi8_mask(m, m), sum16(part), scale);
      _mm512_storeu_ps(pr + j0, s);
      top16 = _mm512_max_ps(top16, s);
    }
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(top16));  // finite: position lo is unmasked
    __m512 total16 = _mm512_setzero_ps();
    for (int64_t j = 0; j < L16; j += 16) {  // past L: -inf, exp 0
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(pr + j), top));
      _mm512_storeu_ps(pr + j, e);
      total16 = _mm512_add_ps(total16, e);
    }
    total[r] = _mm512_reduce_add_ps(total16);
  }
  for (int64_t r = 0; r < n_rep; r += 4) {  // the value sums, 4 query heads at a time
    const float* pr = p + r * L16;
    switch (n_rep - r >= 4 ? 4 : n_rep - r) {
      case 1: value_sums<1>(pr, L16, L, total + r, vb, P.vs.s, mb, out + r * hd, hd); break;
      case 2: value_sums<2>(pr, L16, L, total + r, vb, P.vs.s, mb, out + r * hd, hd); break;
      case 3: value_sums<3>(pr, L16, L, total + r, vb, P.vs.s, mb, out + r * hd, hd); break;
      default: value_sums<4>(pr, L16, L, total + r, vb, P.vs.s, mb, out + r * hd, hd); break;
    }
  }
}
#endif

}  // namespace

void decode_attention(const bf16* q, const int64_t* q_strides, const bf16* k, const int64_t* k_strides, const bf16* v,
                      const int64_t* v_strides, const bool* mask, int64_t B, int64_t H, int64_t Hkv, int64_t S,
                      int64_t hd, float scale, bf16* out) {
  const Problem P{q, {q_strides[0], q_strides[1], 0}, k, {k_strides[0], k_strides[1], k_strides[2]}, v,
                  {v_strides[0], v_strides[1], v_strides[2]}, mask, H, H / Hkv, S, hd, scale, out};
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; t++) {
#ifdef LLAMA_KERNELS_AVX512
      if (hd % 32 == 0 && hd <= 256) {
        head_group_avx512(P, t / Hkv, t % Hkv);
        continue;
      }
#endif
      head_group_plain(P, t / Hkv, t % Hkv);
    }
  });
}

}  // namespace llama_kernels
