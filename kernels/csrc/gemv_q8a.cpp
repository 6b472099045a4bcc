// The int8 and int4 kernels again, with the activations quantized to int8 ("q8a") so that the
// products are integer dot products (AVX512-VNNI vpdpbusd: 64 u8 x s8 products summed four at a
// time into 16 int32 lanes), as llama.cpp multiplies its Q8_0 / Q4_0 weights.
//
// The activations. Each row of x is cut into blocks of 32 values; a block with largest magnitude
// a gets the scale d = a / 127 and the values xq = round(x / d) (round half to even, computed as
// x * (1 / d) in float32; d = 0 gives xq = 0). So x[k] ~ d * xq[k], with an error of at most d / 2
// per value: the same quantization as llama.cpp's Q8_0 activations (quantize_block below;
// kernels/native.py's quantize_activations_reference is the same in PyTorch, for the tests). A
// block holding a NaN gets d = NaN, so a NaN in x gives NaN outputs, as it would in F.linear.
//
// What is computed, with xq, d as above and every integer sum exact (int32):
//   gemv_int8_q8a (Int8Linear: q (N, K) int8, one scale s[n] per row):
//       y[m, n] = s[n] * sum_b d[m, b] * sum_{k in b} xq[m, k] * q[n, k]
//   gemv_q8_0_q8a (Int8BlockLinear, GGUF's Q8_0: one fp16 scale e[n, b] per block of 32):
//       y[m, n] = sum_b e[n, b] * d[m, b] * sum_{k in b} xq[m, k] * q[n, k]
//   gemv_int4_q8a (Int4Linear, W[n, k] = (q[n, k] - 8) * s[g, n] + z[g, n], on pack_int4's layout):
//       y[m, n] = sum_g  s[g, n] * sum_{b in g} d[m, b] * sum_{k in b} xq[m, k] * (q[n, k] - 8)
//                      + z[g, n] * X[m, g],          X[m, g] = sum_{k in g} x[m, k] (x itself)
// each in float32, rounded once to bf16.
//
// vpdpbusd multiplies unsigned by signed bytes. int8 weights are made unsigned by flipping their
// top bit (q ^ 0x80 = q + 128 as u8, for every q including -128), which adds 128 * sum xq to each
// dot product: the lane's accumulator starts at -128 * (its four xq summed) instead of 0 (`bias`,
// computed once per row of x). int4 values 0..15 are unsigned already; the -8 becomes a start of
// -8 * (the block's xq summed). A chunk of 64 int8 weights is one register: lanes 0-7 sum block
// 2c's products, lanes 8-15 block 2c+1's, so the block scales d come as a vector (d[2c] in lanes
// 0-7, d[2c+1] in lanes 8-15) and one convert + fused multiply-add per register applies them.
// int4 keeps gemv_int4.cpp's layout (16 output rows per register lane, quads of 4 values of k):
// a quad's 32 bytes become, per row i, the dword (q[k0], q[k0+1], q[k0+2], q[k0+3]) in two
// instructions, multiplied by x's four values broadcast (int4's sums are per block of 16 output rows
// already, so its scales cost one convert + multiply-add per 8 vpdpbusd). The int8 layout is for
// decoding (a few rows of x); prefill-sized int8 / Q8_0 calls (INT8_PANEL_MIN_ROWS) take the
// "panel" kernels further down, which put 16 rows of x in the lanes instead.
//
// Compiled for AVX512-VNNI (with AVX-512 BW/VL/VBMI/BF16 as the other kernels); elsewhere the same
// arithmetic in plain loops (kernels/native.py uses these kernels only where VNNI is present).
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

#if defined(LLAMA_KERNELS_AVX512) && defined(__AVX512VNNI__)
#define LLAMA_KERNELS_VNNI 1
#endif

namespace llama_kernels {

bool has_vnni() {
#ifdef LLAMA_KERNELS_VNNI
  return true;
#else
  return false;
#endif
}

namespace {

// One chunk of 64 values of a quantized row of x, as the int8 kernels read it.
struct alignas(64) Chunk {
  int8_t q[64];     // xq (zeros past K)
  int32_t bias[16];  // -128 * (q[4j] + q[4j+1] + q[4j+2] + q[4j+3]) for lane j
  float d[16];       // d of the chunk's first block in lanes 0-7, of its second in 8-15
};

// Quantizes x[0..n) (n <= 32) as one block: xq into q[0..32) (zeros past n), returns d.
float quantize_block(const bf16* x, int64_t n, int8_t* q) {
  float amax = 0.f;
  bool finite = true;
  for (int64_t i = 0; i < n; i++) {
    const float a = std::fabs(bf16_to_float(x[i]));
    finite &= a <= std::numeric_limits<float>::max();  // false for inf and NaN
    amax = a > amax ? a : amax;
  }
  std::memset(q, 0, 32);
  if (!finite) return std::numeric_limits<float>::quiet_NaN();  // the block's products are NaN, as in F.linear
  const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
  for (int64_t i = 0; i < n; i++) {
    const float v = std::nearbyint(bf16_to_float(x[i]) * id);  // round half to even; |v| <= 127
    q[i] = int8_t(v > 127.f ? 127.f : v < -127.f ? -127.f : v);
  }
  return d;
}

#ifdef LLAMA_KERNELS_VNNI
// quantize_block for a whole block of 32 in two registers, with the same float32 operations (|x| max,
// d = max / 127, x * (1 / d) rounded half to even by vcvtps2dq, clamped to +-127), so the same xq and d;
// also the xq summed and (added into xsum) x itself. At prefill sizes the scalar loop took ~10% of a call.
// (AVX-512 build only.)
float quantize_block32(const bf16* x, int8_t* q, int32_t& q_sum, __m512& xsum) {
  const __m512i raw = _mm512_loadu_si512(x);
  const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(raw)), 16));
  const __m512 hi =
      _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(raw, 1)), 16));
  xsum = _mm512_add_ps(xsum, _mm512_add_ps(lo, hi));
  const __m512 alo = _mm512_abs_ps(lo), ahi = _mm512_abs_ps(hi);
  const __m512 big = _mm512_set1_ps(std::numeric_limits<float>::max());
  if (_mm512_cmp_ps_mask(alo, big, _CMP_NLE_UQ) | _mm512_cmp_ps_mask(ahi, big, _CMP_NLE_UQ)) {  // inf or NaN
    std::memset(q, 0, 32);
    q_sum = 0;
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float d = _mm512_reduce_max_ps(_mm512_max_ps(alo, ahi)) / 127.f, id = d != 0.f ? 1.f / d : 0.f;
  const __m512i lim = _mm512_set1_epi32(127);
  auto round = [&](__m512 v) {
    const __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(v, _mm512_set1_ps(id)));
    return _mm512_max_epi32(_mm512_min_epi32(r, lim), _mm512_sub_epi32(_mm512_setzero_si512(), lim));
  };
  const __m512i qlo = round(lo), qhi = round(hi);
  _mm_storeu_si128((__m128i*)q, _mm512_cvtepi32_epi8(qlo));
  _mm_storeu_si128((__m128i*)(q + 16), _mm512_cvtepi32_epi8(qhi));
  q_sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
  return d;
}
#endif

// x (M, K) -> M * C chunks (C = K rounded up to 64, / 64).
std::vector<Chunk> quantize_chunks(const bf16* x, int64_t M, int64_t K) {
  const int64_t C = (K + 63) / 64;
  std::vector<Chunk> chunks(M * C);
  for (int64_t m = 0; m < M; m++)
    for (int64_t c = 0; c < C; c++) {
      Chunk& ch = chunks[m * C + c];
      for (int half = 0; half < 2; half++) {
        const int64_t k = 64 * c + 32 * half, n = K - k < 0 ? 0 : (K - k < 32 ? K - k : 32);
        const float d = n > 0 ? quantize_block(x + m * K + k, n, ch.q + 32 * half) : 0.f;
        if (n == 0) std::memset(ch.q + 32 * half, 0, 32);  // past K
        for (int j = 0; j < 8; j++) ch.d[8 * half + j] = d;
      }
      for (int j = 0; j < 16; j++)
        ch.bias[j] = -128 * (int32_t(ch.q[4 * j]) + ch.q[4 * j + 1] + ch.q[4 * j + 2] + ch.q[4 * j + 3]);
    }
  return chunks;
}

// The int4 kernel's view of a quantized row: xq (K values), and per block of 32 its d and
// -8 * (its xq summed); per group, X = the sum of x itself.
struct Int4Rows {
  std::vector<int8_t> q;      // (M, K)
  std::vector<float> d;       // (M, K / 32)
  std::vector<int32_t> bias;  // (M, K / 32)
  std::vector<float> xsum;    // (M, K / G)
};

Int4Rows quantize_int4_rows(const bf16* x, int64_t M, int64_t K, int64_t G) {
  Int4Rows r{std::vector<int8_t>(M * K), std::vector<float>(M * K / 32), std::vector<int32_t>(M * K / 32),
             std::vector<float>(M * K / G)};
  for (int64_t m = 0; m < M; m++) {
#ifdef LLAMA_KERNELS_VNNI
    if (M > 1) {  // one row (decoding): the scalar loop below measured 3-7% faster per call, cause not found
      __m512 xsum = _mm512_setzero_ps();
      for (int64_t b = 0; b < K / 32; b++) {
        int32_t sum;
        r.d[m * (K / 32) + b] = quantize_block32(x + m * K + 32 * b, r.q.data() + m * K + 32 * b, sum, xsum);
        r.bias[m * (K / 32) + b] = -8 * sum;
        if ((32 * (b + 1)) % G == 0) {  // the end of group 32 b / G
          r.xsum[m * (K / G) + 32 * b / G] = _mm512_reduce_add_ps(xsum);
          xsum = _mm512_setzero_ps();
        }
      }
      continue;
    }
#endif
    for (int64_t b = 0; b < K / 32; b++) {
      int8_t* q = r.q.data() + m * K + 32 * b;
      r.d[m * (K / 32) + b] = quantize_block(x + m * K + 32 * b, 32, q);
      int32_t sum = 0;
      for (int i = 0; i < 32; i++) sum += q[i];
      r.bias[m * (K / 32) + b] = -8 * sum;
    }
    for (int64_t g = 0; g < K / G; g++) {
      float sum = 0.f;
      for (int64_t k = g * G; k < (g + 1) * G; k++) sum += bf16_to_float(x[m * K + k]);
      r.xsum[m * (K / G) + g] = sum;
    }
  }
  return r;
}

}  // namespace

#ifdef LLAMA_KERNELS_VNNI

namespace {

constexpr int NR = 4;  // int8 weight rows per tile, from 2 rows of x (one row of x: 1, see int8_q8a)

// y[m, r] for m < MR, r < NR_ (rows of this tile). BLOCKED: Q8_0 (per-block fp16 scales e, ldd per
// row), else per-row scales.
template <bool BLOCKED, int MR, int NR_>
void int8_tile(const Chunk* xc, int64_t C, int64_t K, const int8_t* q, int64_t ldw, const void* scales,
               bool scales_bf16, const uint16_t* e, int64_t ldd, bf16* y, int64_t ldy) {
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512 acc[MR][NR_];
  for (int m = 0; m < MR; m++)
    for (int r = 0; r < NR_; r++) acc[m][r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; c++) {
    const int64_t k = 64 * c;
    const __mmask64 mask = K - k >= 64 ? ~__mmask64(0) : (__mmask64(1) << (K - k)) - 1;
    __m512i wu[NR_];
    __m512 es[NR_];
    for (int r = 0; r < NR_; r++) {
      // One weight row per tile (one row of x): the rows are one stream, prefetched far ahead.
      // Several: the next tile's rows, one tile ahead (prefetches never fault, past the end of q too):
      // rows of one tile lie next to each other, so each row alone is too short a stream (K bytes)
      // for the hardware prefetcher to ramp up (measured: 12 GB/s without this, one thread, K = 2048).
      if constexpr (NR_ == 1)
        _mm_prefetch(reinterpret_cast<const char*>(q + k) + STREAM_PREFETCH_BYTES, _MM_HINT_T0);
      else
        _mm_prefetch(reinterpret_cast<const char*>(q + (r + NR_) * ldw + k), _MM_HINT_T0);
      wu[r] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, q + r * ldw + k), flip);  // q + 128 as u8
      if constexpr (BLOCKED) {  // e[2c], e[2c+1] (F16C) in lanes 0-7 and 8-15; a last half chunk has no second
        uint32_t pair = e[r * ldd + 2 * c];
        if (k + 32 < K) pair |= uint32_t(e[r * ldd + 2 * c + 1]) << 16;
        es[r] = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(int(pair)))));
      }
    }
    for (int m = 0; m < MR; m++) {
      const Chunk& ch = xc[m * C + c];
      const __m512i xq = _mm512_load_si512(ch.q), bias = _mm512_load_si512(ch.bias);
      const __m512 d = _mm512_load_ps(ch.d);
      for (int r = 0; r < NR_; r++) {
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(bias, wu[r], xq));  // per lane: 4 products
        acc[m][r] = _mm512_fmadd_ps(dot, BLOCKED ? _mm512_mul_ps(d, es[r]) : d, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MR; m++)
    for (int r = 0; r < NR_; r++) {
      const float sum = _mm512_reduce_add_ps(acc[m][r]);
      y[m * ldy + r] = float_to_bf16(BLOCKED ? sum : sum * load_scale(scales, scales_bf16, r));
    }
}

template <bool BLOCKED, int NR_>
void int8_rows(const Chunk* xc, int64_t M, int64_t C, int64_t K, const int8_t* q, int64_t ldw, const void* scales,
               bool scales_bf16, const uint16_t* e, int64_t ldd, bf16* y, int64_t ldy) {
  for (int64_t m = 0; m < M; m += 4) {
    const Chunk* xm = xc + m * C;
    bf16* ym = y + m * ldy;
    switch (M - m >= 4 ? 4 : M - m) {
      case 1: int8_tile<BLOCKED, 1, NR_>(xm, C, K, q, ldw, scales, scales_bf16, e, ldd, ym, ldy); break;
      case 2: int8_tile<BLOCKED, 2, NR_>(xm, C, K, q, ldw, scales, scales_bf16, e, ldd, ym, ldy); break;
      case 3: int8_tile<BLOCKED, 3, NR_>(xm, C, K, q, ldw, scales, scales_bf16, e, ldd, ym, ldy); break;
      default: int8_tile<BLOCKED, 4, NR_>(xm, C, K, q, ldw, scales, scales_bf16, e, ldd, ym, ldy); break;
    }
  }
}

// TILE weight rows per tile: 1 for one row of x (each thread's rows then are one sequential stream,
// prefetched far ahead: decoding steps of Llama 3.2 1B took 0.79-0.81 of the time with 4-row
// tiles), NR for more (4 rows of x against one weight row took 1.15x as long per step as 4 x 4
// tiles: the quantized x is loaded once per weight row).
template <bool BLOCKED, int TILE>
void int8_q8a(const bf16* x, int64_t M, int64_t K, const int8_t* q, int64_t ldw, int64_t N, const void* scales,
              bool scales_bf16, const uint16_t* e, bf16* y) {
  const int64_t C = (K + 63) / 64, ldd = K / 32;
  const std::vector<Chunk> xc = quantize_chunks(x, M, K);
  const int64_t scale_bytes = scales_bf16 ? 2 : 4;
  parallel_chunks((N + TILE - 1) / TILE, chunk_for(TILE * K), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; t++) {
      const int64_t n = t * TILE;
      const int8_t* qn = q + n * ldw;
      const void* sn = BLOCKED ? nullptr : static_cast<const uint8_t*>(scales) + n * scale_bytes;
      const uint16_t* en = BLOCKED ? e + n * ldd : nullptr;
      switch (N - n >= TILE ? TILE : N - n) {
        case 1: int8_rows<BLOCKED, 1>(xc.data(), M, C, K, qn, ldw, sn, scales_bf16, en, ldd, y + n, N); break;
        case 2: int8_rows<BLOCKED, (TILE > 2 ? 2 : TILE)>(xc.data(), M, C, K, qn, ldw, sn, scales_bf16, en, ldd, y + n, N); break;
        case 3: int8_rows<BLOCKED, (TILE > 3 ? 3 : TILE)>(xc.data(), M, C, K, qn, ldw, sn, scales_bf16, en, ldd, y + n, N); break;
        default: int8_rows<BLOCKED, TILE>(xc.data(), M, C, K, qn, ldw, sn, scales_bf16, en, ldd, y + n, N); break;
      }
    }
  });
}

// int4: y[m, 16b .. 16b+16) for m < MB (16 output rows per lane, pack_int4's records).
template <int MB>
void int4_tile(const Int4Rows& xr, int64_t m0, int64_t K, const uint8_t* packed, int64_t G, int64_t b, bf16* y,
               int64_t N) {
  const int64_t n_groups = K / G, n_blocks = K / 32, rec_bytes = 64 + 8 * G;
  const __m512i nibbles = _mm512_set1_epi32(0x0F0F0F0F);
  const __m512i high_half = _mm512_set1_epi32(int(0xFFFF0000u));
  __m512 out[MB];
  for (int m = 0; m < MB; m++) out[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < n_groups; g++) {
    const uint8_t* rec = packed + (b * n_groups + g) * rec_bytes;
    // The blocks of a thread's rows lie one after the other: one stream, prefetched far ahead
    // (decoding steps of Llama 3.2 1B took 0.80-0.87 of the time at batch 1, 0.66 at batch 4).
    for (int64_t l = 0; l < rec_bytes; l += 64)
      _mm_prefetch(reinterpret_cast<const char*>(rec) + STREAM_PREFETCH_BYTES + l, _MM_HINT_T0);
    const __m512i sz = _mm512_loadu_si512(rec);                             // 16 x (s, z) bf16 pairs
    const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(sz, 16));
    const __m512 z = _mm512_castsi512_ps(_mm512_and_si512(sz, high_half));
    __m512 gsum[MB];
    for (int m = 0; m < MB; m++) gsum[m] = _mm512_setzero_ps();
    for (int64_t j0 = 0; j0 < G / 4; j0 += 8) {  // one block of 32 values of k: 8 quads
      const int64_t blk = (g * G) / 32 + j0 / 8;
      __m512i dot[MB];
      for (int m = 0; m < MB; m++) dot[m] = _mm512_set1_epi32(xr.bias[(m0 + m) * n_blocks + blk]);
      for (int64_t j = j0; j < j0 + 8; j++) {
        // Row i's word: q[k0] | q[k0+2] << 4 | q[k0+1] << 8 | q[k0+3] << 12 -> dword bytes q[k0..k0+3].
        const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(rec + 64 + 32 * j)));
        const __m512i u = _mm512_ternarylogic_epi32(w, _mm512_slli_epi32(w, 12), nibbles, 0xA8);  // (w | w<<12) & 0x0F0F0F0F
        const int64_t k0 = g * G + 4 * j;
        for (int m = 0; m < MB; m++) {
          int32_t x4;
          std::memcpy(&x4, xr.q.data() + (m0 + m) * K + k0, 4);
          dot[m] = _mm512_dpbusd_epi32(dot[m], u, _mm512_set1_epi32(x4));
        }
      }
      for (int m = 0; m < MB; m++)
        gsum[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[m]), _mm512_set1_ps(xr.d[(m0 + m) * n_blocks + blk]), gsum[m]);
    }
    for (int m = 0; m < MB; m++) {
      out[m] = _mm512_fmadd_ps(s, gsum[m], out[m]);
      out[m] = _mm512_fmadd_ps(z, _mm512_set1_ps(xr.xsum[(m0 + m) * n_groups + g]), out[m]);
    }
  }
  for (int m = 0; m < MB; m++) {
    const int64_t n = b * 16, left = N - n;
    const __m256i v = (__m256i)_mm512_cvtneps_pbh(out[m]);
    bf16* ym = y + (m0 + m) * N + n;
    if (left >= 16) _mm256_storeu_si256((__m256i*)ym, v);
    else _mm256_mask_storeu_epi16(ym, __mmask16((1u << left) - 1), v);
  }
}

// ---- Many rows of x (prefill): rows of x in the lanes ----
//
// With the layout above, each vpdpbusd's sum covers half a block of one (x row, weight row) pair,
// so every vpdpbusd needs its own convert and multiply-add to apply d (three instructions of
// overhead per product instruction). For more rows of x, the kernels below turn the lanes
// around: x is taken 16 rows at a time (a "panel"), one register holding, per lane i, the four xq
// of row i at one quad of k (k0 .. k0+3). A weight row's four values at k0 are broadcast to every
// lane, so one vpdpbusd adds four products to each of 16 (x row, weight row) sums, and the 8
// vpdpbusd of a block of 32 all add into the same int32 register: one convert and one
// multiply-add per 8 product instructions, with d[m, b] as a vector (lane i) and the weight's
// scale, the same for every lane, broadcast. A tile of NR weight rows meets MB panels at a time:
// each broadcast weight register serves MB panels, each loaded x register NR rows.
//
// The unsigned side of vpdpbusd is now the weights, q ^ 0x80 = q + 128 (the accumulator starts at
// -128 * the block's xq summed, as above, now one value per lane). The weight rows are read where
// they are, with their stride (no second copy); x's panels are built once per call, and a tile
// (NR x K bytes of weights, from the cache after the first panel) meets every panel in turn.
//
// int4 has no panel version: one that unpacked each block of 16 rows once per call and broadcast
// its dwords the same way measured slower than int4_tile at 32-64 rows and no faster at 128-256
// (Llama-3.2-1B int4 prefill of 128 tokens: 161 tok/s against 176, one thread of a Zen 5).
//
// Rows of x from which the panel kernels are used; below, the kernels above (measured on Zen 5, one
// thread, the four Llama-3.2-1B layer shapes): a panel costs about the same for 1-16 rows, the
// kernels above grow with every row, and the panels win from 6 rows.
constexpr int64_t INT8_PANEL_MIN_ROWS = 6;

enum class Kind { INT8, Q8_0 };

// One register's worth of a panel, aligned for whole-register loads.
struct alignas(64) Bytes64 { int8_t v[64]; };
struct alignas(64) Ints16 { int32_t v[16]; };
struct alignas(64) Floats16 { float v[16]; };

// x quantized for the panel kernels, P = ceil(M / 16) panels (rows past M: zeros, outputs dropped).
struct Panels {
  std::vector<Bytes64> q;       // (P, K/4): panel p, quad j -> bytes 4i..4i+3 = xq[16p + i, 4j .. 4j+3]
  std::vector<Ints16> start;    // (P, K/32): lane i = -128 * (xq of row 16p + i in block b, summed)
  std::vector<Floats16> d;      // (P, K/32): lane i = d[16p + i, b]
};

// K is a multiple of 32.
Panels quantize_panels(const bf16* x, int64_t M, int64_t K) {
  const int64_t P = (M + 15) / 16, n_blocks = K / 32;
  Panels xp{std::vector<Bytes64>(P * K / 4), std::vector<Ints16>(P * n_blocks), std::vector<Floats16>(P * n_blocks)};
  for (int64_t m = 0; m < M; m++) {
    const int64_t p = m / 16, i = m % 16;
    __m512 unused = _mm512_setzero_ps();
    for (int64_t b = 0; b < n_blocks; b++) {
      int8_t q[32];
      int32_t sum;
      xp.d[p * n_blocks + b].v[i] = quantize_block32(x + m * K + 32 * b, q, sum, unused);
      xp.start[p * n_blocks + b].v[i] = -128 * sum;
      for (int j = 0; j < 8; j++) std::memcpy(xp.q[p * K / 4 + 8 * b + j].v + 4 * i, q + 4 * j, 4);
    }
  }
  return xp;
}

// Where a tile's NR weight rows come from.
template <int NR>
struct WeightTile {
  const int8_t* row[NR];  // row r's K values
  int64_t ldw;            // the weight's row stride (to prefetch the next tile)
  const float* e;         // Q8_0: e[b * NR + r], row r's scale for block b, as float32
};

// out[r][mb][i] = the float32 sum for x row 16 (p0 + mb) + i and the tile's row r, for K values of k
// (int8: before the per-row scale).
template <Kind KIND, int NR, int MB>
void panel_tile(const Panels& xp, int64_t p0, int64_t K, const WeightTile<NR>& w, float (*out)[MB][16]) {
  const int64_t n_blocks = K / 32, quads = K / 4;
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  // The float sums live in `out` (L1), updated once per block: in registers next to the NR x MB int32
  // accumulators they leave the compiler too few and it spills inside the product loop.
  for (int r = 0; r < NR; r++)
    for (int mb = 0; mb < MB; mb++) _mm512_store_ps(out[r][mb], _mm512_setzero_ps());
  for (int64_t b = 0; b < n_blocks; b++) {
    __m512i acc[NR][MB];
    for (int mb = 0; mb < MB; mb++) {
      const __m512i start = _mm512_load_si512(xp.start[(p0 + mb) * n_blocks + b].v);
      for (int r = 0; r < NR; r++) acc[r][mb] = start;
    }
#pragma GCC unroll 8
    for (int j = 0; j < 8; j++) {
      __m512i xv[MB];
      for (int mb = 0; mb < MB; mb++) {
        xv[mb] = _mm512_load_si512(xp.q[(p0 + mb) * quads + 8 * b + j].v);
        // In a register, loaded once for the NR rows: left to itself the compiler folds the load into
        // each vpdpbusd, and the loads (not the products) then set the pace.
        asm("" : "+v"(xv[mb]));
      }
      for (int r = 0; r < NR; r++) {
        int32_t quad;
        std::memcpy(&quad, w.row[r] + 32 * b + 4 * j, 4);
        const __m512i wv = _mm512_xor_si512(_mm512_set1_epi32(quad), flip);  // q + 128 as u8
        for (int mb = 0; mb < MB; mb++) acc[r][mb] = _mm512_dpbusd_epi32(acc[r][mb], wv, xv[mb]);
      }
    }
    if (b % 2 == 0)  // the next tile's rows, as int8_tile does
      for (int r = 0; r < NR; r++)
        _mm_prefetch(reinterpret_cast<const char*>(w.row[r] + NR * w.ldw + 32 * b), _MM_HINT_T0);
    // d[m, b] per lane, times (Q8_0) the weight row's scale for the block, the same in every lane
    for (int r = 0; r < NR; r++)
      for (int mb = 0; mb < MB; mb++) {
        const __m512 d = _mm512_load_ps(xp.d[(p0 + mb) * n_blocks + b].v);
        const __m512 scale = KIND == Kind::INT8 ? d : _mm512_mul_ps(d, _mm512_set1_ps(w.e[b * NR + r]));
        _mm512_store_ps(out[r][mb], _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][mb]), scale, _mm512_load_ps(out[r][mb])));
      }
  }
}

// Tile shape, weight rows NR x panels MB (measured on Zen 5, one thread, K = 2048 and 8192): 8 x 2
// (16 int32 accumulators) was fastest; 4 x 2 and 4 x 3 were slower by 10-30%, 8 x 3 spills, and
// 16 x 1 (16 weight rows read as 16 streams) was twice as slow at K = 8192.
constexpr int INT8_NR = 8, INT8_MB = 2;

// y[m, n0 + r] for every m < M and r < rows (<= NR): the tile against every panel, MB at a time.
// scale(r): the per-row scale (int8), else 1.
template <Kind KIND, int NR, int MB, typename Scale>
void panel_rows(const Panels& xp, int64_t M, int64_t K, const WeightTile<NR>& w, int rows, Scale scale, bf16* y,
                int64_t N) {
  static_assert(MB == 1 || MB == 2);
  const int64_t P = (M + 15) / 16;
  for (int64_t p = 0; p < P;) {
    const int64_t mb = P - p < MB ? P - p : MB;
    alignas(64) float out[NR][MB][16];
    if (mb == MB) panel_tile<KIND, NR, MB>(xp, p, K, w, out);
    else panel_tile<KIND, NR, 1>(xp, p, K, w, reinterpret_cast<float(*)[1][16]>(out[0][0]));
    const float(*o)[16] = reinterpret_cast<const float(*)[16]>(out[0][0]);  // o[r * mb + t]
    for (int r = 0; r < rows; r++) {
      const float s = scale(r);
      for (int64_t t = 0; t < mb; t++)
        for (int i = 0; i < 16 && 16 * (p + t) + i < M; i++)
          y[(16 * (p + t) + i) * N + r] = float_to_bf16(o[r * mb + t][i] * s);
    }
    p += mb;
  }
}


template <Kind KIND>
void int8_panels(const bf16* x, int64_t M, int64_t K, const int8_t* q, int64_t ldw, int64_t N, const void* scales,
                 bool scales_bf16, const uint16_t* e, bf16* y) {
  const Panels xp = quantize_panels(x, M, K);
  const int64_t n_blocks = K / 32;
  at::parallel_for(0, (N + INT8_NR - 1) / INT8_NR, grain_for(INT8_NR * K), [&](int64_t begin, int64_t end) {
    std::vector<float> es(KIND == Kind::Q8_0 ? n_blocks * INT8_NR : 0);  // the tile's e as float32, once
    for (int64_t t = begin; t < end; t++) {
      const int64_t n0 = t * INT8_NR;
      const int rows = N - n0 < INT8_NR ? int(N - n0) : INT8_NR;
      WeightTile<INT8_NR> w{};
      w.ldw = ldw, w.e = es.data();
      for (int r = 0; r < INT8_NR; r++) {
        const int64_t n = n0 + (r < rows ? r : rows - 1);  // a short last tile repeats its last row
        w.row[r] = q + n * ldw;
        if (KIND == Kind::Q8_0)
          for (int64_t b = 0; b < n_blocks; b++) es[b * INT8_NR + r] = _cvtsh_ss(e[n * n_blocks + b]);
      }
      if (KIND == Kind::Q8_0)
        panel_rows<KIND, INT8_NR, INT8_MB>(xp, M, K, w, rows, [](int) { return 1.f; }, y + n0, N);
      else
        panel_rows<KIND, INT8_NR, INT8_MB>(
            xp, M, K, w, rows, [&](int r) { return load_scale(scales, scales_bf16, n0 + r); }, y + n0, N);
    }
  });
}

}  // namespace

void gemv_int8_q8a(const bf16* x, int64_t M, int64_t K, const int8_t* q, int64_t ldw, int64_t N, const void* scales,
                   bool scales_bf16, bf16* y) {
  if (M >= INT8_PANEL_MIN_ROWS && K % 32 == 0)  // (the panels take whole blocks of 32)
    return int8_panels<Kind::INT8>(x, M, K, q, ldw, N, scales, scales_bf16, nullptr, y);
  if (M == 1) return int8_q8a<false, 1>(x, M, K, q, ldw, N, scales, scales_bf16, nullptr, y);
  int8_q8a<false, NR>(x, M, K, q, ldw, N, scales, scales_bf16, nullptr, y);
}

void gemv_q8_0_q8a(const bf16* x, int64_t M, int64_t K, const int8_t* q, int64_t ldw, int64_t N, const uint16_t* e,
                   bf16* y) {
  if (M >= INT8_PANEL_MIN_ROWS) return int8_panels<Kind::Q8_0>(x, M, K, q, ldw, N, nullptr, false, e, y);
  if (M == 1) return int8_q8a<true, 1>(x, M, K, q, ldw, N, nullptr, false, e, y);
  int8_q8a<true, NR>(x, M, K, q, ldw, N, nullptr, false, e, y);
}

void gemv_int4_q8a(const bf16* x, int64_t M, int64_t K, const uint8_t* packed, int64_t N, int64_t G, bf16* y) {
  const Int4Rows xr = quantize_int4_rows(x, M, K, G);
  parallel_chunks((N + 15) / 16, chunk_for(8 * K), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b++)
      for (int64_t m = 0; m < M; m += 4) {  // the block's records come from the cache after the first 4 rows
        switch (M - m >= 4 ? 4 : M - m) {
          case 1: int4_tile<1>(xr, m, K, packed, G, b, y, N); break;
          case 2: int4_tile<2>(xr, m, K, packed, G, b, y, N); break;
          case 3: int4_tile<3>(xr, m, K, packed, G, b, y, N); break;
          default: int4_tile<4>(xr, m, K, packed, G, b, y, N); break;
        }
      }
  });
}

#else  // generic: the same arithmetic in plain loops

namespace {

// sum_b d[m, b] * scale(b) * sum_{k in b} xq[m, k] * w(k), the int8 kernels' sum for one (m, n).
template <typename Scale>
float int8_sum(const Chunk* xc, int64_t K, const int8_t* q, Scale scale) {
  float acc = 0.f;
  for (int64_t b = 0; 32 * b < K; b++) {
    const Chunk& ch = xc[b / 2];
    int32_t dot = 0;
    for (int64_t i = 0; i < 32 && 32 * b + i < K; i++) dot += int32_t(ch.q[32 * (b % 2) + i]) * q[32 * b + i];
    acc += float(dot) * ch.d[8 * (b % 2)] * scale(b);
  }
  return acc;
}

}  // namespace

void gemv_int8_q8a(const bf16* x, int64_t M, int64_t K, const int8_t* q, int64_t ldw, int64_t N, const void* scales,
                   bool scales_bf16, bf16* y) {
  const int64_t C = (K + 63) / 64;
  const std::vector<Chunk> xc = quantize_chunks(x, M, K);
  at::parallel_for(0, N, grain_for(K), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; n++)
      for (int64_t m = 0; m < M; m++)
        y[m * N + n] = float_to_bf16(int8_sum(xc.data() + m * C, K, q + n * ldw, [](int64_t) { return 1.f; }) *
                                     load_scale(scales, scales_bf16, n));
  });
}

void gemv_q8_0_q8a(const bf16* x, int64_t M, int64_t K, const int8_t* q, int64_t ldw, int64_t N, const uint16_t* e,
                   bf16* y) {
  const int64_t C = (K + 63) / 64, ldd = K / 32;
  const std::vector<Chunk> xc = quantize_chunks(x, M, K);
  at::parallel_for(0, N, grain_for(K), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; n++)
      for (int64_t m = 0; m < M; m++)
        y[m * N + n] = float_to_bf16(
            int8_sum(xc.data() + m * C, K, q + n * ldw, [&](int64_t b) { return fp16_to_float(e[n * ldd + b]); }));
  });
}

void gemv_int4_q8a(const bf16* x, int64_t M, int64_t K, const uint8_t* packed, int64_t N, int64_t G, bf16* y) {
  const Int4Rows xr = quantize_int4_rows(x, M, K, G);
  const int64_t n_groups = K / G, n_blocks = K / 32, rec_bytes = 64 + 8 * G;
  at::parallel_for(0, N, grain_for(K / 2), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; n++) {
      const int64_t b = n / 16, i = n % 16;
      for (int64_t m = 0; m < M; m++) {
        float acc = 0.f;
        for (int64_t g = 0; g < n_groups; g++) {
          const uint8_t* rec = packed + (b * n_groups + g) * rec_bytes;
          bf16 sz[2];
          std::memcpy(sz, rec + 4 * i, 4);
          float gsum = 0.f;
          for (int64_t blk = g * G / 32; blk < (g + 1) * G / 32; blk++) {
            int32_t dot = xr.bias[m * n_blocks + blk];
            for (int64_t k = 32 * blk; k < 32 * blk + 32; k++) {
              const int64_t j = (k - g * G) / 4, t = k % 4;  // quad j, byte 2i + t % 2, nibble t / 2
              const uint8_t byte = rec[64 + 32 * j + 2 * i + t % 2];
              dot += int32_t(t < 2 ? byte & 15 : byte >> 4) * xr.q[m * K + k];
            }
            gsum += float(dot) * xr.d[m * n_blocks + blk];
          }
          acc += bf16_to_float(sz[0]) * gsum + bf16_to_float(sz[1]) * xr.xsum[m * n_groups + g];
        }
        y[m * N + n] = float_to_bf16(acc);
      }
    }
  });
}

#endif

}  // namespace llama_kernels
