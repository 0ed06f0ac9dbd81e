// Per-element maths of the sampler step and the SRL loss, shared by the CUDA
// kernels and the host tests: __host__ __device__, float32 in and out.
// Notation as in flashcore/ops/sampler_step.py and srl_loss.py.
#pragma once

#include "common.cuh"

namespace flashcore {
namespace cuda {

struct StepCoef {
  float a_t, s_t, a_s, s_s, w, clip;   // clip > 0 clamps x0 to [-clip, clip]
};

struct StepOut {
  float x_next, x0;
};

// One noise-corrected DDIM update of one element.
//   has_u: CFG with eps_u; nc: noise correction (direction x_T instead of eps_hat).
FC_HD StepOut sampler_step_elem(float xt, float ec, float eu, float xT, bool has_u, bool nc, const StepCoef& k) {
  const float eps = has_u ? eu + k.w * (ec - eu) : ec;         // 1. CFG combine
  float x0 = (xt - k.s_t * eps) / k.a_t;                       // 2. x0_hat
  if (k.clip > 0.f) x0 = fminf(fmaxf(x0, -k.clip), k.clip);     // 3. reflection
  const float d = nc ? xT : eps;                               // 4. noise correction
  return {k.a_s * x0 + k.s_s * d, x0};                         // 5.
}

// SRL residual r = x0_S - x0_target (loss = mean r^2, grad = g r).
FC_HD float srl_residual(float xt, float es, float tgt, float a_t, float s_t) {
  return (xt - s_t * es) / a_t - tgt;
}

// chi = a x0 + s eps'
FC_HD float renoise_elem(float x0, float e, float a, float s) { return a * x0 + s * e; }

}  // namespace cuda
}  // namespace flashcore
