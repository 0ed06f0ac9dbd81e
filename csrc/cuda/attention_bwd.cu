// FlashAttention-2 backward, CUDA C++ (Dao 2023, Algorithm 2), in three launches
// so that no output is accumulated with atomics:
//   0. Delta = rowsum(dO * O)                              (one warp per query row)
//   1. per block of 64 keys, streaming query tiles:
//        P^T = 2^(c2 K Q^T - lse log2 e);  dV += P^T dO
//        dS^T = P^T (V dO^T - Delta);       dK += c dS^T Q
//   2. per block of 64 queries, streaming key tiles:
//        P = 2^(c2 Q K^T - lse log2 e);  dS = P (dO V^T - Delta);  dQ += c dS K
// Warps own 16 rows and keep their dK/dV (or dQ) accumulators in registers;
// the probability and dS strips pass through shared memory to feed the tensor
// cores (attention_common.cuh). Padded queries get P = 0, padded keys P = 0.
#include <cmath>

#include "attention_common.cuh"

namespace flashcore {
namespace cuda {

template <typename T, int D_PAD>
struct BwdSmem {   // shared by both kernels: 64 owned rows (a, b), a streamed tile (c, d) of STEP rows
  using C = Tile<D_PAD>;
  static constexpr int a = 0;
  static constexpr int b = a + tile_bytes<T>(C::ROWS, C::LD);
  static constexpr int c = b + tile_bytes<T>(C::ROWS, C::LD);
  static constexpr int d = c + tile_bytes<T>(C::STEP, C::LD);
  static constexpr int rowstat = d + tile_bytes<T>(C::STEP, C::LD);     // 2 x STEP floats: lse2, Delta
  static constexpr int strip = rowstat + 2 * C::STEP * 4;                // per warp: 2 strips 16 x LDS
  static constexpr int strip_bytes = tile_bytes<T>(16, C::LDS);
  static constexpr int scratch = strip + kWarps * 2 * strip_bytes;      // per warp: 16 x 16 floats
  static constexpr int bytes = scratch + kWarps * 256 * 4;
  struct Tiles { T *own0, *own1, *streamed0, *streamed1; };
  static __device__ __forceinline__ Tiles tiles(unsigned char* smem) {   // the T tiles at a, b, c, d
    return {smem_at<T>(smem, a), smem_at<T>(smem, b), smem_at<T>(smem, c), smem_at<T>(smem, d)};
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    attn_bwd_delta_kernel(const T* __restrict__ o, const T* __restrict__ dout, float* __restrict__ delta,
                          int64_t rows, int D) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= rows) return;   // whole warps leave together: no barrier follows
  float acc = 0.f;
  for (int d = threadIdx.x % 32; d < D; d += 32) acc += to_f32(o[row * D + d]) * to_f32(dout[row * D + d]);
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (threadIdx.x % 32 == 0) delta[row] = acc;                                            // 0.
}

template <typename T, int D_PAD>
__global__ void __launch_bounds__(kThreads)
    attn_bwd_dkdv_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                         const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                         T* __restrict__ dk, T* __restrict__ dv, int Nq, int Nk, int D, float c, float c2, bool vec) {
  using C = Tile<D_PAD>;
  using S = BwdSmem<T, D_PAD>;
  FC_DYNAMIC_SMEM(smem);
  const Place<D_PAD> me(smem, S::scratch);   // rows: this block's keys
  const auto [sK, sV, sQ, sdO] = S::tiles(smem);
  float* sL = smem_at<float>(smem, S::rowstat);
  float* sDelta = sL + C::STEP;
  T* sPt = smem_at<T>(smem, S::strip + me.warp * 2 * S::strip_bytes);
  T* sdSt = smem_at<T>(smem, S::strip + (me.warp * 2 + 1) * S::strip_bytes);
  const int64_t bq = me.bh * Nq;

  load_pair<T, D_PAD>(sK, k + me.bh * Nk * D, sV, v + me.bh * Nk * D, me.row0, C::ROWS, Nk, D, vec);
  float acc_dk[C::ND][8] = {}, acc_dv[C::ND][8] = {};
  const T* kw = sK + me.warp * 16 * C::LD;
  const T* vw = sV + me.warp * 16 * C::LD;
  for (int m0 = 0; m0 < Nq; m0 += C::STEP) {
    __syncthreads();   // the previous query tile is consumed (and sK/sV are written)
    load_pair<T, D_PAD>(sQ, q + bq * D, sdO, dout + bq * D, m0, C::STEP, Nq, D, vec);
    for (int i = threadIdx.x; i < C::STEP; i += kThreads) {
      const bool ok = m0 + i < Nq;
      sL[i] = ok ? lse[bq + m0 + i] * kLog2e : 0.f;
      sDelta[i] = ok ? delta[bq + m0 + i] : 0.f;
    }
    __syncthreads();
    float pt[C::NB][8] = {}, dpt[C::NB][8] = {};
#pragma unroll
    for (int j = 0; j < C::NB; ++j) {   // S^T = K Q^T and dP^T = V dO^T: 16 keys x 16 queries per j
      warp_mma<T, true, D_PAD>(kw, C::LD, sQ + j * 16 * C::LD, C::LD, me.scratch, pt[j]);
      warp_mma<T, true, D_PAD>(vw, C::LD, sdO + j * 16 * C::LD, C::LD, me.scratch, dpt[j]);
    }
#pragma unroll
    for (int j = 0; j < C::NB; ++j)
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int col = j * 16 + me.half * 8 + i;
        const float p = m0 + col < Nq ? exp2f(pt[j][i] * c2 - sL[col]) : 0.f;                   // 1.
        sPt[me.r * C::LDS + col] = from_f32<T>(p);
        sdSt[me.r * C::LDS + col] = from_f32<T>(p * (dpt[j][i] - sDelta[col]));
      }
    __syncwarp();   // both strips complete
#pragma unroll
    for (int jd = 0; jd < C::ND; ++jd) {
      warp_mma<T, false, C::STEP>(sPt, C::LDS, sdO + jd * 16, C::LD, me.scratch, acc_dv[jd]);  // dV += P^T dO
      warp_mma<T, false, C::STEP>(sdSt, C::LDS, sQ + jd * 16, C::LD, me.scratch, acc_dk[jd]);  // dK += dS^T Q
    }
    __syncwarp();
  }
  store_rows<T, C::ND>(dk + me.bh * Nk * D, acc_dk, me.row, Nk, D, c);
  store_rows<T, C::ND>(dv + me.bh * Nk * D, acc_dv, me.row, Nk, D, 1.f);
}

template <typename T, int D_PAD>
__global__ void __launch_bounds__(kThreads)
    attn_bwd_dq_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                       const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                       T* __restrict__ dq, int Nq, int Nk, int D, float c, float c2, bool vec) {
  using C = Tile<D_PAD>;
  using S = BwdSmem<T, D_PAD>;
  FC_DYNAMIC_SMEM(smem);
  const Place<D_PAD> me(smem, S::scratch);   // rows: this block's queries
  const auto [sQ, sdO, sK, sV] = S::tiles(smem);
  T* sdS = smem_at<T>(smem, S::strip + me.warp * 2 * S::strip_bytes);
  const int64_t bq = me.bh * Nq;

  load_pair<T, D_PAD>(sQ, q + bq * D, sdO, dout + bq * D, me.row0, C::ROWS, Nq, D, vec);
  const bool own = me.row < Nq;
  const float lse2 = own ? lse[bq + me.row] * kLog2e : 0.f;
  const float dlt = own ? delta[bq + me.row] : 0.f;
  float acc[C::ND][8] = {};
  const T* qw = sQ + me.warp * 16 * C::LD;
  const T* dow = sdO + me.warp * 16 * C::LD;
  for (int n0 = 0; n0 < Nk; n0 += C::STEP) {
    __syncthreads();
    load_pair<T, D_PAD>(sK, k + me.bh * Nk * D, sV, v + me.bh * Nk * D, n0, C::STEP, Nk, D, vec);
    __syncthreads();
    float s[C::NB][8] = {}, dp[C::NB][8] = {};
#pragma unroll
    for (int j = 0; j < C::NB; ++j) {
      warp_mma<T, true, D_PAD>(qw, C::LD, sK + j * 16 * C::LD, C::LD, me.scratch, s[j]);      // S = Q K^T
      warp_mma<T, true, D_PAD>(dow, C::LD, sV + j * 16 * C::LD, C::LD, me.scratch, dp[j]);    // dP = dO V^T
    }
#pragma unroll
    for (int j = 0; j < C::NB; ++j)
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int col = j * 16 + me.half * 8 + i;
        const float p = n0 + col < Nk ? exp2f(s[j][i] * c2 - lse2) : 0.f;
        sdS[me.r * C::LDS + col] = from_f32<T>(p * (dp[j][i] - dlt));                            // 2.
      }
    __syncwarp();
#pragma unroll
    for (int jd = 0; jd < C::ND; ++jd)
      warp_mma<T, false, C::STEP>(sdS, C::LDS, sK + jd * 16, C::LD, me.scratch, acc[jd]);      // dQ += dS K
    __syncwarp();
  }
  store_rows<T, C::ND>(dq + bq * D, acc, me.row, Nq, D, c);
}

template <typename T, int D_PAD>
int launch_bwd(const void* dout, const void* q, const void* k, const void* v, const void* o, const float* lse,
               void* dq, void* dk, void* dv, float* delta, int B, int H, int Nq, int Nk, int D, float scale,
               bool vec, void* stream) {
  using C = Tile<D_PAD>;
  const int64_t rows = static_cast<int64_t>(B) * H * Nq;
  auto pre = attn_bwd_delta_kernel<T>;
  FC_LAUNCH(pre, static_cast<unsigned>(ceil_div(rows, kWarps)), kThreads, 0, stream, static_cast<const T*>(o),
            static_cast<const T*>(dout), delta, rows, D);
  const int smem = BwdSmem<T, D_PAD>::bytes;
  auto kdkdv = attn_bwd_dkdv_kernel<T, D_PAD>;
  auto kdq = attn_bwd_dq_kernel<T, D_PAD>;
  if (int e = opt_in_smem(kdkdv, smem)) return e;
  if (int e = opt_in_smem(kdq, smem)) return e;
  const float c2 = scale * kLog2e;
  const unsigned bhs = static_cast<unsigned>(B * H);
  FC_LAUNCH(kdkdv, dim3(static_cast<unsigned>(ceil_div(Nk, C::ROWS)), bhs), kThreads, smem, stream,
            static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), static_cast<const T*>(dout),
            lse, delta, static_cast<T*>(dk), static_cast<T*>(dv), Nq, Nk, D, scale, c2, vec);
  FC_LAUNCH(kdq, dim3(static_cast<unsigned>(ceil_div(Nq, C::ROWS)), bhs), kThreads, smem, stream,
            static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), static_cast<const T*>(dout),
            lse, delta, static_cast<T*>(dq), Nq, Nk, D, scale, c2, vec);
  return last_error();
}

}  // namespace cuda
}  // namespace flashcore

extern "C" int fc_attention_bwd(const void* dout, const void* q, const void* k, const void* v, const void* o,
                                const float* lse, void* dq, void* dk, void* dv, float* delta, int B, int H, int Nq,
                                int Nk, int D, int dtype, float scale, void* stream) {
  using namespace flashcore::cuda;
  if (!shape_ok(B, H, Nq, Nk, D)) return FC_ERR_SHAPE;
  const bool vec = vec_ok(q, D, dtype) && vec_ok(k, D, dtype) && vec_ok(v, D, dtype) && vec_ok(dout, D, dtype);
  FC_DISPATCH_DTYPE(dtype, {
    FC_DISPATCH_HEAD_DIM(D, {
      return launch_bwd<T, D_PAD>(dout, q, k, v, o, lse, dq, dk, dv, delta, B, H, Nq, Nk, D, scale, vec, stream);
    })
  })
}

extern "C" int fc_attention_bwd_smem(int dtype, int D) {
  using namespace flashcore::cuda;
  FC_DISPATCH_DTYPE(dtype, { FC_DISPATCH_HEAD_DIM(D, { return BwdSmem<T, D_PAD>::bytes; }) })
}
