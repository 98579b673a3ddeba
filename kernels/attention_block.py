"""The fused patch-attention block: ScoreNet's whole attention layer in one kernel per image group.

For one image with tokens ``z_i`` (the C channels of pixel i of z (B, C, H, W), N = H*W) and, with
patch features, ``p_i`` = the raw zero-padded 3x3 neighbourhood of x (B, c, H, W) at pixel i
(P = 9c features, feature ``ch * 9 + k`` = x[ch] at offset (k // 3 - 1, k % 3 - 1)), ``u_i = [z_i; p_i]``:

* ``"softmax"``: ``q, k, v = u W_qkv^T + b_qkv`` (split in three of width d),
  ``a = softmax(scale q k^T) v``, ``out = z + a W_out^T + b_out``;
* ``"identity"``: ``a = softmax(scale z z^T) z``, ``out = z + a`` (no weights);
* ``"top1"``: ``idx_i = argmax_j (q_i . k_j + g_ij)`` (ties: lowest j; g Gumbel noise of
  ``fastscore.ops.top1``'s stream when GUMBEL), ``a_i = v[idx_i]``, ``out = z + a W_out^T + b_out``;
  backward: dv hard (scatter of da), dq and dk through the surrogate ``softmax((qk^T + g) / T) v``.

Forward (``_block_fwd_kernel``): one program per (query block, group of images); gathers patches,
projects, runs the online softmax (or argmax) over key blocks that it projects itself, applies the
output projection and the residual and writes ``out`` only, plus the log2-domain log-sum-exp (of the
surrogate for top-1) (B, N) float32 and, for top-1, the index map (B, N) int64.
Backward (``_block_bwd_kernel``): one program per group of images of one ensemble member; recomputes
everything from z, x and the weights: pass A (per query block) recomputes ``a`` and writes
``Delta_i = a_i . da_i`` (B, N) float32, pass B (per token block j) gets dk_j, dv_j (j as key) and
dq_j (j as query), maps them back through the projections and writes dz_j (and, when asked, the
patch-feature gradient, from which the op computes dx). Weight gradients are accumulated in the
program and written as per-program float32 partials (M, G, ...) that the launcher sums over G in a
fixed order: no atomics, results repeat bit for bit.

Ensembles: weights carry a leading member dim M; images b of the flat batch (M * B_per) belong to
member ``b // B_per``. Every dot has dims >= 16: C, P and d are padded (masked loads, zeros) to
powers of two >= 16. Math is float32; 16-bit inputs round q, k, v, p and the attention output to the
input dtype before each product, as the torch composition does. N <= MAX_N = 256.

This module imports nothing from ``fastscore``.
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from ._common import (
    LOG2E,
    TL_DTYPES,
    TL_LOG2E,
    config_key,
    dot_precision,
    dot_precisions,
    feature_block,
    make_config,
)
from .top1 import _gumbel

MAX_N = 256
#: largest C, d and P = 9c the kernels take
MAX_FEATURES = 128
KINDS = {"softmax": 0, "identity": 1, "top1": 2}
_INT_ARGS = ("seed", "B_per", "NB", "N", "H", "Wd", "C", "P", "D", "ipp",
             *(f"stride_{t}{a}" for t in ("z", "x", "g") for a in "bchw"))


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _tokens(Z, b, offs, N, Wd, C, offs_c, sb, sc, sh, sw):
    """(len(offs), len(offs_c)) tile ``z[b, c, n]`` (n = h * Wd + w), zero outside n < N, c < C."""
    h = offs // Wd
    w = offs % Wd
    ptrs = Z + b * sb + offs_c[None, :] * sc + (h * sh + w * sw)[:, None]
    return tl.load(ptrs, mask=(offs[:, None] < N) & (offs_c[None, :] < C), other=0.0)


@triton.jit
def _patches(X, b, offs, N, H, Wd, P, offs_p, sb, sc, sh, sw):
    """(len(offs), len(offs_p)) tile of the 3x3 patch features of x[b] at pixels ``offs``: feature
    f = ch * 9 + k is x[b, ch, h + k // 3 - 1, w + k % 3 - 1], zero outside the image (zero padding)."""
    h = offs // Wd
    w = offs % Wd
    ch = offs_p // 9
    k = offs_p % 9
    hh = h[:, None] + (k // 3 - 1)[None, :]
    ww = w[:, None] + (k % 3 - 1)[None, :]
    mask = (offs[:, None] < N) & (offs_p[None, :] < P) & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < Wd)
    return tl.load(X + b * sb + ch[None, :] * sc + hh * sh + ww * sw, mask=mask, other=0.0)


@triton.jit
def _w_t(W, row0, D, col0, ncols, K, offs_cols, offs_d):
    """(len(offs_cols), len(offs_d)) tile ``W[row0 + e, col0 + c]`` at [c, e] of a row-major (rows, K)
    weight (the transpose of a row block), zero outside e < D, c < ncols."""
    ptrs = W + (row0 + offs_d)[None, :] * K + (col0 + offs_cols)[:, None]
    return tl.load(ptrs, mask=(offs_d[None, :] < D) & (offs_cols[:, None] < ncols), other=0.0)


@triton.jit
def _proj(zt, pt, W, Bias, j, D, C, P, offs_c, offs_p, offs_d, HAS_PATCH: tl.constexpr, PREC: tl.constexpr):
    """Projection j (0: q, 1: k, 2: v) of tokens: ``[zt, pt] W[j*D:(j+1)*D]^T + bias`` (float32)."""
    K = C + P
    acc = _dot(zt, _w_t(W, j * D, D, 0, C, K, offs_c, offs_d), PREC)
    if HAS_PATCH:
        acc += _dot(pt, _w_t(W, j * D, D, C, P, K, offs_p, offs_d), PREC)
    bias = tl.load(Bias + j * D + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
    return acc + bias[None, :]


@triton.jit
def _scores(q, k, seed, b, offs_m, offs_n, N, PREC: tl.constexpr, GUMBEL: tl.constexpr):
    """q_i . k_j (+ Gumbel noise g_ij), float32, (len(offs_m), len(offs_n))."""
    s = _dot(q, tl.trans(k), PREC)
    if GUMBEL:
        s += _gumbel(seed, b, offs_m, offs_n, N)
    return s


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_INT_ARGS)
def _block_fwd_kernel(
    Z, X, WQKV, BQKV, WO, BO, OUT, LSE, IDX, seed: tl.int64,
    stride_zb, stride_zc, stride_zh, stride_zw, stride_xb, stride_xc, stride_xh, stride_xw,
    B_per, NB, N, H, Wd, C, P, D, ipp, qk_scale,
    BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    KIND: tl.constexpr, HAS_PATCH: tl.constexpr, GUMBEL: tl.constexpr, PREC: tl.constexpr,
):
    """Block forward for query rows ``pid_m*BLOCK ...`` of images ``pid_b*ipp ...`` (clipped to NB).

    Z: (NB, C, H, W) embedding and X: (NB, c, H, W) input (patch features, HAS_PATCH), any strides;
    WQKV (M, 3D, C + P), BQKV (M, 3D), WO (M, C, D), BO (M, C): contiguous weights of member
    ``b // B_per`` (unused for identity, where D = C); OUT: (NB, C, H, W) contiguous; LSE: (NB, N)
    float32, log2-domain log-sum-exp of ``qk_scale * s`` (s = q.k, + Gumbel noise for top-1);
    IDX: (NB, N) int64 argmax (top-1 only). qk_scale: scale * log2(e) (top-1: log2(e) / T).
    """
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_n0 = tl.arange(0, BLOCK)
    offs_c = tl.arange(0, BLOCK_C)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    DT = Z.dtype.element_ty
    n_here = tl.minimum(ipp, NB - pid_b * ipp)
    for s_i in range(0, n_here):
        b = (pid_b * ipp + s_i).to(tl.int64)
        m = b // B_per
        wqkv = WQKV + m * (3 * D * (C + P))
        bqkv = BQKV + m * (3 * D)
        zq = _tokens(Z, b, offs_m, N, Wd, C, offs_c, stride_zb, stride_zc, stride_zh, stride_zw)
        pq = zq
        if HAS_PATCH:
            pq = _patches(X, b, offs_m, N, H, Wd, P, offs_p, stride_xb, stride_xc, stride_xh, stride_xw)
        if KIND == 1:
            q = zq
        else:
            q = _proj(zq, pq, wqkv, bqkv, 0, D, C, P, offs_c, offs_p, offs_d, HAS_PATCH, PREC).to(DT)
        m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK], dtype=tl.float32)
        acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
        best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        idx = tl.zeros([BLOCK], dtype=tl.int32)
        for start_n in range(0, N, BLOCK):
            offs_n = start_n + offs_n0
            zk = _tokens(Z, b, offs_n, N, Wd, C, offs_c, stride_zb, stride_zc, stride_zh, stride_zw)
            if KIND == 1:
                k = zk
                v = zk
            else:
                pk = zk
                if HAS_PATCH:
                    pk = _patches(X, b, offs_n, N, H, Wd, P, offs_p, stride_xb, stride_xc, stride_xh, stride_xw)
                k = _proj(zk, pk, wqkv, bqkv, 1, D, C, P, offs_c, offs_p, offs_d, HAS_PATCH, PREC).to(DT)
                v = _proj(zk, pk, wqkv, bqkv, 2, D, C, P, offs_c, offs_p, offs_d, HAS_PATCH, PREC).to(DT)
            s = _scores(q, k, seed, b, offs_m, offs_n, N, PREC, GUMBEL)
            s = tl.where(offs_n[None, :] < N, s, float("-inf"))
            if KIND == 2:
                # argmax of the raw scores: strict > keeps an earlier block's (lower) index on ties
                bmax = tl.max(s, 1)
                barg = tl.min(tl.where(s == bmax[:, None], offs_n[None, :], N), 1)
                upd = bmax > best
                best = tl.where(upd, bmax, best)
                idx = tl.where(upd, barg, idx)
            s = s * qk_scale
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            if KIND != 2:
                acc = acc * alpha[:, None] + _dot(p.to(DT), v, PREC)
            m_i = m_new
        if KIND == 2:
            # a_i = v[idx_i]: project the gathered token (one extra projection, no (N, d) buffer)
            zg = _tokens(Z, b, idx, N, Wd, C, offs_c, stride_zb, stride_zc, stride_zh, stride_zw)
            pg = zg
            if HAS_PATCH:
                pg = _patches(X, b, idx, N, H, Wd, P, offs_p, stride_xb, stride_xc, stride_xh, stride_xw)
            a = _proj(zg, pg, wqkv, bqkv, 2, D, C, P, offs_c, offs_p, offs_d, HAS_PATCH, PREC).to(DT)
            tl.store(IDX + b * N + offs_m, idx.to(tl.int64), mask=offs_m < N)
        else:
            a = (acc / l_i[:, None]).to(DT)
        if KIND == 1:
            o = a.to(tl.float32)
        else:
            wo = WO + m * (C * D)
            o = _dot(a, _w_t(wo, 0, C, 0, D, D, offs_d, offs_c), PREC)          # a W_out^T
            o += tl.load(BO + m * C + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)[None, :]
        out = zq.to(tl.float32) + o
        optrs = OUT + b * (C * N) + offs_c[None, :] * N + offs_m[:, None]
        tl.store(optrs, out.to(DT), mask=(offs_m[:, None] < N) & (offs_c[None, :] < C))
        tl.store(LSE + b * N + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < N)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _grad_out(G, b, offs, N, Wd, C, offs_c, sb, sc, sh, sw, wo, offs_d, D, KIND: tl.constexpr,
              PREC: tl.constexpr):
    """(g, da): the output gradient tile g (BLOCK, BLOCK_C) and ``da = g W_out`` (identity: g), float32."""
    g = _tokens(G, b, offs, N, Wd, C, offs_c, sb, sc, sh, sw)
    if KIND == 1:
        da = g.to(tl.float32)
    else:
        da = _dot(g, tl.trans(_w_t(wo, 0, C, 0, D, D, offs_d, offs_c)), PREC)   # (BLOCK, BLOCK_D)
    return g, da


@triton.jit(do_not_specialize=_INT_ARGS)
def _block_bwd_kernel(
    Z, X, WQKV, BQKV, WO, G, LSE, IDX, DELTA, DZ, DPATCH, PWQKV, PBQKV, PWO, PBO, seed: tl.int64,
    stride_zb, stride_zc, stride_zh, stride_zw, stride_xb, stride_xc, stride_xh, stride_xw,
    stride_gb, stride_gc, stride_gh, stride_gw,
    B_per, NB, N, H, Wd, C, P, D, ipp, qk_scale, sm_scale,
    BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    KIND: tl.constexpr, HAS_PATCH: tl.constexpr, GUMBEL: tl.constexpr, WRITE_DPATCH: tl.constexpr,
    PREC: tl.constexpr,
):
    """Block backward for images ``m*B_per + pid*ipp ...`` (clipped to the member) of member m =
    program_id(1); pid = program_id(0), G_progs = num_programs(0).

    Z, X, WQKV, BQKV, WO as in the forward; G: (NB, C, H, W) output gradient, any strides; LSE, IDX:
    the forward's; DELTA: (NB, N) float32 scratch (written, then read, by this program only);
    DZ: (NB, C, H, W) contiguous; DPATCH: (NB, N, P) float32 patch-feature gradient (WRITE_DPATCH);
    PWQKV (M, G_progs, 3D, C + P), PBQKV (M, G_progs, 3D), PWO (M, G_progs, C, D), PBO (M, G_progs, C):
    float32 partial weight gradients of this program (not for identity). sm_scale: the score scale
    (top-1: 1 / T); qk_scale = sm_scale * log2(e).
    """
    pid = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    nprog = tl.num_programs(0)
    offs0 = tl.arange(0, BLOCK)
    offs_c = tl.arange(0, BLOCK_C)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    DT = Z.dtype.element_ty
    K = C + P
    wqkv = WQKV + m * (3 * D * K)
    bqkv = BQKV + m * (3 * D)
    wo = WO + m * (C * D)
    # weight-gradient accumulators, transposed like the weight tiles: [input feature, output feature]
    gq_z = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
    gk_z = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
    gv_z = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
    gq_p = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    gk_p = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    gv_p = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    gbq = tl.zeros([BLOCK_D], dtype=tl.float32)
    gbk = tl.zeros([BLOCK_D], dtype=tl.float32)
    gbv = tl.zeros([BLOCK_D], dtype=tl.float32)
    go = tl.zeros([BLOCK_D, BLOCK_C], dtype=tl.float32)
    gbo = tl.zeros([BLOCK_C], dtype=tl.float32)
    n_here = tl.minimum(ipp, B_per - pid * ipp)
    for s_i in range(0, n_here):
        b = m * B_per + pid * ipp + s_i
        # ---- pass A: Delta_i = a_i . da_i (a: the softmax, or top-1 surrogate, output), dW_out
        for start_m in range(0, N, BLOCK):
            offs_m = start_m + offs0
            zq = _tokens(Z, b, offs_m, N, Wd, C, offs_c, stride_zb, stride_zc, stride_zh, stride_zw)
            pq = zq
            if HAS_PATCH:
                pq = _patches(X, b, offs_m, N, H, Wd, P, offs_p, stride_xb, stride_xc, stride_xh, stride_xw)
            if KIND == 1:
                q = zq
            else:
                q = _proj(zq, pq, wqkv, bqkv, 0, D, C, P, offs_c, offs_p, offs_d, HAS_PATCH, PREC).to(DT)
            g, da = _grad_out(G, b, offs_m, N, Wd, C, offs_c, stride_gb, stride_gc, stride_gh, stride_gw,
                              wo, offs_d, D, KIND, PREC)
            lse2 = tl.load(LSE + b * N + offs_m, mask=offs_m < N, other=0.0)
            a = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
            for start_n in range(0, N, BLOCK):
                offs_n = start_n + offs0
                zk = _tokens(Z, b, offs_n, N, Wd, C, offs_c, stride_zb, stride_zc, stride_zh, stride_zw)
                if KIND == 1:
                    v = zk
                    k = zk
                else:
                    pk = zk
                    if HAS_PATCH:
                        pk = _patches(X, b, offs_n, N, H, Wd, P, offs_p, stride_xb, stride_xc, stride_xh, stride_xw)
                    k = _proj(zk, pk, wqkv, bqkv, 1, D, C, P, offs_c, offs_p, offs_d, HAS_PATCH, PREC).to(DT)
                    v = _proj(zk, pk, wqkv, bqkv, 2, D, C, P, offs_c, offs_p, offs_d, HAS_PATCH, PREC).to(DT)
                s = _scores(q, k, seed, b, offs_m, offs_n, N, PREC, GUMBEL) * qk_scale
                p = tl.where(offs_n[None, :] < N, tl.math.exp2(s - lse2[:, None]), 0.0)
                a += _dot(p.to(DT), v, PREC)
            delta = tl.sum(a.to(DT).to(tl.float32) * da.to(DT).to(tl.float32), 1)
            tl.store(DELTA + b * N + offs_m, delta, mask=offs_m < N)
            if KIND != 1:
                if KIND == 2:
                    idx = tl.load(IDX + b * N + offs_m, mask=offs_m < N, other=0).to(tl.int32)
                    zg = _tokens(Z, b, idx, N, Wd, C, offs_c, stride_zb, stride_zc, stride_zh, stride_zw)
                    pg = zg
                    if HAS_PATCH:
                        pg = _patches(X, b, idx, N, H, Wd, P, offs_p, stride_xb, stride_xc, stride_xh, stride_xw)
                    a = _proj(zg, pg, wqkv, bqkv, 2, D, C, P, offs_c, offs_p, offs_d, HAS_PATCH, PREC)
                    a = tl.where(offs_m[:, None] < N, a, 0.0)
                go += _dot(tl.trans(a.to(DT)), g, PREC)
                gbo += tl.sum(g.to(tl.float32), 0)
        tl.debug_barrier()   # DELTA of every row is written before pass B reads it
        # ---- pass B: for token block j, dk_j and dv_j (j as key), dq_j (j as query), then dz_j
        for start_j in range(0, N, BLOCK):
            offs_j = start_j + offs0
            zj = _tokens(Z, b, offs_j, N, Wd, C, offs_c, stride_zb, stride_zc, stride_zh, stride_zw)
            pj = zj
            if HAS_PATCH:
                pj = _patches(X, b, offs_j, N, H, Wd, P, offs_p, stride_xb, stride_xc, stride_xh, stride_xw)
            if KIND == 1:
                qj = zj
                kj = zj
                vj = zj
            else:
                qj = _proj(zj, pj, wqkv, bqkv, 0, D, C, P, offs_c, offs_p, offs_d, HAS_PATCH, PREC).to(DT)
                kj = _proj(zj, pj, wqkv, bqkv, 1, D, C, P, offs_c, offs_p, offs_d, HAS_PATCH, PREC).to(DT)
                vj = _proj(zj, pj, wqkv, bqkv, 2, D, C, P, offs_c, offs_p, offs_d, HAS_PATCH, PREC).to(DT)
            gj, daj = _grad_out(G, b, offs_j, N, Wd, C, offs_c, stride_gb, stride_gc, stride_gh, stride_gw,
                                wo, offs_d, D, KIND, PREC)
            daj = daj.to(DT)
            lse2_j = tl.load(LSE + b * N + offs_j, mask=offs_j < N, other=0.0)
            delta_j = tl.load(DELTA + b * N + offs_j, mask=offs_j < N, other=0.0)
            dk = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
            dv = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
            dq = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
            for start_i in range(0, N, BLOCK):
                offs_i = start_i + offs0
                zi = _tokens(Z, b, offs_i, N, Wd, C, offs_c, stride_zb, stride_zc, stride_zh, stride_zw)
                if KIND == 1:
                    qi = zi
                    ki = zi
                    vi = zi
                else:
                    pi = zi
                    if HAS_PATCH:
                        pi = _patches(X, b, offs_i, N, H, Wd, P, offs_p, stride_xb, stride_xc, stride_xh, stride_xw)
                    qi = _proj(zi, pi, wqkv, bqkv, 0, D, C, P, offs_c, offs_p, offs_d, HAS_PATCH, PREC).to(DT)
                    ki = _proj(zi, pi, wqkv, bqkv, 1, D, C, P, offs_c, offs_p, offs_d, HAS_PATCH, PREC).to(DT)
                    vi = _proj(zi, pi, wqkv, bqkv, 2, D, C, P, offs_c, offs_p, offs_d, HAS_PATCH, PREC).to(DT)
                gi, dai = _grad_out(G, b, offs_i, N, Wd, C, offs_c, stride_gb, stride_gc, stride_gh, stride_gw,
                                    wo, offs_d, D, KIND, PREC)
                dai = dai.to(DT)
                lse2_i = tl.load(LSE + b * N + offs_i, mask=offs_i < N, other=0.0)
                delta_i = tl.load(DELTA + b * N + offs_i, mask=offs_i < N, other=0.0)
                valid = (offs_j[:, None] < N) & (offs_i[None, :] < N)
                # j as key, i as query: rows j, columns i
                sT = tl.trans(_scores(qi, kj, seed, b, offs_i, offs_j, N, PREC, GUMBEL)) * qk_scale
                pT = tl.where(valid, tl.math.exp2(sT - lse2_i[None, :]), 0.0)
                if KIND == 2:
                    idx_i = tl.load(IDX + b * N + offs_i, mask=offs_i < N, other=-1)
                    hard = tl.where(valid & (idx_i[None, :] == offs_j[:, None]), 1.0, 0.0)
                    dv += _dot(hard.to(DT), dai, PREC)
                else:
                    dv += _dot(pT.to(DT), dai, PREC)
                dsT = pT * (_dot(vj, tl.trans(dai), PREC) - delta_i[None, :])
                dk += _dot(dsT.to(DT), qi, PREC)
                # j as query, i as key: rows j, columns i
                s = _scores(qj, ki, seed, b, offs_j, offs_i, N, PREC, GUMBEL) * qk_scale
                p = tl.where(valid, tl.math.exp2(s - lse2_j[:, None]), 0.0)
                ds = p * (_dot(daj, tl.trans(vi), PREC) - delta_j[:, None])
                dq += _dot(ds.to(DT), ki, PREC)
            dq = dq * sm_scale
            dk = dk * sm_scale
            rows = (offs_j[:, None] < N) & (offs_c[None, :] < C)
            if KIND == 1:
                dz = gj.to(tl.float32) + dq + dk + dv
            else:
                dq16 = dq.to(DT)
                dk16 = dk.to(DT)
                dv16 = dv.to(DT)
                dz = gj.to(tl.float32)
                dz += _dot(dq16, tl.trans(_w_t(wqkv, 0, D, 0, C, K, offs_c, offs_d)), PREC)
                dz += _dot(dk16, tl.trans(_w_t(wqkv, D, D, 0, C, K, offs_c, offs_d)), PREC)
                dz += _dot(dv16, tl.trans(_w_t(wqkv, 2 * D, D, 0, C, K, offs_c, offs_d)), PREC)
                zjT = tl.trans(zj)
                gq_z += _dot(zjT, dq16, PREC)
                gk_z += _dot(zjT, dk16, PREC)
                gv_z += _dot(zjT, dv16, PREC)
                gbq += tl.sum(dq, 0)
                gbk += tl.sum(dk, 0)
                gbv += tl.sum(dv, 0)
                if HAS_PATCH:
                    pjT = tl.trans(pj)
                    gq_p += _dot(pjT, dq16, PREC)
                    gk_p += _dot(pjT, dk16, PREC)
                    gv_p += _dot(pjT, dv16, PREC)
                    if WRITE_DPATCH:
                        dp = _dot(dq16, tl.trans(_w_t(wqkv, 0, D, C, P, K, offs_p, offs_d)), PREC)
                        dp += _dot(dk16, tl.trans(_w_t(wqkv, D, D, C, P, K, offs_p, offs_d)), PREC)
                        dp += _dot(dv16, tl.trans(_w_t(wqkv, 2 * D, D, C, P, K, offs_p, offs_d)), PREC)
                        tl.store(DPATCH + b * (N * P) + offs_j[:, None] * P + offs_p[None, :], dp,
                                 mask=(offs_j[:, None] < N) & (offs_p[None, :] < P))
            tl.store(DZ + b * (C * N) + offs_c[None, :] * N + offs_j[:, None], dz.to(DZ.dtype.element_ty), mask=rows)
    if KIND != 1:
        slot = m * nprog + pid
        dmask = offs_d < D
        # [c, e] -> W[row0 + e, col0 + c]
        base = PWQKV + slot * (3 * D * K)
        zmask = (offs_c[:, None] < C) & dmask[None, :]
        tl.store(base + offs_d[None, :] * K + offs_c[:, None], gq_z, mask=zmask)
        tl.store(base + (D + offs_d)[None, :] * K + offs_c[:, None], gk_z, mask=zmask)
        tl.store(base + (2 * D + offs_d)[None, :] * K + offs_c[:, None], gv_z, mask=zmask)
        if HAS_PATCH:
            pmask = (offs_p[:, None] < P) & dmask[None, :]
            tl.store(base + offs_d[None, :] * K + C + offs_p[:, None], gq_p, mask=pmask)
            tl.store(base + (D + offs_d)[None, :] * K + C + offs_p[:, None], gk_p, mask=pmask)
            tl.store(base + (2 * D + offs_d)[None, :] * K + C + offs_p[:, None], gv_p, mask=pmask)
        bb = PBQKV + slot * (3 * D)
        tl.store(bb + offs_d, gbq, mask=dmask)
        tl.store(bb + D + offs_d, gbk, mask=dmask)
        tl.store(bb + 2 * D + offs_d, gbv, mask=dmask)
        # go[e, c] -> W_out[c, e]
        tl.store(PWO + slot * (C * D) + offs_c[None, :] * D + offs_d[:, None], go,
                 mask=(offs_c[None, :] < C) & dmask[:, None])
        tl.store(PBO + slot * C + offs_c, gbo, mask=offs_c < C)


# ----------------------------------------------------------------------------------------------
# heuristics and launchers
# ----------------------------------------------------------------------------------------------
#: backward programs per member: enough to fill a GPU, few enough that the float32 weight-gradient
#: partials (G x the weights) stay small; each program loops over ceil(B_per / G) images
MAX_BWD_PROGRAMS = 256


def token_block(n: int) -> int:
    """BLOCK (query and key rows per tile): next_pow2(N) clipped to [16, 64]."""
    return min(max(triton.next_power_of_2(int(n)), 16), 64)


def images_per_program(nb: int, n_blocks: int, n: int) -> int:
    """Images per forward program: several when one image is a single small block and the batch is
    large (short rows, as attorch does), keeping >= ~1024 programs; a divisor of nb when one is near."""
    want = max(1, min(8, nb // 1024)) if (n_blocks == 1 and n <= 16) else 1
    want = max(want, triton.cdiv(nb, 65535))
    for ipp in range(want, min(2 * want, nb) + 1):
        if nb % ipp == 0:
            return ipp
    return want


def launch_config(dtype: torch.dtype) -> tuple[int, int]:
    """(num_warps, num_stages); 8 warps (more registers per program: at 4 warps the study's shape
    spilled 2.5 KB forward, 8-11 KB backward in bf16 on sm_90a), 1 stage, until a GPU measurement."""
    return 8, 1


def check_inputs(kind: str, dtype: torch.dtype, n: int, c: int, p: int, d: int) -> None:
    """Raise TypeError / ValueError for what the kernels cannot take."""
    if dtype not in TL_DTYPES:
        raise TypeError(f"z: the Triton attention-block kernels take float32/float16/bfloat16, got {dtype}")
    if n > MAX_N:
        raise ValueError(f"z: the Triton attention-block kernels take N = H*W <= {MAX_N} tokens, got {n}")
    for name, val in (("C (z's channels)", c), ("P (9 x x's channels)", p), ("d (attention width)", d)):
        if val > MAX_FEATURES:
            raise ValueError(f"the Triton attention-block kernels take {name} <= {MAX_FEATURES}, got {val}")


def _meta(kind: str, C: int, P: int, D: int, N: int) -> dict:
    return dict(BLOCK=token_block(N), BLOCK_C=feature_block(C), BLOCK_P=feature_block(max(P, 1)),
                BLOCK_D=feature_block(C if kind == "identity" else D), KIND=KINDS[kind], HAS_PATCH=P > 0)


def _strides(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)  # type: ignore[return-value]


def _aligned(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` when its data is 16-byte aligned (what the compiled variants assume, as the JIT infers it
    from the pointer), else an aligned copy with the same strides (so launches stay ``compile_configs()``)."""
    if t is None or t.data_ptr() % 16 == 0:
        return t
    return torch.empty_like(t).copy_(t)


def _weights(kind: str, w_qkv, b_qkv, w_out, b_out, like: torch.Tensor):
    if kind == "identity":
        e = like.new_zeros(1)
        return e, e, e, e
    return tuple(_aligned(w.contiguous()) for w in (w_qkv, b_qkv, w_out, b_out))


def block_forward(z: torch.Tensor, x: torch.Tensor | None, w_qkv, b_qkv, w_out, b_out, *, kind: str,
                  members: int, qk_scale: float, gumbel: bool = False, seed: int = 0,
                  out: torch.Tensor | None = None):
    """Launch the forward. z: (NB, C, H, W); x: (NB, c, H, W) or None; weights (M, ...) contiguous-able
    (None for identity); ``members`` = M (NB = M * B_per); ``qk_scale``: the score scale (top-1: 1 / T).
    Returns (out (NB, C, H, W) contiguous, lse (NB, N) float32 log2-domain, idx (NB, N) int64 or None).
    ``out`` may be given (tests poison it): contiguous, fully overwritten."""
    NB, C, H, W = z.shape
    N = H * W
    P = 0 if x is None else 9 * x.shape[1]
    D = C if kind == "identity" else w_qkv.shape[-2] // 3
    check_inputs(kind, z.dtype, N, C, P, D)
    z, x = _aligned(z), _aligned(x)
    meta = _meta(kind, C, P, D, N)
    wq, bq, wo, bo = _weights(kind, w_qkv, b_qkv, w_out, b_out, z)
    if out is None:
        out = torch.empty((NB, C, H, W), device=z.device, dtype=z.dtype)
    lse = torch.empty((NB, N), device=z.device, dtype=torch.float32)
    idx = torch.empty((NB, N) if kind == "top1" else (1,), device=z.device, dtype=torch.int64)
    n_blocks = triton.cdiv(N, meta["BLOCK"])
    ipp = images_per_program(NB, n_blocks, N)
    nw, ns = launch_config(z.dtype)
    _block_fwd_kernel[(n_blocks, triton.cdiv(NB, ipp))](
        z, z if x is None else x, wq, bq, wo, bo, out, lse, idx, int(seed),
        *_strides(z), *_strides(x), NB // members, NB, N, H, W, C, P, D, ipp, float(qk_scale) * LOG2E,
        **meta, GUMBEL=bool(gumbel) and kind == "top1", PREC=dot_precision(z.dtype), num_warps=nw, num_stages=ns,
    )
    return out, lse, (idx if kind == "top1" else None)


def block_backward(g: torch.Tensor, z: torch.Tensor, x: torch.Tensor | None, w_qkv, b_qkv, w_out, b_out,
                   lse: torch.Tensor, idx: torch.Tensor | None, *, kind: str, members: int, sm_scale: float,
                   gumbel: bool = False, seed: int = 0, need_dpatch: bool = False):
    """Launch the backward. Returns (dz (NB, C, H, W) contiguous, dpatch (NB, N, P) float32 or None,
    dw_qkv (M, 3D, C+P), db_qkv (M, 3D), dw_out (M, C, D), db_out (M, C) float32 or None for identity):
    per-program partials summed over programs in a fixed order (deterministic)."""
    NB, C, H, W = z.shape
    N = H * W
    P = 0 if x is None else 9 * x.shape[1]
    D = C if kind == "identity" else w_qkv.shape[-2] // 3
    check_inputs(kind, z.dtype, N, C, P, D)
    g, z, x = _aligned(g), _aligned(z), _aligned(x)
    meta = _meta(kind, C, P, D, N)
    wq, bq, wo, _ = _weights(kind, w_qkv, b_qkv, w_out, b_out, z)
    B_per = NB // members
    ipp = triton.cdiv(B_per, min(B_per, MAX_BWD_PROGRAMS))
    nprog = triton.cdiv(B_per, ipp)
    dev, f32 = z.device, torch.float32
    dz = torch.empty((NB, C, H, W), device=dev, dtype=z.dtype)
    delta = torch.empty((NB, N), device=dev, dtype=f32)
    dpatch = torch.empty((NB, N, P), device=dev, dtype=f32) if (need_dpatch and P) else delta
    weighted = kind != "identity"
    K = C + P
    shp = ((3 * D, K), (3 * D,), (C, D), (C,)) if weighted else ((1,),) * 4
    parts = [torch.empty((members, nprog, *s), device=dev, dtype=f32) for s in shp]
    nw, ns = launch_config(z.dtype)
    _block_bwd_kernel[(nprog, members)](
        z, z if x is None else x, wq, bq, wo, g, lse, torch.zeros(1, device=dev, dtype=torch.int64) if idx is None else idx, delta, dz, dpatch, *parts,
        int(seed), *_strides(z), *_strides(x), *_strides(g), B_per, NB, N, H, W, C, P, D, ipp,
        float(sm_scale) * LOG2E, float(sm_scale),
        **meta, GUMBEL=bool(gumbel) and kind == "top1", WRITE_DPATCH=bool(need_dpatch and P), PREC=dot_precision(z.dtype),
        num_warps=nw, num_stages=ns,
    )
    grads = tuple(p.sum(1) for p in parts) if weighted else (None,) * 4
    return (dz, dpatch if (need_dpatch and P) else None, *grads)


# ----------------------------------------------------------------------------------------------
# ahead-of-time compile configurations
# ----------------------------------------------------------------------------------------------
#: the study's shapes and their neighbours, (N, C, P, d), and the smallest blocks (N, C, d <= 16, c = 1:
#: what the GPU-compile guard launches)
STUDY_SHAPES = ((64, 64, 27, 64), (64, 64, 0, 64), (64, 64, 27, 16), (256, 64, 27, 64), (64, 16, 27, 16),
                (16, 16, 9, 16), (16, 16, 0, 16))


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def compile_configs(dtypes=("fp32", "bf16")) -> list[dict]:
    """The configurations the launchers launch at ``STUDY_SHAPES``: forward and backward, each kind
    (identity only without patches), GUMBEL for top-1, WRITE_DPATCH (the dx path) with patches, and
    for float32 each dot precision of the fp32 policy (``_common.dot_precisions``).
    Each a ``make_config`` dict."""
    out = []
    data = {"Z", "X", "WQKV", "BQKV", "WO", "BO", "OUT", "G", "DZ"}      # pointers of the data dtype
    f32_ptrs = {"LSE", "DELTA", "DPATCH", "PWQKV", "PBQKV", "PWO", "PBO"}
    for dt, (n, c, p, d), kind in itertools.product(dtypes, STUDY_SHAPES, KINDS):
        if kind == "identity" and p:
            continue
        nw, ns = launch_config(torch.float32)
        meta = _meta(kind, c, p, d, n)
        bwd = [(_block_bwd_kernel, {"WRITE_DPATCH": w}) for w in ((False, True) if p else (False,))]
        for fn, extra in [(_block_fwd_kernel, {}), *bwd]:
            gumbels = (False, True) if kind == "top1" else (False,)
            for gumbel, prec in itertools.product(gumbels, dot_precisions(_DTYPES[dt])):
                args = set(fn.arg_names)
                pointers = {a: (None if a in data else "i64" if a == "IDX" else "fp32")
                            for a in args & (data | f32_ptrs | {"IDX"})}
                const = dict(meta, GUMBEL=gumbel, PREC=prec, **extra)
                cfg = make_config(f"attention_block.{fn.__name__}.{kind}", fn, dt, const, nw, ns,
                                  pointers=pointers, fp32=tuple(a for a in ("qk_scale", "sm_scale") if a in args),
                                  i64=("seed",), aligned=tuple(pointers))
                if all(config_key(cfg) != config_key(o) for o in out):   # N = 64 and 256 share BLOCK = 64
                    out.append(cfg)
    return out


__all__ = ["block_forward", "block_backward", "check_inputs", "compile_configs", "MAX_N", "MAX_FEATURES",
           "TL_LOG2E"]
