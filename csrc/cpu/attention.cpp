// CPU kernels for flashcore_C::attention_fwd / attention_bwd: FlashAttention-style
// tiling with an online softmax (Dao et al. 2022; FlashAttention-2, Dao 2023).
//
// Notation: q (B,H,Nq,D), k (B,H,Nk,D), v (B,H,Nk,Dv), c = scale.
//   forward, per query block Q_i and key block K_j, V_j:
//     1. S    = Q_i K_j^T                                   (kBQ x kBK, fp32)
//     2. m'   = max(m, rowmax(c S));  p = exp(c S - m')     (online softmax)
//     3. l    = l e^(m - m') + rowsum(p);  acc = acc e^(m - m') + p V_j
//     4. O_i  = acc / l;  lse_i = m + log l                 (after the last block)
//   backward, P recomputed from lse (no S or P kept between the passes):
//     P = exp(c Q_i K_j^T - lse_i);  dV_j += P^T dO_i;  dP = dO_i V_j^T
//     dS = P (dP - Delta_i), Delta = rowsum(dO O);  dQ_i += c dS K_j;  dK_j += c dS^T Q_i
//
// The tile GEMMs run through ATen's oneDNN batch-reduce GEMM micro-kernel
// (at::native::cpublas::brgemm): bf16 x bf16 -> fp32 on AVX512-BF16 with B in VNNI
// layout, and fp32. Measured here at 128x256x64 tiles: ~460 GFLOP/s per core in bf16,
// ~220 in fp32, against ~90 for MKL's sgemm on this AMD CPU. Every B operand is packed
// once per (batch, head) so the micro-kernel never re-packs; the input strides are
// read directly, so (B, N, H, D) views need no copy. fp64 (gradcheck) and machines
// where brgemm is missing use plain loops with the same layouts.
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "vec.h"

namespace flashcore::cpu {
namespace {

constexpr int64_t kBQ = 128;  // query rows per task: 12 tasks at B=1,H=6,N=256 for 2 cores
constexpr int64_t kBK = 256;  // keys per block: brgemm ran at half speed with 512 columns

namespace cpublas = at::native::cpublas;

template <typename E>
constexpr bool kVnni = std::is_same_v<E, c10::BFloat16>;  // bf16 operands are VNNI pairs

inline int64_t padk(int64_t k, bool vnni) { return vnni ? (k + 1) & ~int64_t(1) : k; }
inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Element (b, h, n, d) of a strided 4-d tensor.
template <typename T>
struct View {
  T* p;
  int64_t s0, s1, s2, s3;
  explicit View(T* ptr, const at::Tensor& t) : p(ptr), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)), s3(t.stride(3)) {}
  T* row(int64_t b, int64_t h, int64_t n) const { return p + b * s0 + h * s1 + n * s2; }
};

// GEMM operand B (K x N) from src(k, n) = trans ? s[n ld + k inc] : s[k ld + n inc].
// VNNI: (ceil(K/2), N, 2), the pair (k, k+1) of a column adjacent, K zero-padded to even.
template <typename E, typename S>
void pack_b(const S* s, int64_t ld, int64_t inc, bool trans, int64_t K, int64_t N, E* out) {
  constexpr bool V = kVnni<E>;
  const int64_t Kp = padk(K, V);
  for (int64_t k = 0; k < Kp; ++k)
    for (int64_t n = 0; n < N; ++n) {
      const E x = k < K ? cvt<E>(trans ? s[n * ld + k * inc] : s[k * ld + n * inc]) : E(0);
      if constexpr (V) out[((k >> 1) * N + n) * 2 + (k & 1)] = x;
      else out[k * N + n] = x;
    }
}

// GEMM operand A (M x Kp, row-major, ld Kp) from src(m, k), columns zero-padded.
template <typename E, typename S>
void pack_a(const S* s, int64_t ld, int64_t inc, bool trans, int64_t M, int64_t K, E* out) {
  const int64_t Kp = padk(K, kVnni<E>);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < Kp; ++k)
      out[m * Kp + k] = k < K ? cvt<E>(trans ? s[k * ld + m * inc] : s[m * ld + k * inc]) : E(0);
}

// Does oneDNN's brgemm run for this element type on this CPU? Probed once on a 2x16x2
// product with exact answers; any exception or wrong value means "use the loops".
template <typename E>
bool brgemm_works() {
  static const bool ok = [] {
    try {
      E a[4], b[32];
      float c[32], sa[4] = {1, 2, 3, 4}, sb[32];
      for (int i = 0; i < 32; ++i) sb[i] = float(i % 7);
      pack_a<E>(sa, 2, 1, false, 2, 2, a);
      pack_b<E>(sb, 16, 1, false, 2, 16, b);
      cpublas::brgemm(2, 16, 2, 2, 16, 16, false, a, b, c, kVnni<E>);
      cpublas::brgemm_release(kVnni<E>);
      for (int m = 0; m < 2; ++m)
        for (int n = 0; n < 16; ++n)
          if (c[m * 16 + n] != sa[m * 2] * sb[n] + sa[m * 2 + 1] * sb[16 + n]) return false;
      return true;
    } catch (...) {
      return false;
    }
  }();
  return ok;
}

// C (M x N, ld ldc) [+]= A (M x Kp) B (packed K x N). A is fp32 (fp64) for C.
template <typename E, typename A>
void gemm(int64_t M, int64_t N, int64_t K, const E* a, const E* b, A* c, int64_t ldc, bool add) {
  const int64_t Kp = padk(K, kVnni<E>);
  if constexpr (kVnni<E>) {
    cpublas::brgemm(M, N, Kp, Kp, N, ldc, add, a, b, c, true);
    return;
  } else {
    if constexpr (std::is_same_v<E, float>) {
      if (brgemm_works<float>()) {
        cpublas::brgemm(M, N, K, K, N, ldc, add, a, b, c, false);
        return;
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      A* cr = c + m * ldc;
      if (!add) std::fill(cr, cr + N, A(0));
      for (int64_t k = 0; k < K; ++k) {
        const A av = a[m * Kp + k];
        const E* br = b + k * N;
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) cr[n] += av * br[n];
      }
    }
  }
}

template <typename E>
void release() {
  if constexpr (kVnni<E> || std::is_same_v<E, float>)
    if (brgemm_works<E>()) cpublas::brgemm_release(kVnni<E>);
}

// Grow-only scratch, one set per thread and slot. Fresh multi-megabyte buffers are
// mmap'ed and page-fault on every call (~2 GB/s, docs/cpu_performance.md); these stay mapped. Every
// kernel below writes each element it later reads, so stale contents never leak.
template <typename E>
E* scratch(int slot, int64_t n) {
  thread_local std::vector<E> bufs[8];
  auto& b = bufs[slot];
  if (static_cast<int64_t>(b.size()) < n) b.resize(n);
  return b.data();
}

struct Dims {
  int64_t B, H, Nq, Nk, D, Dv;
};

template <typename T, typename E>
void attention_fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                          at::Tensor& lse, double scale, Dims d) {
  using A = acc_t<T>;
  constexpr bool V = kVnni<E>;
  const int64_t Dp = padk(d.D, V), nkb = cdiv(d.Nk, kBK), nqb = cdiv(d.Nq, kBQ), BH = d.B * d.H;
  const View<const T> qv(q.const_data_ptr<T>(), q), kv(k.const_data_ptr<T>(), k), vv(v.const_data_ptr<T>(), v);
  T* o = out.mutable_data_ptr<T>();                                     // (B,H,Nq,Dv) contiguous
  A* lp = lse.mutable_data_ptr<A>();                                    // (B,H,Nq)
  const A c = A(scale);

  at::parallel_for(0, BH * nqb, 1, [&](int64_t t0, int64_t t1) {
    // A by-value copy: through the lambda's reference GCC re-loaded c with a gather
    // in every vector iteration of the softmax loops.
    const A cs = c;
    // K_j^T and V_j of the current head, packed by this thread when it reaches the head:
    // a thread's tasks are consecutive, so a head is packed at most once per thread
    // (twice in all where two threads share it). Packing them all first, in a parallel
    // region of its own, cost one more fork/join: 367 -> 345 us at B=1, H=6, N=256, D=64
    // in fp32, 283 -> 247 in bf16. (Reading Q and V in place where fp32 rows are
    // contiguous, no packing, measured no faster.)
    const int64_t kt_blk = kBK * Dp, v_blk = kBK * d.Dv;
    E* const kt = scratch<E>(0, nkb * kt_blk);
    E* const vp = scratch<E>(1, nkb * v_blk);
    int64_t packed_bh = -1;
    E* const qa = scratch<E>(2, kBQ * Dp);
    E* const pa = scratch<E>(3, kBQ * (kBK + 1));
    A* const s = scratch<A>(4, kBQ * kBK);
    A* const acc = scratch<A>(5, kBQ * d.Dv);
    std::vector<A> m(kBQ), l(kBQ);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / nqb, r0 = (t % nqb) * kBQ, rows = std::min(kBQ, d.Nq - r0);
      const int64_t b = bh / d.H, h = bh % d.H;
      if (bh != packed_bh) {
        for (int64_t j = 0; j < nkb; ++j) {
          const int64_t n0 = j * kBK, nb = std::min(kBK, d.Nk - n0);
          pack_b(kv.row(b, h, n0), kv.s2, kv.s3, true, d.D, nb, kt + j * kt_blk);      // (Dp x nb)
          pack_b(vv.row(b, h, n0), vv.s2, vv.s3, false, nb, d.Dv, vp + j * v_blk);   // (nbp x Dv)
        }
        packed_bh = bh;
      }
      pack_a(qv.row(b, h, r0), qv.s2, qv.s3, false, rows, d.D, qa);        // (rows x Dp)
      std::fill(m.begin(), m.end(), -std::numeric_limits<A>::infinity());
      std::fill(l.begin(), l.end(), A(0));
      std::fill(acc, acc + rows * d.Dv, A(0));
      for (int64_t j = 0; j < nkb; ++j) {
        const int64_t nb = std::min(kBK, d.Nk - j * kBK), nbp = padk(nb, V);
        gemm(rows, nb, d.D, qa, kt + j * kt_blk, s, nb, false);  // 1.
        for (int64_t r = 0; r < rows; ++r) {
          const A* sr = s + r * nb;
          A mx = -std::numeric_limits<A>::infinity();
#pragma omp simd reduction(max : mx)
          for (int64_t n = 0; n < nb; ++n) mx = std::max(mx, cs * sr[n]);
          const A mnew = std::max(m[r], mx), alpha = exp_f(m[r] - mnew);             // 2.
          E* pr = pa + r * nbp;
          A sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t n = 0; n < nb; ++n) {
            const A p = exp_nonpos(cs * sr[n] - mnew);
            sum += p;
            pr[n] = cvt<E>(p);
          }
          if (nbp > nb) pr[nb] = E(0);
          l[r] = l[r] * alpha + sum;                                                  // 3.
          m[r] = mnew;
          if (alpha != A(1)) {
            A* ar = acc + r * d.Dv;
#pragma omp simd
            for (int64_t e = 0; e < d.Dv; ++e) ar[e] *= alpha;
          }
        }
        gemm(rows, d.Dv, nb, pa, vp + j * v_blk, acc, d.Dv, true);
      }
      for (int64_t r = 0; r < rows; ++r) {                                            // 4.
        const A inv = A(1) / l[r];
        T* orow = o + (bh * d.Nq + r0 + r) * d.Dv;
        const A* ar = acc + r * d.Dv;
#pragma omp simd
        for (int64_t e = 0; e < d.Dv; ++e) orow[e] = cvt<T>(ar[e] * inv);
        lp[bh * d.Nq + r0 + r] = m[r] + std::log(l[r]);
      }
    }
    release<E>();
  });
}

// Backward, parallel over (batch, head): each task owns its dQ accumulator, so no two
// threads write the same memory and the result does not depend on the thread count.
template <typename T, typename E>
void attention_bwd_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk,
                          at::Tensor& dv, double scale, Dims d) {
  using A = acc_t<T>;
  constexpr bool V = kVnni<E>;
  const int64_t Dp = padk(d.D, V), Dvp = padk(d.Dv, V), nkb = cdiv(d.Nk, kBK), nqb = cdiv(d.Nq, kBQ);
  const View<const T> qv(q.const_data_ptr<T>(), q), kv(k.const_data_ptr<T>(), k), vv(v.const_data_ptr<T>(), v),
      dov(dout.const_data_ptr<T>(), dout), ov(out.const_data_ptr<T>(), out);
  const View<T> dqv(dq.mutable_data_ptr<T>(), dq), dkv(dk.mutable_data_ptr<T>(), dk), dvv(dv.mutable_data_ptr<T>(), dv);
  const A* lp = lse.const_data_ptr<A>();
  const A c = A(scale);

  at::parallel_for(0, d.B * d.H, 1, [&](int64_t t0, int64_t t1) {
    const A cs = c;  // by value, see the forward
    std::vector<E> qa(d.Nq * Dp), doa(d.Nq * Dvp), qb(nqb * kBQ * d.D), dob(nqb * kBQ * d.Dv);
    std::vector<E> kt(nkb * kBK * Dp), kb(nkb * kBK * d.D), vt(nkb * kBK * Dvp);
    std::vector<E> ta(kBK * (kBQ + 1)), sa(kBQ * (kBK + 1));
    std::vector<A> delta(d.Nq), dqa(d.Nq * d.D), s(kBQ * kBK), dp(kBQ * kBK), dka(kBK * d.D), dva(kBK * d.Dv);
    for (int64_t bh = t0; bh < t1; ++bh) {
      const int64_t b = bh / d.H, h = bh % d.H;
      // Operands packed once per head (shapes in rows x cols of the GEMM operand).
      pack_a(qv.row(b, h, 0), qv.s2, qv.s3, false, d.Nq, d.D, qa.data());         // Q   (Nq x Dp)
      pack_a(dov.row(b, h, 0), dov.s2, dov.s3, false, d.Nq, d.Dv, doa.data());    // dO  (Nq x Dvp)
      for (int64_t i = 0; i < nqb; ++i) {
        const int64_t r0 = i * kBQ, rows = std::min(kBQ, d.Nq - r0);
        pack_b(qv.row(b, h, r0), qv.s2, qv.s3, false, rows, d.D, qb.data() + i * kBQ * d.D);      // Q_i
        pack_b(dov.row(b, h, r0), dov.s2, dov.s3, false, rows, d.Dv, dob.data() + i * kBQ * d.Dv);  // dO_i
      }
      for (int64_t j = 0; j < nkb; ++j) {
        const int64_t n0 = j * kBK, nb = std::min(kBK, d.Nk - n0);
        pack_b(kv.row(b, h, n0), kv.s2, kv.s3, true, d.D, nb, kt.data() + j * kBK * Dp);      // K_j^T
        pack_b(kv.row(b, h, n0), kv.s2, kv.s3, false, nb, d.D, kb.data() + j * kBK * d.D);    // K_j
        pack_b(vv.row(b, h, n0), vv.s2, vv.s3, true, d.Dv, nb, vt.data() + j * kBK * Dvp);    // V_j^T
      }
      for (int64_t r = 0; r < d.Nq; ++r) {                                       // Delta = rowsum(dO O)
        const T *dr = dov.row(b, h, r), *orow = ov.row(b, h, r);
        A acc = 0;
        for (int64_t e = 0; e < d.Dv; ++e) acc += cvt<A>(dr[e * dov.s3]) * cvt<A>(orow[e * ov.s3]);
        delta[r] = acc;
      }
      std::fill(dqa.begin(), dqa.end(), A(0));
      for (int64_t j = 0; j < nkb; ++j) {
        const int64_t n0 = j * kBK, nb = std::min(kBK, d.Nk - n0);
        std::fill(dka.begin(), dka.end(), A(0));
        std::fill(dva.begin(), dva.end(), A(0));
        for (int64_t i = 0; i < nqb; ++i) {
          const int64_t r0 = i * kBQ, rows = std::min(kBQ, d.Nq - r0);
          const A* lr = lp + bh * d.Nq + r0;
          gemm(rows, nb, d.D, qa.data() + r0 * Dp, kt.data() + j * kBK * Dp, s.data(), nb, false);  // S
          for (int64_t r = 0; r < rows; ++r) {
            A* sr = s.data() + r * nb;
            const A lse_r = lr[r];
#pragma omp simd
            for (int64_t n = 0; n < nb; ++n) sr[n] = exp_nonpos(cs * sr[n] - lse_r);  // P
          }
          pack_a(s.data(), nb, 1, true, nb, rows, ta.data());                          // P^T (nb x rows)
          gemm(nb, d.Dv, rows, ta.data(), dob.data() + i * kBQ * d.Dv, dva.data(), d.Dv, true);  // dV_j
          gemm(rows, nb, d.Dv, doa.data() + r0 * Dvp, vt.data() + j * kBK * Dvp, dp.data(), nb, false);  // dP
          for (int64_t r = 0; r < rows; ++r) {
            A *sr = s.data() + r * nb, *dr = dp.data() + r * nb;
            const A de = delta[r0 + r];
#pragma omp simd
            for (int64_t n = 0; n < nb; ++n) sr[n] = sr[n] * (dr[n] - de);    // dS
          }
          pack_a(s.data(), nb, 1, false, rows, nb, sa.data());                         // dS (rows x nbp)
          gemm(rows, d.D, nb, sa.data(), kb.data() + j * kBK * d.D, dqa.data() + r0 * d.D, d.D, true);  // dQ_i
          pack_a(s.data(), nb, 1, true, nb, rows, ta.data());                          // dS^T
          gemm(nb, d.D, rows, ta.data(), qb.data() + i * kBQ * d.D, dka.data(), d.D, true);  // dK_j
        }
        for (int64_t n = 0; n < nb; ++n) {
          T *kr = dkv.row(b, h, n0 + n), *vr = dvv.row(b, h, n0 + n);
          for (int64_t e = 0; e < d.D; ++e) kr[e * dkv.s3] = cvt<T>(cs * dka[n * d.D + e]);
          for (int64_t e = 0; e < d.Dv; ++e) vr[e * dvv.s3] = cvt<T>(dva[n * d.Dv + e]);
        }
      }
      for (int64_t r = 0; r < d.Nq; ++r) {
        T* qr = dqv.row(b, h, r);
        for (int64_t e = 0; e < d.D; ++e) qr[e * dqv.s3] = cvt<T>(cs * dqa[r * d.D + e]);
      }
    }
    release<E>();
  });
}

Dims check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  for (auto [name, t] : {std::pair<const char*, const at::Tensor&>{"q", q}, {"k", k}, {"v", v}}) {
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
    TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be (B, H, N, D), got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                " but q has ", q.scalar_type());
  }
  const auto s = q.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kBFloat16, op,
              ": the cpp kernel takes float32, float64 or bfloat16, got ", s);
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && v.size(0) == q.size(0) && v.size(1) == q.size(1),
              op, ": batch/heads of q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(), " differ");
  TORCH_CHECK(k.size(3) == q.size(3), op, ": k head dim ", k.size(3), " differs from q head dim ", q.size(3));
  TORCH_CHECK(v.size(2) == k.size(2), op, ": v has ", v.size(2), " keys but k has ", k.size(2));
  TORCH_CHECK(k.size(2) > 0, op, ": k must have at least one key");
  TORCH_CHECK(q.size(3) > 0 && v.size(3) > 0, op, ": head dims must be > 0");
  check_finite(op, "scale", scale);
  return {q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
}

// bf16 takes the VNNI brgemm path when oneDNN has it here, else fp32 loops.
template <typename F>
void dispatch(at::ScalarType s, F&& f) {
  if (s == at::kFloat) f(float{}, float{});
  else if (s == at::kDouble) f(double{}, double{});
  else if (brgemm_works<c10::BFloat16>()) f(c10::BFloat16{}, c10::BFloat16{});
  else f(c10::BFloat16{}, float{});
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      double scale) {
  const Dims d = check_qkv("attention_fwd", q, k, v, scale);
  const bool fp64 = q.scalar_type() == at::kDouble;
  auto out = at::empty({d.B, d.H, d.Nq, d.Dv}, q.options());
  auto lse = at::empty({d.B, d.H, d.Nq}, q.options().dtype(fp64 ? at::kDouble : at::kFloat));
  dispatch(q.scalar_type(), [&](auto t, auto e) {
    attention_fwd_kernel<decltype(t), decltype(e)>(q, k, v, out, lse, scale, d);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(const at::Tensor& dout, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  double scale) {
  constexpr const char* op = "attention_bwd";
  const Dims d = check_qkv(op, q, k, v, scale);
  const std::vector<int64_t> oshape{d.B, d.H, d.Nq, d.Dv}, lshape{d.B, d.H, d.Nq};
  for (auto [name, t] : {std::pair<const char*, const at::Tensor&>{"dout", dout}, {"out", out}}) {
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
    TORCH_CHECK(t.sizes() == at::IntArrayRef(oshape), op, ": ", name, " must have shape ", oshape, ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but q has ",
                q.scalar_type());
  }
  const auto lse_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.device().is_cpu() && lse.sizes() == at::IntArrayRef(lshape) && lse.scalar_type() == lse_dtype, op,
              ": lse must be a CPU ", lse_dtype, " tensor of shape ", lshape, ", got ", lse.scalar_type(), " ",
              lse.sizes(), " on ", lse.device());
  const auto l = lse.contiguous();
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  dispatch(q.scalar_type(), [&](auto t, auto e) {
    attention_bwd_kernel<decltype(t), decltype(e)>(dout, q, k, v, out, l, dq, dk, dv, scale, d);
  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace flashcore::cpu

TORCH_LIBRARY_IMPL(flashcore_C, CPU, m) {
  m.impl("attention_fwd", &flashcore::cpu::attention_fwd_cpu);
  m.impl("attention_bwd", &flashcore::cpu::attention_bwd_cpu);
}
