// Pieces shared by the attention forward and backward kernels: tile shapes, a
// thread's place in the block, shared-memory tile loads, row stores, the
// warp-level 16x16 matrix product, and the host side's shape, padding and
// shared-memory checks.
//
// Lane ownership (all kernels): a warp owns 16 rows of a tile; lane l owns row
// l / 2 and, in every 16-column block, the 8 columns 8 (l % 2) .. 8 (l % 2) + 7.
// Accumulators live in registers in that layout, so per-row softmax state (max,
// sum, rescaling) is a lane's own plus one shuffle with its partner lane l ^ 1.
// Products go through WMMA (tensor cores) for fp16/bf16: the fragment layout is
// opaque, so a 16x16 result is stored to a per-warp scratch tile and each lane
// reads back its 8 values. fp32 inputs take a plain FMA path (tf32 tensor cores
// would break the fp32 error budget).
#pragma once

#include <type_traits>

#include "common.cuh"

namespace flashcore {
namespace cuda {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Head dims are padded to a multiple of 32 (the host picks the smallest that fits).
template <int D_PAD>
struct Tile {
  static_assert(D_PAD % 32 == 0 && D_PAD <= FC_ATTN_MAX_HEAD_DIM, "padded head dim");
  static constexpr int LD = D_PAD + 8;            // row pitch of Q/K/V/dO tiles; +8 staggers banks
  static constexpr int ROWS = 16 * kWarps;        // rows owned by the block's warps
  static constexpr int STEP = D_PAD <= 64 ? 64 : 32;   // rows of the tile streamed per iteration
  static constexpr int LDS = STEP + 8;            // pitch of the per-warp probability strips
  static constexpr int NB = STEP / 16;            // 16-column blocks of a streamed tile's scores
  static constexpr int ND = D_PAD / 16;           // 16-column blocks of a head-dim accumulator
};

// This thread's place: its warp, its row r of the warp's 16 and which 8 of every 16
// columns it owns (half; lane layout above), the block's (batch, head) slice (grid y),
// the first of the block's ROWS owned rows (grid x) and this lane's row among them,
// and the warp's 16 x 16 float scratch tile at byte `scratch_offset` of shared memory.
template <int D_PAD>
struct Place {
  int warp, half, r;
  int64_t bh;
  int row0, row;
  float* scratch;
  __device__ Place(unsigned char* smem, int scratch_offset)
      : warp(threadIdx.x / 32), half(threadIdx.x & 1), r((threadIdx.x % 32) >> 1), bh(blockIdx.y),
        row0(blockIdx.x * Tile<D_PAD>::ROWS), row(row0 + warp * 16 + r),
        scratch(reinterpret_cast<float*>(smem + scratch_offset) + warp * 256) {}
};

// A typed pointer at byte `offset` of the block's shared memory.
template <typename U>
__device__ __forceinline__ U* smem_at(unsigned char* smem, int offset) {
  return reinterpret_cast<U*>(smem + offset);
}

// Bytes of a T tile of `rows` rows at pitch LD, rounded to 128 so that every
// WMMA pointer stays 32-byte aligned.
template <typename T>
__host__ __device__ constexpr int tile_bytes(int rows, int ld) {
  return (rows * ld * static_cast<int>(sizeof(T)) + 127) / 128 * 128;
}

// dst[r][c] (pitch LD, `rows` rows) = src[row0 + r][c] for row0 + r < n and c < D,
// zero elsewhere, so padded rows and head-dim lanes add nothing to any product.
// vec: src rows are 16-byte aligned (D a multiple of 16 / sizeof(T), aligned base).
template <typename T, int D_PAD, int LD>
__device__ __forceinline__ void load_tile(T* __restrict__ dst, const T* __restrict__ src, int row0, int rows, int n,
                                          int D, bool vec) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  if (vec) {
    for (int idx = threadIdx.x; idx < rows * (D_PAD / V); idx += kThreads) {
      const int r = idx / (D_PAD / V), c = (idx % (D_PAD / V)) * V;
      uint4 val = {0u, 0u, 0u, 0u};
      if (row0 + r < n && c < D)
        val = *reinterpret_cast<const uint4*>(src + static_cast<int64_t>(row0 + r) * D + c);
      *reinterpret_cast<uint4*>(dst + r * LD + c) = val;
    }
  } else {
    for (int idx = threadIdx.x; idx < rows * D_PAD; idx += kThreads) {
      const int r = idx / D_PAD, c = idx % D_PAD;
      dst[r * LD + c] = (row0 + r < n && c < D) ? src[static_cast<int64_t>(row0 + r) * D + c] : from_f32<T>(0.f);
    }
  }
}

// Two tiles of the same rows (K and V, or Q and dO) with load_tile.
template <typename T, int D_PAD>
__device__ __forceinline__ void load_pair(T* dst_a, const T* src_a, T* dst_b, const T* src_b, int row0, int rows,
                                          int n, int D, bool vec) {
  load_tile<T, D_PAD, Tile<D_PAD>::LD>(dst_a, src_a, row0, rows, n, D, vec);
  load_tile<T, D_PAD, Tile<D_PAD>::LD>(dst_b, src_b, row0, rows, n, D, vec);
}

// Writes the lane's accumulator row (layout above) times `mult` to out[row][0..D),
// a contiguous (n, D) output; rows past n are padding and write nothing.
template <typename T, int ND>
__device__ __forceinline__ void store_rows(T* __restrict__ out, const float (&acc)[ND][8], int row, int n, int D,
                                           float mult) {
  if (row >= n) return;
  const int half = threadIdx.x & 1;
#pragma unroll
  for (int jd = 0; jd < ND; ++jd)
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int d = jd * 16 + half * 8 + i;
      if (d < D) out[static_cast<int64_t>(row) * D + d] = from_f32<T>(acc[jd][i] * mult);
    }
}

// acc[i] += sum_k A[row][k] B(k, col_i) over one 16x16 output block, lane layout above.
// A: 16 x KDIM row-major at pitch lda. B(k, c) = B_T ? B[c * ldb + k] : B[k * ldb + c].
// scratch: this warp's 256 floats (unused by the fp32 path).
template <typename T, bool B_T, int KDIM>
__device__ __forceinline__ void warp_mma(const T* A, int lda, const T* B, int ldb, float* scratch, float acc[8]) {
  static_assert(KDIM % 16 == 0, "K must be a multiple of 16");
  const int lane = threadIdx.x % 32, row = lane >> 1, col0 = (lane & 1) * 8;
  if constexpr (std::is_same<T, float>::value) {
    (void)scratch;
#pragma unroll 4   // a full unroll of K multiplies nvcc's time several-fold for no gain
    for (int k = 0; k < KDIM; ++k) {
      const float a = A[row * lda + k];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += a * (B_T ? B[(col0 + i) * ldb + k] : B[k * ldb + col0 + i]);
    }
  } else {
    namespace wmma = nvcuda::wmma;
    using LayoutB = typename std::conditional<B_T, wmma::col_major, wmma::row_major>::type;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
    wmma::fill_fragment(c, 0.f);
#pragma unroll
    for (int k = 0; k < KDIM; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> b;
      wmma::load_matrix_sync(a, A + k, lda);
      wmma::load_matrix_sync(b, B_T ? B + k : B + k * ldb, ldb);
      wmma::mma_sync(c, a, b, c);
    }
    wmma::store_matrix_sync(scratch, c, 16, wmma::mem_row_major);
    __syncwarp();
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] += scratch[row * 16 + col0 + i];
    __syncwarp();   // the scratch tile is free again
  }
}

// The smallest supported padded head dim for D, or 0 when D is too large.
inline int pad_head_dim(int D) {
  for (int p : {32, 64, 96, 128})
    if (D <= p) return p;
  return 0;
}

inline int dtype_size(int dtype) { return dtype == FC_F32 ? 4 : 2; }

// The shapes every attention entry point accepts (FC_ERR_SHAPE otherwise).
inline bool shape_ok(int B, int H, int Nq, int Nk, int D) { return B > 0 && H > 0 && Nq > 0 && Nk > 0 && D > 0; }

// A kernel using more than 48 KB of dynamic shared memory must opt in; 0 or a CUDA error.
template <typename K>
int opt_in_smem(K kern, int bytes) {
#ifndef FLASHCORE_HOST_EMU
  if (bytes > 48 * 1024)
    return static_cast<int>(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
#else
  (void)kern;
  (void)bytes;
#endif
  return 0;
}

// Whether the 16-byte vector path of load_tile may read rows of D elements from p.
inline bool vec_ok(const void* p, int D, int dtype) {
  return D % (16 / dtype_size(dtype)) == 0 && reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

}  // namespace cuda
}  // namespace flashcore

// Runs the statements with `D_PAD` bound to the padded head dim for D.
// FLASHCORE_CUDA_CHECK_SUBSET (compile checks in CI only, never a real build)
// instantiates two pads, one per tile shape (STEP 64 and 32), to halve nvcc time.
#ifdef FLASHCORE_CUDA_CHECK_SUBSET
#define FC_PAD_CASE_SMALL(...)
#else
#define FC_PAD_CASE_SMALL(...) __VA_ARGS__
#endif
#define FC_DISPATCH_HEAD_DIM(D, ...)                                      \
  switch (flashcore::cuda::pad_head_dim(D)) {                             \
    FC_PAD_CASE_SMALL(case 32: { constexpr int D_PAD = 32; __VA_ARGS__ }) \
    case 64: { constexpr int D_PAD = 64; __VA_ARGS__ }                    \
    case 96: { constexpr int D_PAD = 96; __VA_ARGS__ }                    \
    FC_PAD_CASE_SMALL(case 128: { constexpr int D_PAD = 128; __VA_ARGS__ }) \
    default: return FC_ERR_HEAD_DIM;                                      \
  }
