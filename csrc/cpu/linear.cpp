// CPU kernel for flashcore_C::linear: y = act(x W^T + b), x (..., K), W (N, K), b (N,).
//
// Two regimes, picked by the number of rows M = numel(x) / K:
//
// - M <= kGemvRows (4 in fp32, 2 in bf16; a conditioning vector: DiT's timestep embedding and adaLN
//   projections run at M = batch): a GEMV of our own. It is bound by reading W once
//   (DiT-S/2's adaLN weight is 3.5 MB in fp32), so the loop is plain: four rows of W
//   at a time against every row of x, fp32 accumulators, `omp simd` reductions that
//   GCC vectorises under -march=native, rows of W split over the threads. oneDNN's
//   inner product spends ~60 us of fixed cost on such a call here (M = 1, K = 256,
//   N = 384: 76 us against ~15 us this way).
// - otherwise: PyTorch's oneDNN inner product (mkldnn::_linear_pointwise, the call
//   inductor emits for frozen linear layers), with the GELU as a oneDNN post-op.
//   On this AMD EPYC it runs near 440 GFLOP/s in fp32 where at::linear goes to MKL
//   at ~200. Torch builds without oneDNN use at::linear (then the GELU).
//
// A weight already in oneDNN's blocked layout (an MKLDNN tensor from
// mkldnn::_reorder_linear_weight, see ops.linear.pack_weight) always takes the
// oneDNN path: reordering a plain weight on every call costs 4-13% of these GEMMs
// when the weights come from DRAM, as they do for a whole DiT step.
//
// Both accumulate in fp32 (bf16 inputs and output keep their dtype). The C++ entry
// point saves the Python layers of a custom op, ~17 us a call: a DiT-S/2 step makes
// 112 linear calls.
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>

#include "vec.h"

namespace flashcore::cpu {
namespace {

// M up to this runs the GEMV: the crossover with oneDNN measured here (hot weights,
// N = 2304, K = 384): fp32 M = 4 61 against 72 us, M = 8 equal; bf16 M = 2 38 against
// 45 us, M = 4 73 against 45 (each row of x re-reads and re-widens the bf16 W rows).
template <typename T>
constexpr int64_t kGemvRows = std::is_same_v<T, float> ? 4 : 2;
constexpr int64_t kRowBlock = 4;   // rows of W per inner loop: four independent sums

enum class Act { kNone, kGelu, kGeluTanh };

Act parse_act(c10::string_view a) {
  if (a == "none") return Act::kNone;
  if (a == "gelu") return Act::kGelu;
  if (a == "gelu_tanh") return Act::kGeluTanh;
  TORCH_CHECK(false, "linear: activation must be 'none', 'gelu' or 'gelu_tanh', got '", std::string(a), "'");
}

inline float apply_act(float z, Act act) {
  switch (act) {
    case Act::kGelu: return 0.5f * z * (1.0f + std::erf(z * 0.70710678118654752f));
    case Act::kGeluTanh: {
      const float u = 0.79788456080286536f * (z + 0.044715f * z * z * z);
      return 0.5f * z * (1.0f + std::tanh(u));
    }
    default: return z;
  }
}

// y (M, N) = act(x (M, K) W^T + b), rows [n0, n1) of W. x, W, y contiguous.
template <typename T>
void gemv_rows(const T* x, const T* w, const T* b, T* y, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1,
               Act act) {
  int64_t n = n0;
  for (; n + kRowBlock <= n1; n += kRowBlock) {
    const T* w0 = w + n * K;
    const T* w1 = w0 + K;
    const T* w2 = w1 + K;
    const T* w3 = w2 + K;
    for (int64_t m = 0; m < M; ++m) {
      const T* xm = x + m * K;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t k = 0; k < K; ++k) {
        const float xv = cvt<float>(xm[k]);
        s0 += xv * cvt<float>(w0[k]);
        s1 += xv * cvt<float>(w1[k]);
        s2 += xv * cvt<float>(w2[k]);
        s3 += xv * cvt<float>(w3[k]);
      }
      const float s[kRowBlock] = {s0, s1, s2, s3};
      for (int64_t r = 0; r < kRowBlock; ++r) {
        const float z = s[r] + (b ? cvt<float>(b[n + r]) : 0.f);
        y[m * N + n + r] = cvt<T>(apply_act(z, act));
      }
    }
  }
  for (; n < n1; ++n) {
    const T* wn = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const T* xm = x + m * K;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < K; ++k) s += cvt<float>(xm[k]) * cvt<float>(wn[k]);
      const float z = s + (b ? cvt<float>(b[n]) : 0.f);
      y[m * N + n] = cvt<T>(apply_act(z, act));
    }
  }
}

template <typename T>
void gemv(const at::Tensor& x2, const at::Tensor& w, const std::optional<at::Tensor>& b, at::Tensor& y, Act act) {
  const int64_t M = x2.size(0), K = x2.size(1), N = w.size(0);
  const T* xp = x2.const_data_ptr<T>();
  const T* wp = w.const_data_ptr<T>();
  const T* bp = b ? b->const_data_ptr<T>() : nullptr;
  T* yp = y.mutable_data_ptr<T>();
  // a chunk of rows is worth a thread once it reads ~64 KB of W
  const int64_t grain = std::max<int64_t>(kRowBlock, (int64_t(1) << 16) / std::max<int64_t>(1, K * int64_t(sizeof(T))));
  at::parallel_for(0, (N + kRowBlock - 1) / kRowBlock, (grain + kRowBlock - 1) / kRowBlock,
                   [&](int64_t blk0, int64_t blk1) {
                     gemv_rows<T>(xp, wp, bp, yp, M, K, N, blk0 * kRowBlock, std::min(N, blk1 * kRowBlock), act);
                   });
}

using LinearPointwise = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                   c10::string_view, c10::List<std::optional<at::Scalar>>,
                                   std::optional<c10::string_view>);

// oneDNN's inner product through the dispatcher (None when torch has no oneDNN).
const std::optional<c10::TypedOperatorHandle<LinearPointwise>>& onednn_linear() {
  static const std::optional<c10::TypedOperatorHandle<LinearPointwise>> op =
      []() -> std::optional<c10::TypedOperatorHandle<LinearPointwise>> {
    auto h = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!h || !h->hasKernelForDispatchKey(c10::DispatchKey::CPU)) return std::nullopt;
    return h->typed<LinearPointwise>();
  }();
  return op;
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      c10::string_view activation) {
  constexpr const char* op = "linear";
  const Act act = parse_act(activation);
  TORCH_CHECK(x.device().is_cpu() && !x.is_mkldnn(), op, ": x must be a (strided) CPU tensor, got ", x.device(),
              x.is_mkldnn() ? " (oneDNN layout)" : "");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension (..., K), got a scalar");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be (N, K), got shape ", weight.sizes());
  TORCH_CHECK(weight.device().is_cpu(), op, ": weight must be a CPU tensor, got ", weight.device());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight has dtype ", weight.scalar_type(),
              " but x has ", x.scalar_type());
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.size(-1) == K, op, ": x has ", x.size(-1), " features (last dim of ", x.sizes(), ") but weight ",
              weight.sizes(), " expects K = ", K);
  TORCH_CHECK(N > 0 && K > 0, op, ": empty weight ", weight.sizes());
  if (bias) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == x.scalar_type(), op,
                ": bias must be a CPU tensor of x's dtype ", x.scalar_type(), ", got ", bias->scalar_type(), " on ",
                bias->device());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape (", N, "), got ",
                bias->sizes());
  }
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  const int64_t M = x.numel() / K;
  if (M == 0) return at::empty(out_shape, x.options());
  // Every path below reads x, W and b as dense row-major arrays, so any other layout is
  // copied here, once (a no-op for the usual contiguous tensors). Not left to oneDNN:
  // mkldnn::_linear_pointwise makes its input contiguous but hands the bias's storage to
  // the inner product as if it were dense, so an expanded (stride 0) or stepped bias was
  // read wrongly, past its end for an expanded one. The weight is normalised too rather
  // than trusting oneDNN's strided weight descriptors. (b is N elements: the copy is free.)
  const at::Tensor x2 = x.reshape({M, K}).contiguous();
  const at::Tensor w = weight.is_mkldnn() ? weight : weight.contiguous();
  const std::optional<at::Tensor> b = bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  const auto& onednn = onednn_linear();
  const int64_t gemv_rows = x.scalar_type() == at::kFloat ? kGemvRows<float> : kGemvRows<c10::BFloat16>;
  // A weight in oneDNN's own layout (ops.linear.pack_weight) goes to oneDNN at any M.
  TORCH_CHECK(!weight.is_mkldnn() || onednn, op, ": weight is in oneDNN's layout but this torch has no oneDNN linear");
  if (M > gemv_rows || weight.is_mkldnn()) {
    if (!onednn) {  // no oneDNN in this torch
      auto z = at::linear(x2, w, b);
      if (act != Act::kNone) z = at::gelu(z, act == Act::kGeluTanh ? "tanh" : "none");
      return z.view(out_shape);
    }
    const bool post = act != Act::kNone;
    const std::optional<c10::string_view> algo = act == Act::kGeluTanh ? c10::string_view("tanh")
                                                                       : c10::string_view(post ? "none" : "");
    auto y = onednn->call(x2, w, b, post ? "gelu" : "none", c10::List<std::optional<at::Scalar>>(), algo);
    return y.view(out_shape);
  }
  auto y = at::empty({M, N}, x.options());
  if (x.scalar_type() == at::kFloat) {
    gemv<float>(x2, w, b, y, act);
  } else {
    gemv<c10::BFloat16>(x2, w, b, y, act);
  }
  return y.view(out_shape);
}

}  // namespace
}  // namespace flashcore::cpu

TORCH_LIBRARY_IMPL(flashcore_C, CPU, m) { m.impl("linear", &flashcore::cpu::linear_cpu); }
// a prepacked weight is an MKLDNN tensor, which makes the call dispatch here
TORCH_LIBRARY_IMPL(flashcore_C, MkldnnCPU, m) { m.impl("linear", &flashcore::cpu::linear_cpu); }
