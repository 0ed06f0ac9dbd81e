// The torch binding of the CUDA kernels: checks, allocation, the current
// stream, then a raw-pointer launcher from flashcore_cuda.h. Registered under
// TORCH_LIBRARY_IMPL(flashcore_C, CUDA) against the schemas declared once in
// csrc/registration.cpp; loaded as flashcore._C_cuda after flashcore._C.
// This is the only CUDA file that includes torch headers, and only ATen's and
// the op registry's: <torch/extension.h> would add the C++ frontend (nn
// modules, pybind11) that nothing here uses, and minutes of nvcc time.
#include <Python.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <c10/core/DeviceGuard.h>

#include "flashcore_cuda.h"

// The current CUDA stream comes from c10's CUDA headers, which every CUDA build
// of torch ships. The CPU wheel lacks their generated config header; there this
// file still compiles (the CI compile check) but refuses to run.
#if __has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
#include <c10/cuda/CUDAStream.h>
static void* current_stream(const at::Tensor& t) {
  return static_cast<void*>(c10::cuda::getCurrentCUDAStream(t.device().index()).stream());
}
#else
static void* current_stream(const at::Tensor&) {
  TORCH_CHECK(false, "flashcore._C_cuda was compiled without c10's CUDA headers; rebuild against a CUDA torch");
  return nullptr;
}
#endif

namespace {

int fc_dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kHalf: return FC_F16;
    case at::kBFloat16: return FC_BF16;
    case at::kFloat: return FC_F32;
    default: TORCH_CHECK(false, op, ": dtype ", t.scalar_type(), " not supported by the CUDA kernels");
  }
  return -1;
}

void check_same(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " shape ", t.sizes(), " differs from ", ref.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " dtype differs");
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on another device");
}

void check_rc(int rc, const char* op) {
  TORCH_CHECK(rc != FC_ERR_DTYPE, op, ": unsupported dtype");
  TORCH_CHECK(rc != FC_ERR_HEAD_DIM, op, ": head dim above ", FC_ATTN_MAX_HEAD_DIM);
  TORCH_CHECK(rc != FC_ERR_SHAPE, op, ": empty or invalid shape");
  TORCH_CHECK(rc == 0, op, ": CUDA error ", rc);
}

const void* ptr_or_null(const std::optional<at::Tensor>& t) { return t ? t->data_ptr() : nullptr; }

std::tuple<at::Tensor, at::Tensor> sampler_step_cuda(const at::Tensor& x_t, const at::Tensor& eps_c,
                                                     const std::optional<at::Tensor>& eps_u,
                                                     const std::optional<at::Tensor>& x_T, double a_t, double s_t,
                                                     double a_s, double s_s, double guidance, bool noise_correction,
                                                     double clip) {
  const char* op = "sampler_step";
  check_same(x_t, x_t, op, "x_t");
  check_same(eps_c, x_t, op, "eps_c");
  c10::DeviceGuard guard(x_t.device());
  auto xt = x_t.contiguous(), ec = eps_c.contiguous();
  std::optional<at::Tensor> eu, xT;
  if (eps_u) { check_same(*eps_u, x_t, op, "eps_u"); eu = eps_u->contiguous(); }
  if (noise_correction) {
    TORCH_CHECK(x_T.has_value(), op, ": x_T is required when noise_correction=True");
    check_same(*x_T, x_t, op, "x_T");
    xT = x_T->contiguous();
  }
  auto x_next = at::empty_like(xt), x0 = at::empty_like(xt);
  check_rc(fc_sampler_step(xt.data_ptr(), ec.data_ptr(), ptr_or_null(eu), ptr_or_null(xT), x_next.data_ptr(),
                           x0.data_ptr(), xt.numel(), fc_dtype_of(xt, op), a_t, s_t, a_s, s_s, guidance, clip,
                           current_stream(xt)),
           op);
  return {x_next, x0};
}

std::tuple<at::Tensor, at::Tensor> srl_loss_cuda(const at::Tensor& x_t, const at::Tensor& eps_s,
                                                 const at::Tensor& x0_target, double a_t, double s_t) {
  const char* op = "srl_loss";
  check_same(x_t, x_t, op, "x_t");
  check_same(eps_s, x_t, op, "eps_s");
  check_same(x0_target, x_t, op, "x0_target");
  c10::DeviceGuard guard(x_t.device());
  auto xt = x_t.contiguous(), es = eps_s.contiguous(), tg = x0_target.contiguous();
  const int64_t n = xt.numel();
  auto grad = at::empty_like(xt);
  auto f32 = xt.options().dtype(at::kFloat);
  auto loss = at::empty({}, f32);
  auto ws = at::empty({fc_srl_loss_workspace(n)}, f32);
  check_rc(fc_srl_loss(xt.data_ptr(), es.data_ptr(), tg.data_ptr(), grad.data_ptr(), loss.data_ptr<float>(),
                       ws.data_ptr<float>(), n, fc_dtype_of(xt, op), a_t, s_t, current_stream(xt)),
           op);
  return {loss, grad};
}

at::Tensor srl_renoise_cuda(const at::Tensor& x0, const at::Tensor& noise, double a, double s) {
  const char* op = "srl_renoise";
  check_same(x0, x0, op, "x0");
  check_same(noise, x0, op, "noise");
  c10::DeviceGuard guard(x0.device());
  auto x = x0.contiguous(), e = noise.contiguous();
  auto out = at::empty_like(x);
  check_rc(fc_srl_renoise(x.data_ptr(), e.data_ptr(), out.data_ptr(), x.numel(), fc_dtype_of(x, op), a, s,
                          current_stream(x)),
           op);
  return out;
}

void check_attn(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 4, op, ": q must be a 4-d CUDA tensor");
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.sizes() == v.sizes(), op, ": k and v must have one 4-d shape");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), op,
              ": k/v batch, heads or head dim differ from q's");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op, ": dtypes differ");
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), op, ": devices differ");
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q_, const at::Tensor& k_,
                                                      const at::Tensor& v_, double scale) {
  const char* op = "attention_fwd";
  check_attn(q_, k_, v_, op);
  c10::DeviceGuard guard(q_.device());
  auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const auto B = q.size(0), H = q.size(1), Nq = q.size(2), Nk = k.size(2), D = q.size(3);
  auto o = at::empty_like(q);
  auto lse = at::empty({B, H, Nq}, q.options().dtype(at::kFloat));
  check_rc(fc_attention_fwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr<float>(), B, H, Nq,
                            Nk, D, fc_dtype_of(q, op), scale, current_stream(q)),
           op);
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(const at::Tensor& dout_, const at::Tensor& q_,
                                                                  const at::Tensor& k_, const at::Tensor& v_,
                                                                  const at::Tensor& out_, const at::Tensor& lse_,
                                                                  double scale) {
  const char* op = "attention_bwd";
  check_attn(q_, k_, v_, op);
  check_same(dout_, q_, op, "dout");
  check_same(out_, q_, op, "out");
  c10::DeviceGuard guard(q_.device());
  auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(), dout = dout_.contiguous(),
       out = out_.contiguous();
  auto lse = lse_.to(at::kFloat).contiguous();
  const auto B = q.size(0), H = q.size(1), Nq = q.size(2), Nk = k.size(2), D = q.size(3);
  TORCH_CHECK(lse.numel() == B * H * Nq, op, ": lse must have shape (B, H, Nq)");
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  auto delta = at::empty({B, H, Nq}, q.options().dtype(at::kFloat));
  check_rc(fc_attention_bwd(dout.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                            lse.data_ptr<float>(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), delta.data_ptr<float>(),
                            B, H, Nq, Nk, D, fc_dtype_of(q, op), scale, current_stream(q)),
           op);
  return {dq, dk, dv};
}

}  // namespace

// `import flashcore._C_cuda` runs the registrations below; the module is empty.
extern "C" PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}

TORCH_LIBRARY_IMPL(flashcore_C, CUDA, m) {
  m.impl("sampler_step", &sampler_step_cuda);
  m.impl("srl_loss", &srl_loss_cuda);
  m.impl("srl_renoise", &srl_renoise_cuda);
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}
