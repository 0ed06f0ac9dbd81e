// Raw-pointer launchers of flashcore's CUDA kernels: the C interface that the
// torch binding (binding.cu) and the host tests (tests/test_gpu_build.py,
// through ctypes on a g++ build with FLASHCORE_HOST_EMU) call alike.
//
// Tensors are dense and contiguous; `stream` is a cudaStream_t (the host
// emulation ignores it). Each launcher returns 0, a cudaError_t from the
// launch, or one of the negative FC_ERR_* codes for arguments it does not take.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum fc_dtype { FC_F16 = 0, FC_BF16 = 1, FC_F32 = 2 };
enum { FC_ERR_DTYPE = -1, FC_ERR_HEAD_DIM = -2, FC_ERR_SHAPE = -3 };

#define FC_ATTN_MAX_HEAD_DIM 128

// (x_next, x0) = one noise-corrected DDIM step; eps_u and x_T may be null
// (no CFG; no noise correction). See flashcore/ops/sampler_step.py.
int fc_sampler_step(const void* x_t, const void* eps_c, const void* eps_u, const void* x_T, void* x_next,
                    void* x0, int64_t n, int dtype, float a_t, float s_t, float a_s, float s_s, float guidance,
                    float clip, void* stream);

// Floats of scratch that fc_srl_loss needs for n elements.
int64_t fc_srl_loss_workspace(int64_t n);
// loss (one float, device memory) = mean((x0_S - x0_target)^2), grad = dloss/deps_S.
int fc_srl_loss(const void* x_t, const void* eps_s, const void* x0_target, void* grad, float* loss,
                float* workspace, int64_t n, int dtype, float a_t, float s_t, void* stream);
// out = a * x0 + s * noise
int fc_srl_renoise(const void* x0, const void* noise, void* out, int64_t n, int dtype, float a, float s,
                   void* stream);

// q (B,H,Nq,D), k/v (B,H,Nk,D) -> o (B,H,Nq,D), lse (B,H,Nq) float32 natural log. D <= 128.
int fc_attention_fwd(const void* q, const void* k, const void* v, void* o, float* lse, int B, int H, int Nq,
                     int Nk, int D, int dtype, float scale, void* stream);
// -> dq, dk, dv; delta: scratch of B*H*Nq floats.
int fc_attention_bwd(const void* dout, const void* q, const void* k, const void* v, const void* o,
                     const float* lse, void* dq, void* dk, void* dv, float* delta, int B, int H, int Nq, int Nk,
                     int D, int dtype, float scale, void* stream);

// Dynamic shared memory (bytes) per block that the attention kernels request for a
// dtype and head dim (the backward's two main kernels request the same), or FC_ERR_*.
int fc_attention_fwd_smem(int dtype, int D);
int fc_attention_bwd_smem(int dtype, int D);

#ifdef __cplusplus
}
#endif
