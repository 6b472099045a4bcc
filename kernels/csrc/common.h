// Shared pieces of the matrix-vector kernels (gemv_bf16.cpp, gemv_int8.cpp, gemv_int4.cpp).
//
// All three compute y = x @ W.T for a few activation rows: x (M, K) bfloat16, W (N, K) in some
// storage format, y (M, N) bfloat16, with float32 accumulation. Decoding reads every weight once
// per token, so the kernels are written to stream W from memory once, at the memory's speed:
//   - threads split the N output rows into contiguous ranges (at::parallel_for, torch's intra-op
//     threads), so each thread reads its part of W front to back;
//   - a thread works on a block of weight rows at a time and uses each piece of W it loads for all
//     M rows of x; when M is more than one pass takes, the block is read again from L1/L2, not memory.
//
// Three builds of each kernel, chosen when compiling (-march=native) and, for AMX, at run time:
//   - AVX-512 with the bfloat16 dot-product instruction (vdpbf16ps: 32 bf16 x bf16 products summed
//     pairwise into 16 float32 lanes), used for one row of x;
//   - AMX tiles (below) for 2 rows and more, where vdpbf16ps would redo the weights' arithmetic
//     (the widening of int8 / int4 values included) once per row of x;
//   - generic plain loops for any other CPU (the compiler vectorises what it can).
//
// bfloat16 values travel as their raw 16 bits (uint16_t): the top half of a float32.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include <ATen/Parallel.h>

// LLAMA_KERNELS_GENERIC forces the generic build (the tests compare the two on an AVX-512 machine).
#if !defined(LLAMA_KERNELS_GENERIC) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512BF16__) && defined(__AVX512VBMI__)
#define LLAMA_KERNELS_AVX512 1
#include <immintrin.h>
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define LLAMA_KERNELS_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

// The operators' namespace, torch.ops.<LLAMA_KERNELS_NS>; a second build loaded into the same process
// (the generic one, in the tests) needs its own.
#ifndef LLAMA_KERNELS_NS
#define LLAMA_KERNELS_NS llama_kernels
#endif

namespace llama_kernels {

using bf16 = uint16_t;

// x.float() for one bf16 value: the 16 bits become the top half of a float32.
inline float bf16_to_float(bf16 h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// scales[n] of Int8Linear's per-row scales, float32 (is_bf16 false) or bfloat16, as a float.
inline float load_scale(const void* scales, bool is_bf16, int64_t n) {
  return is_bf16 ? bf16_to_float(static_cast<const bf16*>(scales)[n]) : static_cast<const float*>(scales)[n];
}

// y.to(torch.bfloat16) for one value: round to nearest, ties to even (c10::BFloat16's rounding).
// IEEE half precision (GGUF's block scales) to float, exactly.
inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
  uint32_t u;
  if (exponent == 0x1F) {
    u = sign | 0x7F800000u | (mantissa << 13);  // inf, NaN
  } else if (exponent != 0) {
    u = sign | ((exponent + 112) << 23) | (mantissa << 13);  // normal: rebias 15 -> 127
  } else if (mantissa == 0) {
    u = sign;  // zero
  } else {  // subnormal: mantissa * 2^-24, normalized
    int e = -1;
    uint32_t m = mantissa;
    do {
      e++;
      m <<= 1;
    } while (!(m & 0x400u));
    u = sign | uint32_t(112 - e) << 23 | ((m & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline bf16 float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16(u >> 16);
}

#ifdef LLAMA_KERNELS_AMX
// AMX (Advanced Matrix Extensions): eight "tile" registers of up to 16 rows x 64 bytes, and
// tdpbf16ps, which multiplies a tile A (rows x 32 bf16) by a tile B (16 rows of bf16 pairs) into a
// float32 tile C, for whole blocks at once:
//     C[i][j] += A[i][2p] * B[p][2j] + A[i][2p+1] * B[p][2j+1]   for p < 16
// i.e. C = A @ B' where B' (32 x cols) is B with each row's pairs unfolded into two rows ("VNNI"
// layout: B[p] holds rows 2p and 2p+1 of B', interleaved). One tdpbf16ps does the work of 16
// vdpbf16ps, so with several activation rows the weights' arithmetic no longer costs M times over.
// The tile shapes are set per thread by ldtilecfg (TileConfig) and released after each call, so
// that oneDNN, which checks the loaded configuration before using tiles, is not confused.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes per row of tile t
  uint8_t rows[16] = {};
  void set(int t, int n_rows, int bytes_per_row) { rows[t] = uint8_t(n_rows), colsb[t] = uint16_t(bytes_per_row); }
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads 64 bytes");

// Linux hands out the (8 KiB) tile state only on request, once per process; false if refused.
inline bool amx_usable() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  return ok;
}

// Loads a tile configuration for the current thread and releases the tiles on scope exit.
struct TileScope {
  explicit TileScope(const TileConfig& config) { _tile_loadconfig(&config); }
  ~TileScope() { _tile_release(); }
};

// x as B tiles for the bf16 and int8 AMX kernels, 16 rows of x and 32 values of k per tile, in
// VNNI pairs (one 32-bit word each):
//     xv[m / 16][k / 32][p][m % 16] = (x[m, k + 2p], x[m, k + 2p + 1])     p < 16
// zeros for the rows past M in the last group of 16. x rows are ldx values apart; K a multiple of 32.
// The tiles for rows 16c.. start at xv + c * K * 8.
inline std::vector<uint32_t> pack_pairs(const bf16* x, int64_t M, int64_t K, int64_t ldx) {
  std::vector<uint32_t> xv((M + 15) / 16 * K * 8, 0);
  for (int64_t m = 0; m < M; m++) {
    uint32_t* tiles = xv.data() + (m / 16) * K * 8 + m % 16;
    for (int64_t j = 0; j < K / 2; j++) std::memcpy(tiles + (j / 16) * 256 + (j % 16) * 16, x + m * ldx + 2 * j, 4);
  }
  return xv;
}

// The epilogue of the bf16 and int8 AMX kernels, whose C tiles hold weight rows down and x rows
// across (c[t][i][m], 16 x 16 float32, summed over the n_tiles tiles):
//     y[m, i] = bf16(scale[i] * sum_t c[t][i][m])   for m < M, i < rows
// One gather per x row reads a column of C as y's row.
inline void store_transposed(float (*c)[16][16], int n_tiles, __m512 scale, int64_t M, int64_t rows, bf16* y,
                             int64_t ldy) {
  for (int i = 0; i < 16; i++) {
    __m512 sum = _mm512_load_ps(c[0][i]);
    for (int t = 1; t < n_tiles; t++) sum = _mm512_add_ps(sum, _mm512_load_ps(c[t][i]));
    _mm512_store_ps(c[0][i], sum);
  }
  const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(16));  // offsets of c[0][i][0], i = 0..15
  const __mmask16 valid = rows >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << rows) - 1);
  for (int64_t m = 0; m < M; m++) {
    const __m512 v = _mm512_mul_ps(_mm512_i32gather_ps(_mm512_add_epi32(column, _mm512_set1_epi32(int(m))), c[0], 4),
                                   scale);
    _mm256_mask_storeu_epi16(y + m * ldy, valid, (__m256i)_mm512_cvtneps_pbh(v));
  }
}

// Activation rows from which the AMX kernels are used: for one row a tile is mostly padding and
// the vdpbf16ps kernels do less work. More than 16 rows are taken 16 at a time, each weight block
// once from memory for all of them.
constexpr int64_t AMX_MIN_ROWS = 2;
#endif

#ifdef LLAMA_KERNELS_AVX512
// exp(x) for 16 floats: x = (n + f) * ln 2 with n an integer and |f| <= 1/2; 2^f by its Taylor series
// to degree 7, times 2^n by vscalefps. Relative error ~1e-7 for x of a few units, growing with |x| to
// ~1e-5 near float32's limits (the rounding of x / ln 2). x below -100 gives 0 (exp(-100) is 4e-44,
// below float32's normal range): softmax's masked or negligible terms; x above 89 gives inf.
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

// Minimum number of work items per thread for parallel_for: about 64 KiB of weights, so that
// tiny layers (tests) do not pay for waking a thread and big ones always split across all threads.
inline int64_t grain_for(int64_t bytes_per_item) {
  int64_t g = (64 * 1024) / (bytes_per_item > 0 ? bytes_per_item : 1);
  return g > 0 ? g : 1;
}

// fn(begin, end) over [0, n) in chunks of `chunk` items, handed out in order to whichever of torch's
// threads is free (an atomic counter), rather than split into one fixed range per thread as
// at::parallel_for does. Decoding calls a hundred matrix products per token, each ending at a barrier:
// with fixed ranges, a thread that the machine pauses (an interrupt, another process, a virtual CPU
// that is not running) holds the others up by the whole pause; with chunks they take over its work.
// Each thread still reads runs of `chunk` consecutive items front to back. One chunk: no thread is woken.
template <typename F>
void parallel_chunks(int64_t n, int64_t chunk, const F& fn) {
  const int64_t n_chunks = (n + chunk - 1) / chunk;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n_chunks);
  if (threads <= 1) {
    if (n > 0) fn(int64_t(0), n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < n_chunks; c = next.fetch_add(1))
      fn(c * chunk, std::min(n, (c + 1) * chunk));
  });
}

// How far ahead of its reads a kernel that walks its weights as one sequential stream asks for them
// (a software prefetch into L1, one per 64-byte line read). The hardware prefetchers alone kept
// too few lines in flight: decoding steps of Llama 3.2 1B at batch 1, 2 threads of a Zen 5 VM, in
// one process, interleaved, took 0.77-0.83 (bf16), 0.79-0.81 (int8) and 0.80-0.87 (int4) of the time
// of the kernels before (bf16 and int8: four interleaved row streams per thread, prefetching 1 KiB
// or one tile ahead; int4: no prefetch); 4 and 16 KiB ahead were about as good as 8.
constexpr int64_t STREAM_PREFETCH_BYTES = 8192;

// Items per chunk for parallel_chunks: about 512 KiB of weights.
inline int64_t chunk_for(int64_t bytes_per_item) {
  int64_t c = (512 * 1024) / (bytes_per_item > 0 ? bytes_per_item : 1);
  return c > 0 ? c : 1;
}

// The kernels, on raw pointers; ops.cpp checks the tensors and calls them.
// x: (M, K) row-major; y: (M, N) row-major; W rows are ldw elements apart.
void gemv_bf16(const bf16* x, int64_t M, int64_t K, const bf16* w, int64_t ldw, int64_t N, bf16* y);
// scales: (N,) float32 (scales_bf16 false) or bfloat16 (true).
void gemv_int8(const bf16* x, int64_t M, int64_t K, const int8_t* w, int64_t ldw, int64_t N, const void* scales,
               bool scales_bf16, bf16* y);
void gemv_q8_0(const bf16* x, int64_t M, int64_t K, const int8_t* w, int64_t ldw, int64_t N, const uint16_t* d,
               bf16* y);
// Attention of one query per sequence over the KV cache (decode_attention.cpp): q (B, H, hd),
// k, v (B, Hkv, S, hd) with the given strides of their first three dims (hd contiguous), mask (B, S),
// out (B, H, hd) contiguous.
void decode_attention(const bf16* q, const int64_t* q_strides, const bf16* k, const int64_t* k_strides, const bf16* v,
                      const int64_t* v_strides, const bool* mask, int64_t B, int64_t H, int64_t Hkv, int64_t S,
                      int64_t hd, float scale, bf16* out);
// Int4Linear's buffers -> this file's blocked layout (see gemv_int4.cpp), and the kernel on it.
int64_t int4_packed_bytes(int64_t N, int64_t K, int64_t group_size);
void pack_int4(const uint8_t* weight, const bf16* scales_and_zeros, int64_t N, int64_t K, int64_t group_size,
               uint8_t* packed);
void gemv_int4(const bf16* x, int64_t M, int64_t K, const uint8_t* packed, int64_t N, int64_t group_size, bf16* y);

// The same products with the activations quantized to int8 per block of 32 (gemv_q8a.cpp).
bool has_vnni();
void gemv_int8_q8a(const bf16* x, int64_t M, int64_t K, const int8_t* w, int64_t ldw, int64_t N, const void* scales,
                   bool scales_bf16, bf16* y);
void gemv_q8_0_q8a(const bf16* x, int64_t M, int64_t K, const int8_t* w, int64_t ldw, int64_t N, const uint16_t* d,
                   bf16* y);
void gemv_int4_q8a(const bf16* x, int64_t M, int64_t K, const uint8_t* packed, int64_t N, int64_t group_size, bf16* y);

// RMSNorm of `rows` contiguous rows of D values, rotary embeddings in place, and SwiGLU's gating (elementwise.cpp):
// x (B, T, n, hd) with the given strides of its first three dims (hd contiguous), cos and sin
// (B, T, hd/2) contiguous float32.
void rms_norm(const bf16* x, const bf16* w, int64_t rows, int64_t D, float eps, bf16* y);
void rope_(bf16* x, const int64_t* strides, int64_t B, int64_t T, int64_t n, int64_t hd, const float* cos,
           const float* sin);
// silu(gate) * up for `rows` rows of F values, gate and up rows ld_gate and ld_up values apart, y contiguous.
void silu_mul(const bf16* gate, int64_t ld_gate, const bf16* up, int64_t ld_up, int64_t rows, int64_t F, bf16* y);

inline const char* isa() {
#if defined(LLAMA_KERNELS_AMX)
  return amx_usable() ? "avx512_bf16+amx" : "avx512_bf16";
#elif defined(LLAMA_KERNELS_AVX512)
  return "avx512_bf16";
#else
  return "generic";
#endif
}

}  // namespace llama_kernels
