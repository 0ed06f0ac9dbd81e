"""FlashAttention-2 forward and backward in Triton (non-causal, no mask).

Notation as in ``flashcore.ops.attention``: q (B, H, Nq, D), k (B, H, Nk, D),
v (B, H, Nk, Dv), c = scale. Scores are kept in base 2 (``c2 = c log2 e``) so
the exponentials are ``exp2``; lse is stored in natural log, float32.

Forward, one program per (BLOCK_M query rows, b*h), online softmax over K/V tiles:
    1. s   = c2 q k_j^T                      (BLOCK_M, BLOCK_N), masked past Nk
    2. m'  = max(m, rowmax s);  alpha = 2^(m - m');  p = 2^(s - m')
    3. l   = alpha l + rowsum p;  acc = alpha acc + p v_j
    4. O   = acc / l;  lse = ln 2 (m + log2 l)

Backward (Dao 2023, Algorithm 2, split in two kernels so no atomics are needed):
    0. Delta = rowsum(dO * O)                                      (preprocess)
    1. per K/V tile: for every q tile  P^T = 2^(c2 k q^T - lse log2 e)
       dV += P^T dO;  dS^T = P^T (v dO^T - Delta);  dK += c dS^T q
    2. per q tile: for every K/V tile  dQ += c dS k

Head dims that are not powers of two (40, 80) are padded to BLOCK_D with
masked loads: the padded lanes load zeros and contribute nothing to q k^T or
to p v. Any strides are accepted; outputs are contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tuning import INTERPRET, autotune, cfg

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)              # the same constants, readable inside kernels
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr):
    # DOT_F32: exact fp32 products (fp32 inputs, where tf32 would break the
    # error rule, and bf16 under the interpreter, whose bf16 dot is wrong).
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


def _fits(config, args) -> bool:
    """Whether a tile config suits the head dim and dot precision (the AOT build report
    showed the others spill): 256-wide heads take at most 64x64 tiles, and exact fp32
    dots (FMA, no tensor cores) at most 64x32."""
    tile = config.kwargs.get("BLOCK_M", 0) * config.kwargs.get("BLOCK_N", 0)
    if args.get("BLOCK_D", 64) > 128 and tile > 64 * 64:
        return False
    return not (args.get("DOT_F32") and tile > 64 * 32)


# Ampere: 164 KB (A100) / 100 KB (sm_86) shared memory, mma.sync; Hopper: 228 KB, wgmma
# with 8 warps (two warp groups) over 128-row tiles.
FWD_AMPERE = [cfg(4, 3, BLOCK_M=128, BLOCK_N=64), cfg(4, 2, BLOCK_M=64, BLOCK_N=64),
              cfg(8, 3, BLOCK_M=128, BLOCK_N=32), cfg(4, 4, BLOCK_M=64, BLOCK_N=32)]
FWD_HOPPER = [cfg(8, 3, BLOCK_M=128, BLOCK_N=128), cfg(8, 3, BLOCK_M=128, BLOCK_N=64),
              cfg(4, 4, BLOCK_M=64, BLOCK_N=64), cfg(4, 3, BLOCK_M=64, BLOCK_N=32)]
BWD_AMPERE = [cfg(4, 2, BLOCK_M=32, BLOCK_N=64), cfg(4, 3, BLOCK_M=64, BLOCK_N=64),
              cfg(8, 2, BLOCK_M=64, BLOCK_N=128), cfg(4, 2, BLOCK_M=32, BLOCK_N=32)]
BWD_HOPPER = [cfg(8, 3, BLOCK_M=64, BLOCK_N=128), cfg(4, 3, BLOCK_M=64, BLOCK_N=64),
              cfg(8, 2, BLOCK_M=128, BLOCK_N=64), cfg(4, 2, BLOCK_M=32, BLOCK_N=64)]
INTERP = cfg(4, 1, BLOCK_M=16, BLOCK_N=16)   # small tiles: the interpreter runs numpy per tile
DQ_AMPERE = [cfg(4, 2, BLOCK_M=64, BLOCK_N=32), cfg(4, 3, BLOCK_M=64, BLOCK_N=64),
             cfg(8, 2, BLOCK_M=128, BLOCK_N=64), cfg(4, 2, BLOCK_M=32, BLOCK_N=32)]
DQ_HOPPER = [cfg(8, 3, BLOCK_M=128, BLOCK_N=64), cfg(4, 3, BLOCK_M=64, BLOCK_N=64),
             cfg(8, 2, BLOCK_M=64, BLOCK_N=128), cfg(4, 2, BLOCK_M=32, BLOCK_N=64)]


@triton.jit
def _program(H, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Where this program works: its (batch * head) index, batch and head (the grid's
    second axis), its BLOCK_ROWS rows (first axis) and the padded head-dim lanes."""
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    return bh, bh // H, bh % H, rows, tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)


@triton.jit
def _load_tile(base, rows, cols, s_row, s_col, n_rows, n_cols):
    """``base[rows, cols]`` at strides (s_row, s_col), zero past n_rows / n_cols: the
    padded rows, keys and head-dim lanes then add nothing to any product."""
    return tl.load(base + rows[:, None] * s_row + cols[None, :] * s_col,
                   mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _load_rows(base, rows, n_rows):
    """A per-row float32 statistic (lse, Delta) of the rows, zero past n_rows."""
    return tl.load(base + rows, mask=rows < n_rows, other=0.0)


@triton.jit
def _store_tile(base, rows, cols, n_rows, n_cols, val):
    """``base[rows, cols] = val`` into a contiguous (n_rows, n_cols) output."""
    tl.store(base + rows[:, None] * n_cols + cols[None, :], val.to(base.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


@autotune(ampere=FWD_AMPERE, hopper=FWD_HOPPER, interp=INTERP, key=["N_Q", "N_K", "HEAD_D", "HEAD_DV"],
          fits=_fits)
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, c2,
              sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
              H, N_Q, N_K, HEAD_D, HEAD_DV,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_DV: tl.constexpr, DOT_F32: tl.constexpr):
    bh, b, h, rows, d, dv = _program(H, BLOCK_M, BLOCK_D, BLOCK_DV)
    q = _load_tile(Q + b * sqb + h * sqh, rows, d, sqm, sqd, N_Q, HEAD_D)         # (BM, BD)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start in range(0, N_K, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        kt = _load_tile(k_base, d, cols, skd, skn, HEAD_D, N_K)                     # (BD, BN)
        s = _dot(q, kt, DOT_F32) * c2                                              # 1.
        s = tl.where(cols[None, :] < N_K, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))                                      # 2.
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)                                           # 3.
        vt = _load_tile(v_base, cols, dv, svn, svd, N_K, HEAD_DV)                  # (BN, BDV)
        acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, DOT_F32)
        m_i = m_new
    _store_tile(O + bh * N_Q * HEAD_DV, rows, dv, N_Q, HEAD_DV, acc / l_i[:, None])  # 4.
    tl.store(LSE + bh * N_Q + rows, (m_i + tl.math.log2(l_i)) * _LN2, mask=rows < N_Q)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, sob, soh, som, sod, sdb, sdh, sdm, sdd, H, N_Q, HEAD_DV,
                    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    bh, b, h, rows, _, dv = _program(H, BLOCK_M, BLOCK_DV, BLOCK_DV)
    o = _load_tile(O + b * sob + h * soh, rows, dv, som, sod, N_Q, HEAD_DV)
    do = _load_tile(DO + b * sdb + h * sdh, rows, dv, sdm, sdd, N_Q, HEAD_DV)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)                        # 0.
    tl.store(DELTA + bh * N_Q + rows, delta, mask=rows < N_Q)


@autotune(ampere=BWD_AMPERE, hopper=BWD_HOPPER, interp=INTERP, key=["N_Q", "N_K", "HEAD_D", "HEAD_DV"],
          fits=_fits)
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, c, c2,
                   sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
                   H, N_Q, N_K, HEAD_D, HEAD_DV,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DV: tl.constexpr, DOT_F32: tl.constexpr):
    bh, b, h, cols, d, dv = _program(H, BLOCK_N, BLOCK_D, BLOCK_DV)              # cols: this program's keys
    k = _load_tile(K + b * skb + h * skh, cols, d, skn, skd, N_K, HEAD_D)         # (BN, BD)
    v = _load_tile(V + b * svb + h * svh, cols, dv, svn, svd, N_K, HEAD_DV)       # (BN, BDV)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dvacc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start in range(0, N_Q, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q = _load_tile(q_base, rows, d, sqm, sqd, N_Q, HEAD_D)                     # (BM, BD)
        do = _load_tile(do_base, rows, dv, sdm, sdd, N_Q, HEAD_DV)                 # (BM, BDV)
        lse = _load_rows(LSE + bh * N_Q, rows, N_Q)
        delta = _load_rows(DELTA + bh * N_Q, rows, N_Q)
        st = _dot(k, tl.trans(q), DOT_F32) * c2                                     # (BN, BM)
        pt = tl.math.exp2(st - lse[None, :] * _LOG2E)
        pt = tl.where(rows[None, :] < N_Q, pt, 0.0)  # padded q rows would give p = 1
        dvacc += _dot(pt.to(do.dtype), do, DOT_F32)                                  # 1. dV
        dpt = _dot(v, tl.trans(do), DOT_F32)                                         # (BN, BM)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(q.dtype), q, DOT_F32)                                      # 1. dK / c
    _store_tile(DK + bh * N_K * HEAD_D, cols, d, N_K, HEAD_D, dk * c)
    _store_tile(DV + bh * N_K * HEAD_DV, cols, dv, N_K, HEAD_DV, dvacc)


@autotune(ampere=DQ_AMPERE, hopper=DQ_HOPPER, interp=INTERP, key=["N_Q", "N_K", "HEAD_D", "HEAD_DV"],
          fits=_fits)
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, c, c2,
                 sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
                 H, N_Q, N_K, HEAD_D, HEAD_DV,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_DV: tl.constexpr, DOT_F32: tl.constexpr):
    bh, b, h, rows, d, dv = _program(H, BLOCK_M, BLOCK_D, BLOCK_DV)
    q = _load_tile(Q + b * sqb + h * sqh, rows, d, sqm, sqd, N_Q, HEAD_D)         # (BM, BD)
    do = _load_tile(DO + b * sdb + h * sdh, rows, dv, sdm, sdd, N_Q, HEAD_DV)     # (BM, BDV)
    lse = _load_rows(LSE + bh * N_Q, rows, N_Q) * _LOG2E
    delta = _load_rows(DELTA + bh * N_Q, rows, N_Q)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, N_K, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, cols, d, skn, skd, N_K, HEAD_D)                     # (BN, BD)
        vt = _load_tile(v_base, dv, cols, svd, svn, HEAD_DV, N_K)                  # (BDV, BN)
        s = _dot(q, tl.trans(k), DOT_F32) * c2
        p = tl.where(cols[None, :] < N_K, tl.math.exp2(s - lse[:, None]), 0.0)     # (BM, BN)
        dp = _dot(do, vt, DOT_F32)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, DOT_F32)                                       # 2.
    _store_tile(DQ + bh * N_Q * HEAD_D, rows, d, N_Q, HEAD_D, dq * c)


MAX_HEAD_DIM = 256


def block_d(d: int) -> int:
    """Padded head dim: a power of two, at least 16 (the smallest tl.dot K)."""
    return max(16, triton.next_power_of_2(d))


def _dot_f32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16)


def attention_fwd(q, k, v, scale: float):
    """Returns ``(O, lse)`` like ``flashcore.ops.attention_ref``."""
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    out = torch.empty((B, H, Nq, Dv), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_fwd[grid](q, k, v, out, lse, scale * LOG2E, *q.stride(), *k.stride(), *v.stride(),
                    H, Nq, Nk, D, Dv, BLOCK_D=block_d(D), BLOCK_DV=block_d(Dv), DOT_F32=_dot_f32(q.dtype))
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, scale: float):
    """Returns ``(dq, dk, dv)`` like ``flashcore.ops.attention_bwd_ref``."""
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    lse = lse.float().contiguous()
    delta = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    bd, bdv, f32 = block_d(D), block_d(Dv), _dot_f32(q.dtype)
    pre_m = 16 if INTERPRET else 64
    _attn_bwd_delta[(triton.cdiv(Nq, pre_m), B * H)](out, dout, delta, *out.stride(), *dout.stride(),
                                                     H, Nq, Dv, BLOCK_M=pre_m, BLOCK_DV=bdv)
    dq = torch.empty((B, H, Nq, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, H, Nk, D), device=q.device, dtype=k.dtype)
    dv = torch.empty((B, H, Nk, Dv), device=q.device, dtype=v.dtype)
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    c2 = scale * LOG2E
    _attn_bwd_dkdv[lambda m: (triton.cdiv(Nk, m["BLOCK_N"]), B * H)](
        q, k, v, dout, lse, delta, dk, dv, scale, c2, *strides, H, Nq, Nk, D, Dv,
        BLOCK_D=bd, BLOCK_DV=bdv, DOT_F32=f32)
    _attn_bwd_dq[lambda m: (triton.cdiv(Nq, m["BLOCK_M"]), B * H)](
        q, k, v, dout, lse, delta, dq, scale, c2, *strides, H, Nq, Nk, D, Dv,
        BLOCK_D=bd, BLOCK_DV=bdv, DOT_F32=f32)
    return dq, dk, dv

