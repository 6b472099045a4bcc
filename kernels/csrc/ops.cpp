// The kernels as PyTorch operators, torch.ops.llama_kernels.* (LLAMA_KERNELS_NS in common.h):
// checks the tensors, allocates the output and calls the raw-pointer kernels of gemv_*.cpp. Shapes
// and formats are documented in kernels/native.py, which also registers the operators' fake
// (shape-only) versions for torch.compile.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common.h"

namespace llama_kernels {
namespace {

const bf16* bf16_ptr(const at::Tensor& t) { return reinterpret_cast<const bf16*>(t.data_ptr<at::BFloat16>()); }

// x: (..., K) bfloat16 on the CPU, as (M, K) rows, made contiguous. The leading dimensions are
// flattened here rather than by the caller, whose reshape and view would each cost a dispatch from
// Python on every call (a decoding step makes about 65).
at::Tensor check_x(const at::Tensor& x, int64_t K, const char* op) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() >= 1,
              op, ": x must be a bfloat16 CPU tensor of at least 1 dimension, got ", x.scalar_type(), " ", x.sizes(),
              " on ", x.device());
  TORCH_CHECK_VALUE(x.size(-1) == K, op, ": x has ", x.size(-1), " columns, the weight expects ", K);
  return (x.dim() == 1 ? x.unsqueeze(0) : x.flatten(0, -2)).contiguous();  // (M, K), also when M or K is 0
}

// y (M, N) as x's leading dimensions followed by N: (..., N).
at::Tensor like_x(const at::Tensor& y, const at::Tensor& x) {
  if (x.dim() == 2) return y;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = y.size(1);
  return y.view(shape);
}

// Rows of w must be contiguous; a row stride larger than K (a slice of a bigger matrix) is fine.
at::Tensor check_w(const at::Tensor& w, at::ScalarType dtype, const char* op) {
  TORCH_CHECK_VALUE(w.device().is_cpu() && w.scalar_type() == dtype && w.dim() == 2,
              op, ": weight must be a 2-D ", dtype, " CPU tensor, got ", w.scalar_type(), " ", w.sizes());
  return w.stride(1) == 1 && w.stride(0) >= w.size(1) ? w : w.contiguous();
}

at::Tensor gemv_bf16_op(const at::Tensor& x_, const at::Tensor& w_) {
  const at::Tensor w = check_w(w_, at::kBFloat16, "gemv_bf16");
  const at::Tensor x = check_x(x_, w.size(1), "gemv_bf16");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M > 0 && N > 0)
    gemv_bf16(bf16_ptr(x), M, K, bf16_ptr(w), w.stride(0), N, reinterpret_cast<bf16*>(y.data_ptr<at::BFloat16>()));
  return like_x(y, x_);
}

// Q8A: the kernel that quantizes the activations (gemv_q8a.cpp), else the one that widens the weights.
template <bool Q8A>
at::Tensor gemv_int8_op(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& scales_) {
  const at::Tensor w = check_w(w_, at::kChar, "gemv_int8");
  const at::Tensor x = check_x(x_, w.size(1), "gemv_int8");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK_VALUE(scales_.dim() == 1 && scales_.size(0) == N && scales_.device().is_cpu() &&
                  (scales_.scalar_type() == at::kFloat || scales_.scalar_type() == at::kBFloat16),
              "gemv_int8: scales must be a (", N, ",) float32 or bfloat16 CPU tensor, got ", scales_.scalar_type(), " ",
              scales_.sizes());
  const at::Tensor scales = scales_.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  if (M > 0 && N > 0)
    (Q8A ? gemv_int8_q8a : gemv_int8)(bf16_ptr(x), M, K, w.data_ptr<int8_t>(), w.stride(0), N, scales.data_ptr(),
                                      scales.scalar_type() == at::kBFloat16,
                                      reinterpret_cast<bf16*>(y.data_ptr<at::BFloat16>()));
  return like_x(y, x_);
}

template <bool Q8A>
at::Tensor gemv_q8_0_op(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& d_) {
  const at::Tensor w = check_w(w_, at::kChar, "gemv_q8_0");
  const at::Tensor x = check_x(x_, w.size(1), "gemv_q8_0");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK_VALUE(K % 32 == 0, "gemv_q8_0: in_features ", K, " is not a multiple of the block size 32");
  TORCH_CHECK_VALUE(d_.dim() == 2 && d_.size(0) == N && d_.size(1) == K / 32 && d_.device().is_cpu() &&
                  d_.scalar_type() == at::kHalf,
              "gemv_q8_0: scales must be a (", N, ", ", K / 32, ") float16 CPU tensor, got ", d_.scalar_type(), " ",
              d_.sizes());
  const at::Tensor d = d_.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  if (M > 0 && N > 0)
    (Q8A ? gemv_q8_0_q8a : gemv_q8_0)(bf16_ptr(x), M, K, w.data_ptr<int8_t>(), w.stride(0), N,
                                      reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>()),
                                      reinterpret_cast<bf16*>(y.data_ptr<at::BFloat16>()));
  return like_x(y, x_);
}

void check_int4_shape(int64_t N, int64_t K, int64_t G, const char* op) {
  TORCH_CHECK_VALUE(G == 32 || G == 64 || G == 128 || G == 256, op, ": group_size must be 32, 64, 128 or 256, got ", G);
  TORCH_CHECK_VALUE(N > 0 && K > 0 && K % G == 0, op, ": in_features ", K,
                    " must be a positive multiple of group_size ", G, " (out_features ", N, ")");
}

at::Tensor pack_int4_op(const at::Tensor& weight_, const at::Tensor& sz_, int64_t G) {
  TORCH_CHECK_VALUE(weight_.dim() == 2 && weight_.scalar_type() == at::kByte && weight_.device().is_cpu(),
              "pack_int4: weight must be a 2-D uint8 CPU tensor (N, K/2), got ", weight_.scalar_type(), " ",
              weight_.sizes());
  const int64_t N = weight_.size(0), K = 2 * weight_.size(1);
  check_int4_shape(N, K, G, "pack_int4");
  TORCH_CHECK_VALUE(sz_.dim() == 3 && sz_.size(0) == K / G && sz_.size(1) == N && sz_.size(2) == 2 &&
                  sz_.scalar_type() == at::kBFloat16 && sz_.device().is_cpu(),
              "pack_int4: scales_and_zeros must be a bfloat16 CPU tensor of shape (", K / G, ", ", N, ", 2), got ",
              sz_.scalar_type(), " ", sz_.sizes());
  const at::Tensor weight = weight_.contiguous(), sz = sz_.contiguous();
  at::Tensor packed = at::empty({int4_packed_bytes(N, K, G)}, weight.options());
  pack_int4(weight.data_ptr<uint8_t>(), bf16_ptr(sz), N, K, G, packed.data_ptr<uint8_t>());
  return packed;
}

template <bool Q8A>
at::Tensor gemv_int4_op(const at::Tensor& x_, const at::Tensor& packed, int64_t N, int64_t K, int64_t G) {
  check_int4_shape(N, K, G, "gemv_int4");
  TORCH_CHECK_VALUE(packed.dim() == 1 && packed.scalar_type() == at::kByte && packed.device().is_cpu() &&
                  packed.is_contiguous() && packed.numel() == int4_packed_bytes(N, K, G),
              "gemv_int4: packed must be pack_int4's output for N=", N, ", K=", K, ", group_size=", G, " (",
              int4_packed_bytes(N, K, G), " uint8), got ", packed.scalar_type(), " ", packed.sizes());
  const at::Tensor x = check_x(x_, K, "gemv_int4");
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M > 0)
    (Q8A ? gemv_int4_q8a : gemv_int4)(bf16_ptr(x), M, K, packed.data_ptr<uint8_t>(), N, G,
                                      reinterpret_cast<bf16*>(y.data_ptr<at::BFloat16>()));
  return like_x(y, x_);
}

// q (B, H, 1, hd), k and v (B, Hkv, S, hd) bfloat16 CPU tensors, hd contiguous (k and v may be
// views of a larger cache); mask (B, 1, 1, S) bool -> (B, H, 1, hd) bfloat16.
at::Tensor decode_attention_op(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& mask_,
                               double scale) {
  const char* op = "decode_attention";
  for (const at::Tensor* t : {&q_, &k_, &v_})
    TORCH_CHECK_VALUE(t->device().is_cpu() && t->scalar_type() == at::kBFloat16 && t->dim() == 4, op,
                      ": q, k and v must be 4-D bfloat16 CPU tensors, got ", t->scalar_type(), " ", t->sizes());
  const int64_t B = q_.size(0), H = q_.size(1), hd = q_.size(3), Hkv = k_.size(1), S = k_.size(2);
  TORCH_CHECK_VALUE(q_.size(2) == 1, op, ": one query per sequence (T = 1), got T = ", q_.size(2));
  TORCH_CHECK_VALUE(k_.sizes() == v_.sizes() && k_.size(0) == B && k_.size(3) == hd && Hkv > 0 && H % Hkv == 0,
                    op, ": k and v must be (", B, ", Hkv, S, ", hd, ") with Hkv dividing ", H, ", got ", k_.sizes(),
                    " and ", v_.sizes());
  TORCH_CHECK_VALUE(mask_.scalar_type() == at::kBool && mask_.dim() == 4 && mask_.size(0) == B && mask_.size(1) == 1 &&
                    mask_.size(2) == 1 && mask_.size(3) == S,
                    op, ": mask must be a (", B, ", 1, 1, ", S, ") bool tensor, got ", mask_.scalar_type(), " ",
                    mask_.sizes());
  const at::Tensor q = q_.stride(3) == 1 ? q_ : q_.contiguous();
  const at::Tensor k = k_.stride(3) == 1 ? k_ : k_.contiguous();
  const at::Tensor v = v_.stride(3) == 1 ? v_ : v_.contiguous();
  const at::Tensor mask = mask_.reshape({B, S}).contiguous();
  at::Tensor out = at::empty({B, H, 1, hd}, q.options());
  const int64_t qs[2] = {q.stride(0), q.stride(1)}, ks[3] = {k.stride(0), k.stride(1), k.stride(2)},
                vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
  if (B > 0 && S > 0)
    decode_attention(bf16_ptr(q), qs, bf16_ptr(k), ks, bf16_ptr(v), vs, mask.data_ptr<bool>(), B, H, Hkv, S, hd,
                     float(scale), reinterpret_cast<bf16*>(out.data_ptr<at::BFloat16>()));
  return out;
}

// x (..., D) bfloat16, weight (D,) bfloat16 -> RMSNorm(x) (..., D) bfloat16, as llama/core/model.py's
// RMSNorm computes it for a bfloat16 x and weight.
at::Tensor rms_norm_op(const at::Tensor& x_, const at::Tensor& w_, double eps) {
  TORCH_CHECK_VALUE(x_.device().is_cpu() && x_.scalar_type() == at::kBFloat16 && x_.dim() >= 1,
                    "rms_norm: x must be a bfloat16 CPU tensor, got ", x_.scalar_type(), " ", x_.sizes(), " on ",
                    x_.device());
  const int64_t D = x_.size(-1);
  TORCH_CHECK_VALUE(w_.device().is_cpu() && w_.scalar_type() == at::kBFloat16 && w_.dim() == 1 && w_.size(0) == D,
                    "rms_norm: weight must be a (", D, ",) bfloat16 CPU tensor, got ", w_.scalar_type(), " ",
                    w_.sizes());
  const at::Tensor x = x_.contiguous(), w = w_.contiguous();
  at::Tensor y = at::empty_like(x);
  if (x.numel() > 0) rms_norm(bf16_ptr(x), bf16_ptr(w), x.numel() / D, D, float(eps), reinterpret_cast<bf16*>(y.data_ptr<at::BFloat16>()));
  return y;
}

// x (B, T, n, hd) bfloat16, hd even and contiguous (x may be a view: a slice of the fused q/k/v
// projection), cos and sin (B, T, hd/2) float32: x rotated in place, as kernels/fused.py's rope_.
void rope_op(const at::Tensor& x, const at::Tensor& cos_, const at::Tensor& sin_) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 4 && x.size(3) % 2 == 0 &&
                        x.stride(3) == 1,
                    "rope_: x must be a 4-D bfloat16 CPU tensor (B, T, n, hd) with hd even and contiguous, got ",
                    x.scalar_type(), " ", x.sizes(), " strides ", x.strides());
  const int64_t B = x.size(0), T = x.size(1), n = x.size(2), hd = x.size(3);
  for (const at::Tensor* t : {&cos_, &sin_})
    TORCH_CHECK_VALUE(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 3 && t->size(0) == B &&
                          t->size(1) == T && t->size(2) == hd / 2,
                      "rope_: cos and sin must be (", B, ", ", T, ", ", hd / 2, ") float32 CPU tensors, got ",
                      t->scalar_type(), " ", t->sizes());
  const at::Tensor cos = cos_.contiguous(), sin = sin_.contiguous();
  const int64_t strides[3] = {x.stride(0), x.stride(1), x.stride(2)};
  if (x.numel() > 0)
    rope_(reinterpret_cast<bf16*>(x.data_ptr<at::BFloat16>()), strides, B, T, n, hd, cos.data_ptr<float>(),
          sin.data_ptr<float>());
}

// t (..., F) as `rows` rows of F values a fixed distance apart: a 2-D view when its leading dims allow
// one (the halves of the fused gate/up projection's output do), else a contiguous copy.
at::Tensor as_rows(const at::Tensor& t, int64_t rows, int64_t F) {
  if (t.stride(-1) == 1) {
    bool even = true;
    for (int64_t d = t.dim() - 2; d > 0; d--) even = even && t.stride(d - 1) == t.stride(d) * t.size(d);
    if (even) return t.as_strided({rows, F}, {t.dim() >= 2 ? t.stride(-2) : F, 1});
  }
  return t.reshape({rows, F}).contiguous();
}

// gate, up (..., F) bfloat16 of one shape, F contiguous (views: the halves of the fused gate/up
// projection's output) -> F.silu(gate) * up (..., F) bfloat16, contiguous.
at::Tensor silu_mul_op(const at::Tensor& gate_, const at::Tensor& up_) {
  for (const at::Tensor* t : {&gate_, &up_})
    TORCH_CHECK_VALUE(t->device().is_cpu() && t->scalar_type() == at::kBFloat16 && t->dim() >= 1,
                      "silu_mul: gate and up must be bfloat16 CPU tensors, got ", t->scalar_type(), " ", t->sizes());
  TORCH_CHECK_VALUE(gate_.sizes() == up_.sizes(), "silu_mul: gate and up must have one shape, got ", gate_.sizes(),
                    " and ", up_.sizes());
  const int64_t F = gate_.size(-1), rows = F > 0 ? gate_.numel() / F : 0;
  const at::Tensor gate = as_rows(gate_, rows, F), up = as_rows(up_, rows, F);
  at::Tensor y = at::empty(gate_.sizes(), gate_.options());
  if (rows > 0 && F > 0)
    silu_mul(bf16_ptr(gate), gate.stride(0), bf16_ptr(up), up.stride(0), rows, F,
             reinterpret_cast<bf16*>(y.data_ptr<at::BFloat16>()));
  return y;
}

std::string isa_op() { return isa(); }
bool has_vnni_op() { return has_vnni(); }

}  // namespace

// One level of indirection so that the namespace macro is expanded before TORCH_LIBRARY pastes it.
#define LK_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define LK_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

LK_LIBRARY(LLAMA_KERNELS_NS, m) {
  m.def("gemv_bf16(Tensor x, Tensor weight) -> Tensor");
  m.def("gemv_int8(Tensor x, Tensor weight, Tensor scales) -> Tensor");
  m.def("gemv_q8_0(Tensor x, Tensor weight, Tensor scales) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
  m.def("pack_int4(Tensor weight, Tensor scales_and_zeros, int group_size) -> Tensor");
  m.def("gemv_int4(Tensor x, Tensor packed, int out_features, int in_features, int group_size) -> Tensor");
  m.def("gemv_int8_q8a(Tensor x, Tensor weight, Tensor scales) -> Tensor");
  m.def("gemv_q8_0_q8a(Tensor x, Tensor weight, Tensor scales) -> Tensor");
  m.def("gemv_int4_q8a(Tensor x, Tensor packed, int out_features, int in_features, int group_size) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  m.def("isa() -> str", &isa_op);
  m.def("has_vnni() -> bool", &has_vnni_op);
}

LK_LIBRARY_IMPL(LLAMA_KERNELS_NS, CPU, m) {
  m.impl("gemv_bf16", &gemv_bf16_op);
  m.impl("gemv_int8", &gemv_int8_op<false>);
  m.impl("gemv_q8_0", &gemv_q8_0_op<false>);
  m.impl("gemv_int8_q8a", &gemv_int8_op<true>);
  m.impl("gemv_q8_0_q8a", &gemv_q8_0_op<true>);
  m.impl("decode_attention", &decode_attention_op);
  m.impl("pack_int4", &pack_int4_op);
  m.impl("gemv_int4", &gemv_int4_op<false>);
  m.impl("gemv_int4_q8a", &gemv_int4_op<true>);
  m.impl("rms_norm", &rms_norm_op);
  m.impl("rope_", &rope_op);
  m.impl("silu_mul", &silu_mul_op);
}

}  // namespace llama_kernels
