// y = x @ w.T with bfloat16 x (M, K), w (N, K), float32 accumulation, bfloat16 y (M, N).
//
// PyTorch it mirrors:   y = F.linear(x, w)          (torch's bf16 GEMM also sums in float32)
//
// Each output y[m, n] is a dot product of two contiguous rows, x[m, :] and w[n, :] (the layout of
// nn.Linear's weight, used as it is: no copy). The AVX-512 kernel walks K in chunks of 32 values
// (one 64-byte register of each row); vdpbf16ps multiplies the 32 pairs and adds neighbours into
// 16 float32 partial sums, which are summed across lanes once at the end of the row.
// A tile of NR weight rows x MR activation rows is computed together, in one pass over K: each w
// chunk is loaded once for all MR rows of x, each x chunk once for the NR rows of w, and the
// MR x NR partial sums stay in registers. Up to 6 rows of x (decoding one sequence, or a few) take
// tiles of one weight row: each thread then reads its rows of w as one sequential stream, which
// it prefetches far ahead (STREAM_PREFETCH_BYTES); tiles of 4 rows read four streams at once,
// whose prefetches cannot run past their row, and took 1.2-1.3x as long per decoding step. From 7
// rows the arithmetic outweighs the memory: 3 weight rows x up to 8 rows of x share one pass, so the
// weights stream from memory at an even pace while the multiplications run. (Two passes over a
// tile, 4 rows of x each, as this kernel once did, do not overlap the two: the first pass waits
// on memory, the second, from the L1 cache, on the multiplier.) For 2 rows of x and more, AMX
// tiles do the multiplications where the CPU has them (amx_block).
#include <vector>

#include "common.h"

namespace llama_kernels {

#ifdef LLAMA_KERNELS_AVX512

namespace {

// 32 bf16 values: a whole chunk, or a row's last, partial one (n < 32 values, zeros after).
inline __m512bh load32(const bf16* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline __m512bh load_part(const bf16* p, int64_t n) {
  return (__m512bh)_mm512_maskz_loadu_epi16(__mmask32((1ull << n) - 1), p);
}

// How far ahead of its reads a tile asks for each weight row, in bytes. One weight row: its rows
// are one stream (the next row follows in memory), prefetched far ahead. More rows: within the
// row, 16 cache lines ahead. (With 8 rows of x, a chunk of w carries 8x the arithmetic, so the
// loads the core has in flight cover too little of the weight stream to keep memory busy.)
template <int NR>
constexpr int64_t prefetch_bytes() {
  return NR == 1 ? STREAM_PREFETCH_BYTES : 1024;
}

// y[m, r] for m < MR, r < NR (rows of x and of w in the tile):  y[m, r] = sum_k x[m, k] * w[r, k]
template <int MR, int NR>
void tile(const bf16* x, int64_t K, const bf16* w, int64_t ldw, bf16* y, int64_t ldy) {
  static_assert(MR * NR + NR + 1 <= 32, "sums, w chunks and an x chunk must fit the 32 zmm registers");
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; m++)
    for (int r = 0; r < NR; r++) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[NR];
    for (int r = 0; r < NR; r++) {
      _mm_prefetch(reinterpret_cast<const char*>(w + r * ldw + k) + prefetch_bytes<NR>(), _MM_HINT_T0);
      wv[r] = load32(w + r * ldw + k);
    }
    for (int m = 0; m < MR; m++) {
      const __m512bh xv = load32(x + m * K + k);
      for (int r = 0; r < NR; r++) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);  // += x*w, pairwise
    }
  }
  if (k < K) {  // the last, partial chunk
    __m512bh wv[NR];
    for (int r = 0; r < NR; r++) wv[r] = load_part(w + r * ldw + k, K - k);
    for (int m = 0; m < MR; m++) {
      const __m512bh xv = load_part(x + m * K + k, K - k);
      for (int r = 0; r < NR; r++) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
    }
  }
  for (int m = 0; m < MR; m++)
    for (int r = 0; r < NR; r++) y[m * ldy + r] = float_to_bf16(_mm512_reduce_add_ps(acc[m][r]));
}

// Rows of x per pass over NR weight rows: as many as the registers hold (8 x 3 + 4 for 3 weight
// rows; one weight row is only used for up to 6 rows of x).
template <int NR>
constexpr int rows_per_pass() {
  return NR >= 4 ? 6 : 8;
}

// All M rows of x against NR rows of w, rows_per_pass<NR>() rows of x at a time.
template <int NR>
void rows(const bf16* x, int64_t M, int64_t K, const bf16* w, int64_t ldw, bf16* y, int64_t ldy) {
  constexpr int G = rows_per_pass<NR>();
  for (int64_t m = 0; m < M; m += G) {
    const bf16* xm = x + m * K;
    bf16* ym = y + m * ldy;
    switch (M - m >= G ? G : M - m) {
      case 1: tile<1, NR>(xm, K, w, ldw, ym, ldy); break;
      case 2: tile<2, NR>(xm, K, w, ldw, ym, ldy); break;
      case 3: tile<3, NR>(xm, K, w, ldw, ym, ldy); break;
      case 4: tile<4, NR>(xm, K, w, ldw, ym, ldy); break;
      case 5: tile<5, NR>(xm, K, w, ldw, ym, ldy); break;
      case 6: tile<6, NR>(xm, K, w, ldw, ym, ldy); break;
      case 7: tile<(G > 7 ? 7 : G), NR>(xm, K, w, ldw, ym, ldy); break;  // (only G = 8 gets here)
      default: tile<G, NR>(xm, K, w, ldw, ym, ldy); break;
    }
  }
}

// y = x @ w.T in tiles of NR weight rows, the tiles handed to the threads in chunks (parallel_chunks:
// in one run on a 2-core VM, decoding steps of Llama 3.2 1B took 2-5% less time than with one fixed
// range per thread).
template <int NR>
void all_tiles(const bf16* x, int64_t M, int64_t K, const bf16* w, int64_t ldw, int64_t N, bf16* y) {
  const int64_t n_tiles = (N + NR - 1) / NR;
  parallel_chunks(n_tiles, chunk_for(NR * K * 2), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; t++) {
      const int64_t n = t * NR;
      const bf16* wn = w + n * ldw;
      switch (N - n >= NR ? NR : N - n) {  // the last tile may have fewer rows
        case 1: rows<1>(x, M, K, wn, ldw, y + n, N); break;
        case 2: rows<(NR > 2 ? 2 : NR)>(x, M, K, wn, ldw, y + n, N); break;
        case 3: rows<(NR > 3 ? 3 : NR)>(x, M, K, wn, ldw, y + n, N); break;
        default: rows<NR>(x, M, K, wn, ldw, y + n, N); break;
      }
    }
  });
}

#ifdef LLAMA_KERNELS_AMX
// AMX version for 2..16 rows of x and K a multiple of 32. The 16 weight rows of a block are tile A
// as they lie in memory (16 rows x 32 values, the next 64 bytes of each row); x, repacked once per
// call into VNNI pairs (xv below), is tile B; C (16 weight rows x M) collects the dot products:
//     C[i][m] = sum_k w[n0 + i, k] * x[m, k]    i.e. y[:, n0 : n0+16].T
// tdpbf16ps takes long to finish, so consecutive K chunks go to four C tiles, added at the end.
void amx_block(const uint32_t* xv, int64_t M, int64_t K, const bf16* w, int64_t ldw, bf16* y, int64_t N) {
  // (the tile intrinsics are macros around asm statements: tile numbers must be literals)
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  int64_t k = 0;
  for (; k + 128 <= K; k += 128) {  // A: tiles 4, 6; B: tiles 5, 7; C: tiles 0-3
    _tile_loadd(4, w + k, ldw * 2);
    _tile_loadd(5, xv + k * 8, 64);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(6, w + k + 32, ldw * 2);
    _tile_loadd(7, xv + (k + 32) * 8, 64);
    _tile_dpbf16ps(1, 6, 7);
    _tile_loadd(4, w + k + 64, ldw * 2);
    _tile_loadd(5, xv + (k + 64) * 8, 64);
    _tile_dpbf16ps(2, 4, 5);
    _tile_loadd(6, w + k + 96, ldw * 2);
    _tile_loadd(7, xv + (k + 96) * 8, 64);
    _tile_dpbf16ps(3, 6, 7);
  }
  for (; k < K; k += 32) {
    _tile_loadd(4, w + k, ldw * 2);
    _tile_loadd(5, xv + k * 8, 64);
    _tile_dpbf16ps(0, 4, 5);
  }
  alignas(64) float c[4][16][16];  // C as (weight row, x row)
  _tile_stored(0, c[0], 64);
  _tile_stored(1, c[1], 64);
  _tile_stored(2, c[2], 64);
  _tile_stored(3, c[3], 64);
  store_transposed(c, 4, _mm512_set1_ps(1.f), M, 16, y, N);
}

// y = x @ w.T for K % 32 == 0: AMX for whole blocks of 16 weight rows (and 16 rows of x at a
// time), the vdpbf16ps tiles for the weight rows left at the end of N.
void amx_gemv(const bf16* x, int64_t M, int64_t K, const bf16* w, int64_t ldw, int64_t N, bf16* y) {
  const std::vector<uint32_t> xv = pack_pairs(x, M, K, K);
  TileConfig config;
  for (int t = 0; t < 8; t++) config.set(t, 16, 64);
  const int64_t n_blocks = N / 16;
  at::parallel_for(0, n_blocks, grain_for(16 * K * 2), [&](int64_t begin, int64_t end) {
    TileScope tiles(config);
    for (int64_t b = begin; b < end; b++)
      for (int64_t m = 0; m < M; m += 16)  // the block's weights come from the cache after the first
        amx_block(xv.data() + m * K / 2, M - m < 16 ? M - m : 16, K, w + b * 16 * ldw, ldw, y + m * N + b * 16, N);
  });
  for (int64_t n = n_blocks * 16; n < N; n++) rows<1>(x, M, K, w + n * ldw, ldw, y + n, N);
}
#endif

}  // namespace

void gemv_bf16(const bf16* x, int64_t M, int64_t K, const bf16* w, int64_t ldw, int64_t N, bf16* y) {
#ifdef LLAMA_KERNELS_AMX
  if (M >= AMX_MIN_ROWS && K % 32 == 0 && amx_usable()) {
    amx_gemv(x, M, K, w, ldw, N, y);
    return;
  }
#endif
  // From 7 rows of x: 3 weight rows per tile, so that 8 rows of x fit one pass (24 sums in
  // registers); fewer rows: one weight row, one sequential stream per thread (see the top).
  if (M >= 7)
    all_tiles<3>(x, M, K, w, ldw, N, y);
  else
    all_tiles<1>(x, M, K, w, ldw, N, y);
}

#else  // generic: plain loops

void gemv_bf16(const bf16* x, int64_t M, int64_t K, const bf16* w, int64_t ldw, int64_t N, bf16* y) {
  std::vector<float> xf(M * K);  // x.float()
  for (int64_t i = 0; i < M * K; i++) xf[i] = bf16_to_float(x[i]);
  at::parallel_for(0, N, grain_for(K * 2), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; n++) {
      for (int64_t m = 0; m < M; m++) {
        // y[m, n] = sum_k x[m, k] * w[n, k], in 16 partial sums: float addition is not associative,
        // so the compiler vectorises only sums that are written as separate lanes.
        float part[16] = {};
        int64_t k = 0;
        for (; k + 16 <= K; k += 16)
          for (int j = 0; j < 16; j++) part[j] += xf[m * K + k + j] * bf16_to_float(w[n * ldw + k + j]);
        float acc = 0.f;
        for (int j = 0; j < 16; j++) acc += part[j];
        for (; k < K; k++) acc += xf[m * K + k] * bf16_to_float(w[n * ldw + k]);
        y[m * N + n] = float_to_bf16(acc);
      }
    }
  });
}

#endif

}  // namespace llama_kernels
