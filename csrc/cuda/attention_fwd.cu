// FlashAttention-2 forward, CUDA C++ (non-causal, no mask).
//
// Notation as in flashcore/ops/attention.py; c2 = scale log2(e), so softmax
// runs in base 2. One block = 4 warps = 64 query rows of one (batch, head);
// it streams K/V through shared memory in tiles of STEP keys:
//   1. S  = c2 Q K_j^T                     (warp: 16 x STEP, tensor cores)
//   2. m' = max(m, rowmax S);  P = 2^(S - m');  alpha = 2^(m - m')
//   3. l  = alpha l + rowsum P;  O = alpha O + P V_j   (P rounded to T, as FA2)
//   4. O /= l;  lse = ln2 (m + log2 l)
// Q, K and V tiles are zero-padded to D_PAD columns and STEP rows; padded keys
// get S = -inf before the softmax.
#include <cmath>

#include "attention_common.cuh"

namespace flashcore {
namespace cuda {

template <typename T, int D_PAD>
struct FwdSmem {
  using C = Tile<D_PAD>;
  static constexpr int q = 0;
  static constexpr int k = q + tile_bytes<T>(C::ROWS, C::LD);
  static constexpr int v = k + tile_bytes<T>(C::STEP, C::LD);
  static constexpr int p = v + tile_bytes<T>(C::STEP, C::LD);          // per warp: 16 x LDS probabilities
  static constexpr int scratch = p + kWarps * tile_bytes<T>(16, C::LDS);  // per warp: 16 x 16 floats
  static constexpr int bytes = scratch + kWarps * 256 * 4;
};

template <typename T, int D_PAD>
__global__ void __launch_bounds__(kThreads)
    attn_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ o,
                    float* __restrict__ lse, int Nq, int Nk, int D, float c2, bool vec) {
  using C = Tile<D_PAD>;
  using S = FwdSmem<T, D_PAD>;
  FC_DYNAMIC_SMEM(smem);
  const Place<D_PAD> me(smem, S::scratch);
  T *sQ = smem_at<T>(smem, S::q), *sK = smem_at<T>(smem, S::k), *sV = smem_at<T>(smem, S::v);
  T* sP = smem_at<T>(smem, S::p + me.warp * tile_bytes<T>(16, C::LDS));

  load_tile<T, D_PAD, C::LD>(sQ, q + me.bh * Nq * D, me.row0, C::ROWS, Nq, D, vec);
  float m_i = -INFINITY, l_i = 0.f;
  float acc[C::ND][8] = {};
  for (int n0 = 0; n0 < Nk; n0 += C::STEP) {
    __syncthreads();   // every warp is done with the previous K/V tile (and sQ is written)
    load_pair<T, D_PAD>(sK, k + me.bh * Nk * D, sV, v + me.bh * Nk * D, n0, C::STEP, Nk, D, vec);
    __syncthreads();
    float s[C::NB][8] = {};
    #pragma unroll
    for (int j = 0; j < C::NB; ++j)                                                 // 1.
      warp_mma<T, true, D_PAD>(sQ + me.warp * 16 * C::LD, C::LD, sK + j * 16 * C::LD, C::LD, me.scratch, s[j]);
    float mx = -INFINITY;
    #pragma unroll
    for (int j = 0; j < C::NB; ++j)
      #pragma unroll
      for (int i = 0; i < 8; ++i) {
        const bool ok = n0 + j * 16 + me.half * 8 + i < Nk;
        s[j][i] = ok ? s[j][i] * c2 : -INFINITY;
        mx = fmaxf(mx, s[j][i]);
      }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));                          // row max over both lanes
    const float m_new = fmaxf(m_i, mx);                                             // 2. finite: key n0 exists
    const float alpha = exp2f(m_i - m_new);
    float sum = 0.f;
    #pragma unroll
    for (int j = 0; j < C::NB; ++j)
      #pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float p = exp2f(s[j][i] - m_new);
        sum += p;
        sP[me.r * C::LDS + j * 16 + me.half * 8 + i] = from_f32<T>(p);
      }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l_i = l_i * alpha + sum;                                                        // 3.
    m_i = m_new;
    #pragma unroll
    for (int jd = 0; jd < C::ND; ++jd)
      #pragma unroll
      for (int i = 0; i < 8; ++i) acc[jd][i] *= alpha;
    __syncwarp();      // the warp's P strip is complete
    #pragma unroll
    for (int jd = 0; jd < C::ND; ++jd)
      warp_mma<T, false, C::STEP>(sP, C::LDS, sV + jd * 16, C::LD, me.scratch, acc[jd]);
    __syncwarp();      // P is consumed before the next tile overwrites it
  }
  store_rows<T, C::ND>(o + me.bh * Nq * D, acc, me.row, Nq, D, 1.f / l_i);        // 4.
  if (me.row < Nq && me.half == 0) lse[me.bh * Nq + me.row] = (m_i + log2f(l_i)) * kLn2;
}

template <typename T, int D_PAD>
int launch_fwd(const void* q, const void* k, const void* v, void* o, float* lse, int B, int H, int Nq, int Nk,
               int D, float scale, bool vec, void* stream) {
  auto kern = attn_fwd_kernel<T, D_PAD>;
  const int smem = FwdSmem<T, D_PAD>::bytes;
  if (int e = opt_in_smem(kern, smem)) return e;
  const dim3 grid(static_cast<unsigned>(ceil_div(Nq, Tile<D_PAD>::ROWS)), static_cast<unsigned>(B * H));
  FC_LAUNCH(kern, grid, kThreads, smem, stream, static_cast<const T*>(q), static_cast<const T*>(k),
            static_cast<const T*>(v), static_cast<T*>(o), lse, Nq, Nk, D, scale * kLog2e, vec);
  return last_error();
}

}  // namespace cuda
}  // namespace flashcore

extern "C" int fc_attention_fwd(const void* q, const void* k, const void* v, void* o, float* lse, int B, int H,
                                int Nq, int Nk, int D, int dtype, float scale, void* stream) {
  using namespace flashcore::cuda;
  if (!shape_ok(B, H, Nq, Nk, D)) return FC_ERR_SHAPE;
  const bool vec = vec_ok(q, D, dtype) && vec_ok(k, D, dtype) && vec_ok(v, D, dtype);
  FC_DISPATCH_DTYPE(dtype, {
    FC_DISPATCH_HEAD_DIM(D, { return launch_fwd<T, D_PAD>(q, k, v, o, lse, B, H, Nq, Nk, D, scale, vec, stream); })
  })
}

extern "C" int fc_attention_fwd_smem(int dtype, int D) {
  using namespace flashcore::cuda;
  FC_DISPATCH_DTYPE(dtype, { FC_DISPATCH_HEAD_DIM(D, { return FwdSmem<T, D_PAD>::bytes; }) })
}
