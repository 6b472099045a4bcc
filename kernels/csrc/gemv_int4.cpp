// y = x @ W.T with W in Int4Linear's grouped int4 format (llama/quantize.py):
//     W[n, k] = (q[n, k] - 8) * s[g, n] + z[g, n],   g = k / G,  q in 0..15
// PyTorch it mirrors (Int4Linear.forward):   y = F.linear(x, module.dequantize(x.dtype))
// computed per group as
//     y[m, n] = sum_g  s[g, n] * sum_{k in g} x[m, k] * (q[n, k] - 8)  +  z[g, n] * X[m, g],
//     X[m, g] = sum_{k in g} x[m, k]
// in float32 and rounded once to bf16.
//
// Packed layout (pack_int4, made once when a layer is swapped; the module's own buffers stay as they
// are). Output rows are taken 16 at a time (a "block"; N is padded to a multiple of 16 with zero
// rows), so that one 512-bit register holds a float32 sum for each of the block's 16 rows and no
// sum has to be added up across lanes. For block b and group g, one record of 64 + 8G bytes:
//     64 bytes:  (s, z) as bf16 for the 16 rows: scales_and_zeros[g, 16b : 16b+16, :] copied
//     G/4 "quads" of 32 bytes, quad j covering k0 = g*G + 4j .. k0+3:
//         byte 2i+t (row i = 0..15, t = 0, 1) = q[16b+i, k0+t] | q[16b+i, k0+2+t] << 4
// The records of a block follow each other, and blocks follow blocks, so a thread reads one
// sequential stream.
//
// AVX-512 inner step, per quad: the 32 bytes are zero-extended to 16-bit words; the low nibbles
// become the bf16 values 128 + q by OR-ing in 0x4300 (bf16 128.0 has a unit last place, so its 7
// mantissa bits take q exactly), likewise the high nibbles. Word pairs (2i, 2i+1) hold row i's
// weights for k0, k0+1 (low) and k0+2, k0+3 (high), so vdpbf16ps against x[k0], x[k0+1]
// broadcast to every pair adds row i's two products into lane i. Per group, with
// T = sum x * (128 + q) accumulated that way:
//     sum x * (q - 8) * s + z * X = s * T + (z - 136 s) * X
// For 2 rows of x and more, the widened quads go through AMX tiles instead (amx_block).
#include <vector>

#include "common.h"

namespace llama_kernels {

namespace {

constexpr int BLOCK = 16;  // output rows per block: one float32 register

inline int64_t record_bytes(int64_t G) { return 64 + BLOCK * G / 2; }

}  // namespace

int64_t int4_packed_bytes(int64_t N, int64_t K, int64_t G) {
  return (N + BLOCK - 1) / BLOCK * (K / G) * record_bytes(G);
}

void pack_int4(const uint8_t* weight, const bf16* sz, int64_t N, int64_t K, int64_t G, uint8_t* packed) {
  const int64_t n_blocks = (N + BLOCK - 1) / BLOCK, n_groups = K / G;
  // q[n, k], unpack_nibbles: column 2j in the low nibble of byte j, 2j+1 in the high one.
  auto q = [&](int64_t n, int64_t k) -> uint8_t {
    if (n >= N) return 0;  // padding row
    const uint8_t byte = weight[n * (K / 2) + k / 2];
    return k % 2 ? byte >> 4 : byte & 15;
  };
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b++)
      for (int64_t g = 0; g < n_groups; g++) {
        uint8_t* rec = packed + (b * n_groups + g) * record_bytes(G);
        std::memset(rec, 0, 64);  // padding rows: s = z = 0
        const int64_t rows = N - b * BLOCK < BLOCK ? N - b * BLOCK : BLOCK;
        std::memcpy(rec, sz + (g * N + b * BLOCK) * 2, rows * 2 * sizeof(bf16));  // (s, z) pairs
        for (int64_t j = 0; j < G / 4; j++) {
          const int64_t k0 = g * G + 4 * j;
          for (int i = 0; i < BLOCK; i++)
            for (int t = 0; t < 2; t++)
              rec[64 + 32 * j + 2 * i + t] = q(b * BLOCK + i, k0 + t) | q(b * BLOCK + i, k0 + 2 + t) << 4;
        }
      }
  });
}

#ifdef LLAMA_KERNELS_AVX512

namespace {

// y[m, 16b : 16(b+NB)] for m < MB: blocks b..b+NB-1 (the last may have rows past N: not stored).
template <int MB, int NB>
void tile(const bf16* x, int64_t K, const float* xsum, const uint8_t* packed, int64_t G, int64_t b, bf16* y,
          int64_t N) {
  const int64_t n_groups = K / G, rec = record_bytes(G);
  const __m512i low_nibble = _mm512_set1_epi16(0x000F), bf16_128 = _mm512_set1_epi16(0x4300);
  const __m512i high_half = _mm512_set1_epi32(int(0xFFFF0000u));
  const __m512 c136 = _mm512_set1_ps(136.f);
  __m512 out[MB][NB];
  for (int m = 0; m < MB; m++)
    for (int nb = 0; nb < NB; nb++) out[m][nb] = _mm512_setzero_ps();
  for (int64_t g = 0; g < n_groups; g++) {
    const uint8_t* recs[NB];
    __m512 s[NB], c[NB];
    for (int nb = 0; nb < NB; nb++) {
      recs[nb] = packed + ((b + nb) * n_groups + g) * rec;
      const __m512i sz = _mm512_loadu_si512(recs[nb]);                 // 16 x (s, z) as bf16 pairs
      s[nb] = _mm512_castsi512_ps(_mm512_slli_epi32(sz, 16));          // s.float(): the low halves
      const __m512 z = _mm512_castsi512_ps(_mm512_and_si512(sz, high_half));  // z.float()
      c[nb] = _mm512_fnmadd_ps(c136, s[nb], z);                        // z - 136 s
    }
    // T for (m, nb), as two sums (low and high nibbles) so that more additions are in flight.
    __m512 t_lo[MB][NB], t_hi[MB][NB];
    for (int m = 0; m < MB; m++)
      for (int nb = 0; nb < NB; nb++) t_lo[m][nb] = t_hi[m][nb] = _mm512_setzero_ps();
    for (int64_t j = 0; j < G / 4; j++) {
      const int64_t k0 = g * G + 4 * j;
      for (int nb = 0; nb < NB; nb++) {
        const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(recs[nb] + 64 + 32 * j)));
        const __m512bh w_lo = (__m512bh)_mm512_ternarylogic_epi32(v, low_nibble, bf16_128, 0xEA);  // (v&15)|0x4300
        const __m512bh w_hi = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(v, 4), bf16_128);
        for (int m = 0; m < MB; m++) {
          int32_t x01, x23;  // (x[k0], x[k0+1]) and (x[k0+2], x[k0+3]) as one 32-bit pair each
          std::memcpy(&x01, x + m * K + k0, 4);
          std::memcpy(&x23, x + m * K + k0 + 2, 4);
          t_lo[m][nb] = _mm512_dpbf16_ps(t_lo[m][nb], w_lo, (__m512bh)_mm512_set1_epi32(x01));
          t_hi[m][nb] = _mm512_dpbf16_ps(t_hi[m][nb], w_hi, (__m512bh)_mm512_set1_epi32(x23));
        }
      }
    }
    for (int m = 0; m < MB; m++)
      for (int nb = 0; nb < NB; nb++) {
        const __m512 t = _mm512_add_ps(t_lo[m][nb], t_hi[m][nb]);
        out[m][nb] = _mm512_fmadd_ps(s[nb], t, out[m][nb]);                                  // + s T
        out[m][nb] = _mm512_fmadd_ps(c[nb], _mm512_set1_ps(xsum[m * n_groups + g]), out[m][nb]);  // + (z-136s) X
      }
  }
  for (int m = 0; m < MB; m++)
    for (int nb = 0; nb < NB; nb++) {
      const int64_t n = (b + nb) * BLOCK, left = N - n;
      const __m256i v = (__m256i)_mm512_cvtneps_pbh(out[m][nb]);  // 16 x bf16, round to nearest even
      if (left >= BLOCK) _mm256_storeu_si256((__m256i*)(y + m * N + n), v);
      else _mm256_mask_storeu_epi16(y + m * N + n, __mmask16((1u << left) - 1), v);
    }
}

// Blocks b..b+NB-1 for all M rows, MB rows at a time (MB chosen so the tile's sums fit the registers).
template <int NB>
void blocks(const bf16* x, int64_t M, int64_t K, const float* xsum, const uint8_t* packed, int64_t G, int64_t b,
            bf16* y, int64_t N) {
  const int64_t n_groups = K / G;
  for (int64_t m = 0; m < M;) {
    const int64_t left = M - m;
    const bf16* xm = x + m * K;
    const float* sm = xsum + m * n_groups;
    bf16* ym = y + m * N;
    if (left >= 4) { tile<4, NB>(xm, K, sm, packed, G, b, ym, N); m += 4; }
    else if (left >= 2) { tile<2, NB>(xm, K, sm, packed, G, b, ym, N); m += 2; }
    else { tile<1, NB>(xm, K, sm, packed, G, b, ym, N); m += 1; }
  }
}

#ifdef LLAMA_KERNELS_AMX
// AMX version for up to 16 rows of x at a time (the AMX tiles are explained in common.h; the
// results of the first M rows are stored), one block of 16 weight rows at a time. The widened
// quads are already in VNNI order: w_lo and w_hi of quad j are rows 2j and 2j+1 of tile B (pairs
// of k for each of the 16 weight rows), so 8 quads (32 values of k) are stored as one B tile. Tile
// A is x itself, M rows x 32 values. C (M x 16 weight rows) collects T of one group, which is
// then scaled as in tile<>:  out += s * T + (z - 136 s) * X.
void amx_block(const bf16* x, int64_t M, int64_t K, const float* xsum, const uint8_t* block, int64_t G, bf16* y,
               int64_t N, int64_t n0) {
  const int64_t n_groups = K / G, rec = record_bytes(G);
  const __m512i low_nibble = _mm512_set1_epi16(0x000F), bf16_128 = _mm512_set1_epi16(0x4300);
  const __m512i high_half = _mm512_set1_epi32(int(0xFFFF0000u));
  const __m512 c136 = _mm512_set1_ps(136.f);
  alignas(64) bf16 b[2][16][32];   // B tiles, alternating
  alignas(64) float c[2][16][16];  // C tiles as stored: (x row, weight row)
  alignas(64) float out[16][16] = {};
  const int64_t chunks = G / 32;     // B tiles (32 values of k) per group
  auto fill = [&](int64_t g, int64_t j, int p) {  // widen chunk j of group g into buffer p
    const uint8_t* quads = block + g * rec + 64 + 256 * j;
    for (int u = 0; u < 8; u++) {
      const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(quads + 32 * u)));
      _mm512_store_si512(b[p][2 * u], _mm512_ternarylogic_epi32(v, low_nibble, bf16_128, 0xEA));  // 128 + q
      _mm512_store_si512(b[p][2 * u + 1], _mm512_or_si512(_mm512_srli_epi16(v, 4), bf16_128));
    }
  };
  fill(0, 0, 0);
  for (int64_t g = 0; g < n_groups; g++) {
    const uint8_t* r = block + g * rec;
    // Consecutive chunks alternate between the buffers and between C tiles 0 and 1, so that one
    // chunk's tile work overlaps the next one's; with one chunk per group (G = 32) the groups alternate.
    int used = 0;  // bit t: C tile t holds part of this group
    for (int64_t j = 0; j < chunks; j++) {
      const int64_t chunk = g * chunks + j;
      const int p = chunk % 2;
      // As in gemv_int8.cpp: the next chunk is widened before this one's tiles are loaded.
      if (j + 1 < chunks) fill(g, j + 1, 1 - p);
      else if (g + 1 < n_groups) fill(g + 1, 0, 1 - p);
      const bf16* a = x + g * G + 32 * j;  // tile A: x[:, k : k+32], rows K apart
      if (p == 0) {  // (tile numbers must be literals: the intrinsics are asm macros)
        if (j < 2) _tile_zero(0);
        _tile_loadd(4, a, K * 2);
        _tile_loadd(6, b[0], 64);
        _tile_dpbf16ps(0, 4, 6);
      } else {
        if (j < 2) _tile_zero(1);
        _tile_loadd(5, a, K * 2);
        _tile_loadd(7, b[1], 64);
        _tile_dpbf16ps(1, 5, 7);
      }
      used |= 1 << p;
    }
    if (used & 1) _tile_stored(0, c[0], 64);
    if (used & 2) _tile_stored(1, c[1], 64);
    const __m512i sz = _mm512_loadu_si512(r);  // 16 x (s, z) as bf16 pairs
    const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(sz, 16));
    const __m512 cz = _mm512_fnmadd_ps(c136, s, _mm512_castsi512_ps(_mm512_and_si512(sz, high_half)));  // z - 136 s
    for (int64_t m = 0; m < M; m++) {
      const __m512 t = used == 3 ? _mm512_add_ps(_mm512_load_ps(c[0][m]), _mm512_load_ps(c[1][m]))
                                 : _mm512_load_ps(c[used == 2][m]);
      __m512 o = _mm512_fmadd_ps(s, t, _mm512_load_ps(out[m]));                         // + s T
      _mm512_store_ps(out[m], _mm512_fmadd_ps(cz, _mm512_set1_ps(xsum[m * n_groups + g]), o));  // + (z-136s) X
    }
  }
  const int64_t left = N - n0;
  for (int64_t m = 0; m < M; m++) {
    const __m256i v = (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(out[m]));
    if (left >= BLOCK) _mm256_storeu_si256((__m256i*)(y + m * N + n0), v);
    else _mm256_mask_storeu_epi16(y + m * N + n0, __mmask16((1u << left) - 1), v);
  }
}
#endif

}  // namespace

void gemv_int4(const bf16* x, int64_t M, int64_t K, const uint8_t* packed, int64_t N, int64_t G, bf16* y) {
  const int64_t n_groups = K / G, n_blocks = (N + BLOCK - 1) / BLOCK;
  std::vector<float> xsum(M * n_groups);  // X[m, g] = sum of x[m, k] over group g
  for (int64_t m = 0; m < M; m++)
    for (int64_t g = 0; g < n_groups; g++) {
      float part[32] = {};  // G is a multiple of 32: partial sums the compiler can vectorise
      for (int64_t k = g * G; k < (g + 1) * G; k += 32)
        for (int j = 0; j < 32; j++) part[j] += bf16_to_float(x[m * K + k + j]);
      float acc = 0.f;
      for (int j = 0; j < 32; j++) acc += part[j];
      xsum[m * n_groups + g] = acc;
    }
#ifdef LLAMA_KERNELS_AMX
  if (M >= AMX_MIN_ROWS && amx_usable()) {
    // Tile A holds 16 rows of x (all of them if M < 16); past 16, x is zero-padded to whole tiles.
    const int64_t tile_rows = M < 16 ? M : 16, Mp = (M + tile_rows - 1) / tile_rows * tile_rows;
    std::vector<bf16> padded;
    if (Mp != M) {
      padded.assign(Mp * K, 0);
      std::memcpy(padded.data(), x, M * K * sizeof(bf16));
    }
    const bf16* xt = Mp != M ? padded.data() : x;
    TileConfig config;  // A: x rows x 32 values; B: 16 pairs x 16 weight rows; C: x rows x 16 weight rows
    for (int t : {0, 1, 4, 5}) config.set(t, int(tile_rows), 64);
    for (int t : {6, 7}) config.set(t, 16, 64);
    at::parallel_for(0, n_blocks, grain_for(BLOCK * K / 2), [&](int64_t begin, int64_t end) {
      TileScope tiles(config);
      for (int64_t b = begin; b < end; b++)
        for (int64_t m = 0; m < M; m += tile_rows)  // the block's weights come from the cache after the first
          amx_block(xt + m * K, M - m < tile_rows ? M - m : tile_rows, K, xsum.data() + m * n_groups,
                    packed + b * n_groups * record_bytes(G), G, y + m * N, N, b * BLOCK);
    });
    return;
  }
#endif
  constexpr int NB = 2;  // blocks per tile
  const int64_t n_tiles = (n_blocks + NB - 1) / NB;
  at::parallel_for(0, n_tiles, grain_for(NB * BLOCK * K / 2), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; t++) {
      const int64_t b = t * NB;
      if (n_blocks - b >= NB) blocks<NB>(x, M, K, xsum.data(), packed, G, b, y, N);
      else blocks<1>(x, M, K, xsum.data(), packed, G, b, y, N);
    }
  });
}

#else  // generic: plain loops over the same layout

void gemv_int4(const bf16* x, int64_t M, int64_t K, const uint8_t* packed, int64_t N, int64_t G, bf16* y) {
  const int64_t n_groups = K / G, n_blocks = (N + BLOCK - 1) / BLOCK, rec = record_bytes(G);
  at::parallel_for(0, n_blocks, grain_for(BLOCK * K / 2), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b++)
      for (int64_t m = 0; m < M; m++) {
        float out[BLOCK] = {};
        for (int64_t g = 0; g < n_groups; g++) {
          const uint8_t* r = packed + (b * n_groups + g) * rec;
          float acc[BLOCK] = {}, xs = 0.f;  // acc[i] = sum_k x[m, k] * (q[n_i, k] - 8); xs = X[m, g]
          for (int64_t j = 0; j < G / 4; j++) {
            const int64_t k0 = g * G + 4 * j;
            float xv[4];
            for (int u = 0; u < 4; u++) xv[u] = bf16_to_float(x[m * K + k0 + u]);
            xs += xv[0] + xv[1] + xv[2] + xv[3];
            for (int i = 0; i < BLOCK; i++)
              for (int t = 0; t < 2; t++) {
                const uint8_t byte = r[64 + 32 * j + 2 * i + t];
                acc[i] += xv[t] * float((byte & 15) - 8) + xv[2 + t] * float((byte >> 4) - 8);
              }
          }
          for (int i = 0; i < BLOCK; i++) {
            bf16 sz[2];
            std::memcpy(sz, r + 4 * i, 4);
            out[i] += bf16_to_float(sz[0]) * acc[i] + bf16_to_float(sz[1]) * xs;  // s * acc + z * X
          }
        }
        for (int i = 0; i < BLOCK && b * BLOCK + i < N; i++) y[m * N + b * BLOCK + i] = float_to_bf16(out[i]);
      }
  });
}

#endif

}  // namespace llama_kernels
