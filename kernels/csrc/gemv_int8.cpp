// y = x @ (q * scales[:, None]).T with int8 q (N, K) and per-row scales (N,): Int8Linear's format.
//
// PyTorch it mirrors (llama/quantize.py, Int8Linear.forward):
//     y = F.linear(x, q.to(x.dtype) * scales[:, None])
// computed as   y[m, n] = scales[n] * sum_k x[m, k] * q[n, k]   in float32, rounded once to bf16.
// The activations stay bfloat16 (no activation quantization): every int8 value is widened to the
// bfloat16 with the same value, which is exact (|q| <= 127 needs 7 bits; bf16 carries 8), and the
// products are summed by vdpbf16ps as in gemv_bf16.cpp. q is read in place, row by row.
//
// Widening 64 int8 at once (AVX-512): bf16(q) = sign bit | bf16(|q|), and bf16(|q|) for |q| in
// 0..127 is looked up in two 128-entry byte tables (its low and high byte) with vpermt2b. The two
// bytes are interleaved into 16-bit words by vpunpck{l,h}bw, which works within 128-bit lanes: the
// first register gets values 0-7, 16-23, 32-39, 48-55 of the chunk, the second the rest. Since a
// dot product does not care about order, x is copied once per call into the same order (xp below).
// For 2 rows of x and more, the widened rows go through AMX tiles instead (amx_block).
// Note: -128 is not representable this way; quantize_int8 never produces it (kernels/native.py
// leaves a layer with a -128 on the PyTorch path).
//
// gemv_q8_0 below is the same product for GGUF's Q8_0 (llama/quantization/gguf.py, Int8BlockLinear):
// one fp16 scale d per block of 32 values of a row instead of one per row,
//     y[m, n] = sum_b d[n, b] * sum_{k in block b} x[m, k] * q[n, k]
// in float32, rounded once to bf16 (Int8BlockLinear.forward rounds the dequantized weights to bf16
// first: the kernel is the more exact of the two). Of a chunk of 64 values, the widened registers
// hold block 0 (values 0-31) in their words 0-15 and block 1 in words 16-31, so a chunk's two
// vdpbf16ps leave block 0's partial sums in float lanes 0-7 and block 1's in lanes 8-15: one
// multiply by (d0 x 8, d1 x 8) scales both blocks before they join the row's accumulator.
#include <vector>

#include "common.h"

namespace llama_kernels {

#ifdef LLAMA_KERNELS_AVX512

namespace {

constexpr int NR = 4;  // weight rows per tile

// Low and high bytes of bf16(a) for a = 0..127.
struct Tables {
  alignas(64) uint8_t lo[128];
  alignas(64) uint8_t hi[128];
  Tables() {
    for (int a = 0; a < 128; a++) {
      float f = float(a);
      uint32_t u;
      std::memcpy(&u, &f, sizeof u);  // exact: a has at most 7 significant bits
      lo[a] = uint8_t(u >> 16);
      hi[a] = uint8_t(u >> 24);
    }
  }
};
const Tables tables;

// Chunk position j (0..63) of xp holds x[k] for this k: the order vpunpck{l,h}bw leaves the
// widened weights in (see the top of the file).
inline int64_t chunk_source(int j) {
  const int half = j / 32, i = j % 32;  // register 0 or 1, word i of it
  return 16 * (i / 8) + 8 * half + i % 8;
}

// The bf16 values of q[0..n) (n <= 64 values of one row, zeros after) in two registers, in the
// order of chunk_source: *wa for chunk positions 0-31, *wb for 32-63.
struct Widen {
  const __m512i lo0 = _mm512_load_si512(tables.lo), lo1 = _mm512_load_si512(tables.lo + 64);
  const __m512i hi0 = _mm512_load_si512(tables.hi), hi1 = _mm512_load_si512(tables.hi + 64);
  const __m512i sign = _mm512_set1_epi8(char(0x80));
  inline void operator()(const int8_t* q, int64_t n, __m512i* wa, __m512i* wb) const {
    const __mmask64 mask = n >= 64 ? ~__mmask64(0) : (__mmask64(1) << n) - 1;
    const __m512i v = _mm512_maskz_loadu_epi8(mask, q);            // 64 x int8
    const __m512i a = _mm512_abs_epi8(v);                          // |q|, 0..127
    const __m512i lo = _mm512_permutex2var_epi8(lo0, a, lo1);      // low byte of bf16(|q|)
    const __m512i hi = _mm512_permutex2var_epi8(hi0, a, hi1);      // high byte of bf16(|q|)
    const __m512i hs = _mm512_ternarylogic_epi32(hi, v, sign, 0xF8);  // hi | (q & 0x80): the sign
    *wa = _mm512_unpacklo_epi8(lo, hs);  // bf16(q) for chunk values 0-7, 16-23, 32-39, 48-55
    *wb = _mm512_unpackhi_epi8(lo, hs);  // and for 8-15, 24-31, 40-47, 56-63
  }
};

// y[m, r] for m < MR, r < NR_:  y[m, r] = scales[r] * sum_k x[m, k] * q[r, k]
template <int MR, int NR_>
void tile(const bf16* xp, int64_t Kp, int64_t K, const int8_t* q, int64_t ldw, const void* scales, bool scales_bf16,
          bf16* y, int64_t ldy) {
  const Widen widen;
  __m512 acc[MR][NR_];
  for (int m = 0; m < MR; m++)
    for (int r = 0; r < NR_; r++) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < Kp; k += 64) {
    __m512i wa[NR_], wb[NR_];
    for (int r = 0; r < NR_; r++) {
      _mm_prefetch(reinterpret_cast<const char*>(q + (r + NR_) * ldw + k), _MM_HINT_T0);  // see gemv_q8a.cpp
      widen(q + r * ldw + k, K - k, &wa[r], &wb[r]);  // the last chunk: masked
    }
    for (int m = 0; m < MR; m++) {
      const __m512bh xa = (__m512bh)_mm512_loadu_si512(xp + m * Kp + k);  // x in the same order
      const __m512bh xb = (__m512bh)_mm512_loadu_si512(xp + m * Kp + k + 32);
      for (int r = 0; r < NR_; r++) {
        acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xa, (__m512bh)wa[r]);
        acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xb, (__m512bh)wb[r]);
      }
    }
  }
  for (int m = 0; m < MR; m++)
    for (int r = 0; r < NR_; r++)
      y[m * ldy + r] = float_to_bf16(_mm512_reduce_add_ps(acc[m][r]) * load_scale(scales, scales_bf16, r));
}

template <int NR_>
void rows(const bf16* xp, int64_t M, int64_t Kp, int64_t K, const int8_t* q, int64_t ldw, const void* scales,
          bool scales_bf16, bf16* y, int64_t ldy) {
  for (int64_t m = 0; m < M; m += 4) {
    const bf16* xm = xp + m * Kp;
    bf16* ym = y + m * ldy;
    switch (M - m >= 4 ? 4 : M - m) {
      case 1: tile<1, NR_>(xm, Kp, K, q, ldw, scales, scales_bf16, ym, ldy); break;
      case 2: tile<2, NR_>(xm, Kp, K, q, ldw, scales, scales_bf16, ym, ldy); break;
      case 3: tile<3, NR_>(xm, Kp, K, q, ldw, scales, scales_bf16, ym, ldy); break;
      default: tile<4, NR_>(xm, Kp, K, q, ldw, scales, scales_bf16, ym, ldy); break;
    }
  }
}

// Q8_0: y[m, r] = sum_b d[r, b] * sum_{k in block b} x[m, k] * q[r, k] for m < MR, r < NR_.
template <int MR, int NR_>
void q8_0_tile(const bf16* xp, int64_t Kp, int64_t K, const int8_t* q, int64_t ldw, const uint16_t* d, int64_t ldd,
               bf16* y, int64_t ldy) {
  const Widen widen;
  __m512 acc[MR][NR_];
  for (int m = 0; m < MR; m++)
    for (int r = 0; r < NR_; r++) acc[m][r] = _mm512_setzero_ps();
  const int64_t n_blocks = K / 32;
  const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  for (int64_t k = 0; k < Kp; k += 64) {
    __m512i wa[NR_], wb[NR_];
    __m512 scale[NR_];
    const int64_t b = k / 32;  // the chunk's first block; a last chunk of 32 values has no second
    for (int r = 0; r < NR_; r++) {
      _mm_prefetch(reinterpret_cast<const char*>(q + (r + NR_) * ldw + k), _MM_HINT_T0);  // the next tile's rows
      widen(q + r * ldw + k, K - k, &wa[r], &wb[r]);
      // d[b], d[b + 1] as floats (F16C), broadcast to lanes 0-7 and 8-15.
      uint32_t pair = d[r * ldd + b];
      if (b + 1 < n_blocks) pair |= uint32_t(d[r * ldd + b + 1]) << 16;
      const __m128 two = _mm_cvtph_ps(_mm_cvtsi32_si128(int(pair)));
      scale[r] = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(two));
    }
    for (int m = 0; m < MR; m++) {
      const __m512bh xa = (__m512bh)_mm512_loadu_si512(xp + m * Kp + k);
      const __m512bh xb = (__m512bh)_mm512_loadu_si512(xp + m * Kp + k + 32);
      for (int r = 0; r < NR_; r++) {
        __m512 part = _mm512_dpbf16_ps(_mm512_setzero_ps(), xa, (__m512bh)wa[r]);
        part = _mm512_dpbf16_ps(part, xb, (__m512bh)wb[r]);  // lanes 0-7: block b, 8-15: block b + 1
        acc[m][r] = _mm512_fmadd_ps(part, scale[r], acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MR; m++)
    for (int r = 0; r < NR_; r++) y[m * ldy + r] = float_to_bf16(_mm512_reduce_add_ps(acc[m][r]));
}

template <int NR_>
void q8_0_rows(const bf16* xp, int64_t M, int64_t Kp, int64_t K, const int8_t* q, int64_t ldw, const uint16_t* d,
               int64_t ldd, bf16* y, int64_t ldy) {
  for (int64_t m = 0; m < M; m += 4) {
    const bf16* xm = xp + m * Kp;
    bf16* ym = y + m * ldy;
    switch (M - m >= 4 ? 4 : M - m) {
      case 1: q8_0_tile<1, NR_>(xm, Kp, K, q, ldw, d, ldd, ym, ldy); break;
      case 2: q8_0_tile<2, NR_>(xm, Kp, K, q, ldw, d, ldd, ym, ldy); break;
      case 3: q8_0_tile<3, NR_>(xm, Kp, K, q, ldw, d, ldd, ym, ldy); break;
      default: q8_0_tile<4, NR_>(xm, Kp, K, q, ldw, d, ldd, ym, ldy); break;
    }
  }
}

#ifdef LLAMA_KERNELS_AMX
// AMX version for 2..16 rows of x (the AMX tiles are explained in common.h). Per chunk of 64
// values, the 16 weight rows of a block are widened as above and stored as the rows of two A
// tiles (chunk positions 0-31 and 32-63); x in the same order, repacked into VNNI pairs (xv), is
// tile B; C (16 weight rows x M) collects the dot products. Rows past N are zeros.
//     C[i][m] = sum_k q[n0 + i, k] * x[m, k],   y[m, n0 + i] = scales[n0 + i] * C[i][m]
void amx_block(const uint32_t* xv, int64_t Kp, int64_t K, const int8_t* q, int64_t ldw, int64_t rows,
               const void* scales, bool scales_bf16, int64_t M, bf16* y, int64_t N) {
  const Widen widen;
  alignas(64) bf16 a[2][2][16][32];  // A tiles: [chunk parity][positions 0-31 / 32-63][weight row][32 values]
  if (rows < 16) std::memset(a, 0, sizeof a);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  auto fill = [&](int64_t k, int p) {  // widen the chunk at k into buffer p
    for (int64_t r = 0; r < rows; r++) {
      __m512i wa, wb;
      widen(q + r * ldw + k, K - k, &wa, &wb);
      _mm512_store_si512(a[p][0][r], wa);
      _mm512_store_si512(a[p][1][r], wb);
    }
  };
  fill(0, 0);
  for (int64_t k = 0; k < Kp; k += 64) {
    // Buffers and C tiles alternate, and the next chunk is widened before this one's tiles are
    // loaded, so that the stores have landed in the cache by the time the tile loads read them.
    const int p = (k / 64) % 2;
    if (k + 64 < Kp) fill(k + 64, 1 - p);
    const uint32_t* b = xv + k * 8;  // the two B tiles of this chunk, 256 pairs each
    if (p == 0) {  // (tile numbers must be literals: the intrinsics are asm macros)
      _tile_loadd(4, a[0][0], 64);
      _tile_loadd(5, b, 64);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(6, a[0][1], 64);
      _tile_loadd(7, b + 256, 64);
      _tile_dpbf16ps(1, 6, 7);
    } else {
      _tile_loadd(4, a[1][0], 64);
      _tile_loadd(5, b, 64);
      _tile_dpbf16ps(2, 4, 5);
      _tile_loadd(6, a[1][1], 64);
      _tile_loadd(7, b + 256, 64);
      _tile_dpbf16ps(3, 6, 7);
    }
  }
  alignas(64) float c[4][16][16];  // C as (weight row, x row)
  _tile_stored(0, c[0], 64);
  _tile_stored(1, c[1], 64);
  _tile_stored(2, c[2], 64);
  _tile_stored(3, c[3], 64);
  alignas(64) float scale[16] = {};
  for (int64_t i = 0; i < rows; i++) scale[i] = load_scale(scales, scales_bf16, i);
  store_transposed(c, 4, _mm512_load_ps(scale), M, rows, y, N);
}

void amx_gemv(const bf16* xp, int64_t M, int64_t Kp, int64_t K, const int8_t* q, int64_t ldw, int64_t N,
              const void* scales, bool scales_bf16, bf16* y) {
  const std::vector<uint32_t> xv = pack_pairs(xp, M, Kp, Kp);  // x, reordered, as B tiles
  TileConfig config;
  for (int t = 0; t < 8; t++) config.set(t, 16, 64);
  const int64_t n_blocks = (N + 15) / 16, scale_bytes = scales_bf16 ? 2 : 4;
  at::parallel_for(0, n_blocks, grain_for(16 * K), [&](int64_t begin, int64_t end) {
    TileScope tiles(config);
    for (int64_t b = begin; b < end; b++) {
      const int64_t n = b * 16;
      for (int64_t m = 0; m < M; m += 16)  // the block's weights come from the cache after the first
        amx_block(xv.data() + m * Kp / 2, Kp, K, q + n * ldw, ldw, N - n < 16 ? N - n : 16,
                  static_cast<const uint8_t*>(scales) + n * scale_bytes, scales_bf16, M - m < 16 ? M - m : 16,
                  y + m * N + n, N);
    }
  });
}
#endif

}  // namespace

namespace {

// x with each chunk of 64 reordered like the widened weights, zero-padded to Kp = K rounded up to 64.
std::vector<bf16> reorder_x(const bf16* x, int64_t M, int64_t K, int64_t Kp) {
  std::vector<bf16> xp(M * Kp, 0);
  for (int64_t m = 0; m < M; m++)
    for (int64_t k = 0; k < K; k += 64)
      for (int j = 0; j < 64; j += 8) {  // chunk_source moves runs of 8 values
        const int64_t src = k + chunk_source(j), n = K - src < 8 ? K - src : 8;
        if (n > 0) std::memcpy(&xp[m * Kp + k + j], x + m * K + src, n * sizeof(bf16));
      }
  return xp;
}

}  // namespace

void gemv_q8_0(const bf16* x, int64_t M, int64_t K, const int8_t* q, int64_t ldw, int64_t N, const uint16_t* d,
               bf16* y) {
  const int64_t Kp = (K + 63) / 64 * 64, ldd = K / 32;
  const std::vector<bf16> xp = reorder_x(x, M, K, Kp);
  const int64_t n_tiles = (N + NR - 1) / NR;
  at::parallel_for(0, n_tiles, grain_for(NR * K), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; t++) {
      const int64_t n = t * NR;
      const int8_t* qn = q + n * ldw;
      const uint16_t* dn = d + n * ldd;
      switch (N - n >= NR ? NR : N - n) {
        case 1: q8_0_rows<1>(xp.data(), M, Kp, K, qn, ldw, dn, ldd, y + n, N); break;
        case 2: q8_0_rows<2>(xp.data(), M, Kp, K, qn, ldw, dn, ldd, y + n, N); break;
        case 3: q8_0_rows<3>(xp.data(), M, Kp, K, qn, ldw, dn, ldd, y + n, N); break;
        default: q8_0_rows<NR>(xp.data(), M, Kp, K, qn, ldw, dn, ldd, y + n, N); break;
      }
    }
  });
}

void gemv_int8(const bf16* x, int64_t M, int64_t K, const int8_t* q, int64_t ldw, int64_t N, const void* scales,
               bool scales_bf16, bf16* y) {
  const int64_t Kp = (K + 63) / 64 * 64;
  const std::vector<bf16> xp = reorder_x(x, M, K, Kp);
#ifdef LLAMA_KERNELS_AMX
  if (M >= AMX_MIN_ROWS && amx_usable()) {
    amx_gemv(xp.data(), M, Kp, K, q, ldw, N, scales, scales_bf16, y);
    return;
  }
#endif
  const int64_t n_tiles = (N + NR - 1) / NR;
  const uint8_t* s8 = static_cast<const uint8_t*>(scales);
  const int64_t scale_bytes = scales_bf16 ? 2 : 4;
  at::parallel_for(0, n_tiles, grain_for(NR * K), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; t++) {
      const int64_t n = t * NR;
      const int8_t* qn = q + n * ldw;
      const void* sn = s8 + n * scale_bytes;
      switch (N - n >= NR ? NR : N - n) {
        case 1: rows<1>(xp.data(), M, Kp, K, qn, ldw, sn, scales_bf16, y + n, N); break;
        case 2: rows<2>(xp.data(), M, Kp, K, qn, ldw, sn, scales_bf16, y + n, N); break;
        case 3: rows<3>(xp.data(), M, Kp, K, qn, ldw, sn, scales_bf16, y + n, N); break;
        default: rows<NR>(xp.data(), M, Kp, K, qn, ldw, sn, scales_bf16, y + n, N); break;
      }
    }
  });
}

#else  // generic: plain loops

void gemv_int8(const bf16* x, int64_t M, int64_t K, const int8_t* q, int64_t ldw, int64_t N, const void* scales,
               bool scales_bf16, bf16* y) {
  std::vector<float> xf(M * K);  // x.float()
  for (int64_t i = 0; i < M * K; i++) xf[i] = bf16_to_float(x[i]);
  at::parallel_for(0, N, grain_for(K), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; n++) {
      for (int64_t m = 0; m < M; m++) {
        float part[16] = {};  // sum_k x[m, k] * q[n, k] in 16 partial sums (see gemv_bf16.cpp)
        int64_t k = 0;
        for (; k + 16 <= K; k += 16)
          for (int j = 0; j < 16; j++) part[j] += xf[m * K + k + j] * float(q[n * ldw + k + j]);
        float acc = 0.f;
        for (int j = 0; j < 16; j++) acc += part[j];
        for (; k < K; k++) acc += xf[m * K + k] * float(q[n * ldw + k]);
        y[m * N + n] = float_to_bf16(acc * load_scale(scales, scales_bf16, n));
      }
    }
  });
}

void gemv_q8_0(const bf16* x, int64_t M, int64_t K, const int8_t* q, int64_t ldw, int64_t N, const uint16_t* d,
               bf16* y) {
  std::vector<float> xf(M * K);  // x.float()
  for (int64_t i = 0; i < M * K; i++) xf[i] = bf16_to_float(x[i]);
  const int64_t ldd = K / 32;
  at::parallel_for(0, N, grain_for(K), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; n++) {
      for (int64_t m = 0; m < M; m++) {
        float acc = 0.f;
        for (int64_t b = 0; b < K / 32; b++) {
          float part = 0.f;  // sum over the block, then its scale
          for (int64_t j = 0; j < 32; j++) part += xf[m * K + b * 32 + j] * float(q[n * ldw + b * 32 + j]);
          acc += part * fp16_to_float(d[n * ldd + b]);
        }
        y[m * N + n] = float_to_bf16(acc);
      }
    }
  });
}

#endif

}  // namespace llama_kernels
