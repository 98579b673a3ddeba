"""The fused patch-attention block: ScoreNet's whole attention layer, one forward kernel and a backward in two.

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
Backward (``_block_bwd_kernel``): one program per group of images; recomputes everything from z, x and
the weights: pass A (per query block) recomputes ``a`` and writes ``Delta_i = a_i . da_i`` (B, N)
float32 and ``a`` itself (the hard one for top-1); pass B (per token block j) gets dk_j, dv_j (j as
key, loop B1) then dq_j (j as query, loop B2), writes them to ``DQKV`` and maps them back through the
projections to dz_j (and, when asked, the patch-feature gradient, from which the op computes dx).
Weight gradients (``_block_wgrad_kernel``): one program per (target, split of the member's images,
member), each a sum over its images of ``u^T dq/dk/dv`` (u = [z; patches]) or ``a^T g``, written as a
float32 partial per (member, split) that the launcher sums over splits in a fixed order: no atomics,
results repeat bit for bit. Keeping them out of the backward's registers is what lets it run without
spills (docs/attention-block.md).

Memory layout: z, x and the output gradient are read as contiguous NCHW (the launcher copies other
layouts), so a token tile is contiguous along the pixels; ``N_MULT`` (16 when N is a multiple of 16)
tells the compiler so, for vector loads, without specialising the integer N. The weights are packed by
the launcher (``pack_weights``) transposed and zero-padded to the blocks, so their tiles load without
masks from aligned rows.

Ensembles: weights carry a leading member dim M; images b of the flat batch (M * B_per) belong to
member ``b // B_per``. Every dot has dims >= 16: C, P and d are padded (zeros) to powers of two >= 16.
Math is float32; 16-bit inputs round q, k, v, p and the attention output to the input dtype before each
product, as the torch composition does. N <= MAX_N = 256.

This module imports nothing from ``fastscore``.
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from ._common import (
    LOG2E,
    MAXNREG,
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
_INT_ARGS = ("seed", "B_per", "NB", "N", "H", "Wd", "C", "P", "ipp", "ipw")


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _tokens(Z, b, offs, N, C, offs_c):
    """(len(offs), len(offs_c)) tile ``z[b, c, n]`` of a contiguous (NB, C, N) tensor, zero outside
    n < N, c < C (contiguous along n: vector loads when N is a known multiple of 16)."""
    ptrs = (Z + b * (C * N)) + (offs_c[None, :] * N + offs[:, None])
    return tl.load(ptrs, mask=(offs[:, None] < N) & (offs_c[None, :] < C), other=0.0)


@triton.jit
def _patches(X, b, offs, N, H, Wd, P, offs_p):
    """(len(offs), len(offs_p)) tile of the 3x3 patch features of a contiguous x (NB, P // 9, H, Wd) at
    image b, pixels ``offs``: feature f = ch * 9 + k is x[b, ch, h + k // 3 - 1, w + k % 3 - 1], zero
    outside the image (zero padding)."""
    h = offs // Wd
    w = offs % Wd
    ch = offs_p // 9
    k = offs_p % 9
    hh = h[:, None] + (k // 3 - 1)[None, :]
    ww = w[:, None] + (k % 3 - 1)[None, :]
    mask = (offs[:, None] < N) & (offs_p[None, :] < P) & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < Wd)
    return tl.load((X + b * ((P // 9) * N)) + (ch[None, :] * N + hh * Wd + ww), mask=mask, other=0.0)


@triton.jit
def _rows(T, b, offs, N, j, J: tl.constexpr, offs_d, BLOCK_D: tl.constexpr):
    """(len(offs), BLOCK_D) tile ``t[b, n, j, :]`` of a contiguous (NB, N, J, BLOCK_D) buffer, zero for n >= N."""
    ptrs = T + ((b * N + offs)[:, None] * J + j) * BLOCK_D + offs_d[None, :]
    return tl.load(ptrs, mask=offs[:, None] < N, other=0.0)


@triton.jit
def _store_rows(T, b, offs, N, j, J: tl.constexpr, offs_d, BLOCK_D: tl.constexpr, val):
    tl.store(T + ((b * N + offs)[:, None] * J + j) * BLOCK_D + offs_d[None, :], val, mask=offs[:, None] < N)


@triton.jit
def _wt(WT, m, j, r0, offs_r, offs_d, KB: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``r0 + offs_r`` of projection j's packed, zero-padded W^T (M, 3, KB, BLOCK_D): [input, output]."""
    return tl.load(WT + ((m * 3 + j) * KB + r0 + offs_r)[:, None] * BLOCK_D + offs_d[None, :])


@triton.jit
def _proj(zt, pt, WT, BT, m, j, offs_c, offs_p, offs_d, BLOCK_C: tl.constexpr, KB: tl.constexpr,
          BLOCK_D: tl.constexpr, HAS_PATCH: tl.constexpr, PREC: tl.constexpr):
    """Projection j (0: q, 1: k, 2: v) of tokens: ``[zt, pt] W_j^T + b_j`` (float32, (rows, BLOCK_D))."""
    acc = _dot(zt, _wt(WT, m, j, 0, offs_c, offs_d, KB, BLOCK_D), PREC)
    if HAS_PATCH:
        acc += _dot(pt, _wt(WT, m, j, BLOCK_C, offs_p, offs_d, KB, BLOCK_D), PREC)
    return acc + tl.load(BT + (m * 3 + j) * BLOCK_D + offs_d).to(tl.float32)[None, :]


@triton.jit
def _back(dproj, WT, m, j, r0, offs_r, offs_d, KB: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """``dproj W_j[:, r0 + offs_r]``: a projection's gradient mapped back to its inputs (float32)."""
    return _dot(dproj, tl.trans(_wt(WT, m, j, r0, offs_r, offs_d, KB, BLOCK_D)), PREC)


@triton.jit
def _scores(q, k, seed, b, offs_m, offs_n, N, PREC: tl.constexpr, GUMBEL: tl.constexpr):
    """q_i . k_j (+ Gumbel noise g_ij), float32, (len(offs_m), len(offs_n))."""
    s = _dot(q, tl.trans(k), PREC)
    if GUMBEL:
        s += _gumbel(seed, b, offs_m, offs_n, N)
    return s


@triton.jit
def _qkv(Z, X, WT, BT, b, m, offs, N, H, Wd, C, P, offs_c, offs_p, offs_d, J: tl.constexpr,
         BLOCK_C: tl.constexpr, KB: tl.constexpr, BLOCK_D: tl.constexpr, KIND: tl.constexpr,
         HAS_PATCH: tl.constexpr, PREC: tl.constexpr):
    """Projection J of the tokens ``offs`` of image b in the data dtype (identity: the tokens)."""
    zt = _tokens(Z, b, offs, N, C, offs_c)
    if KIND == 1:
        return zt
    pt = zt
    if HAS_PATCH:
        pt = _patches(X, b, offs, N, H, Wd, P, offs_p)
    return _proj(zt, pt, WT, BT, m, J, offs_c, offs_p, offs_d, BLOCK_C, KB, BLOCK_D, HAS_PATCH, PREC).to(Z.dtype.element_ty)


@triton.jit
def _kv(Z, X, WT, BT, b, m, offs, N, H, Wd, C, P, offs_c, offs_p, offs_d, BLOCK_C: tl.constexpr, KB: tl.constexpr,
        BLOCK_D: tl.constexpr, KIND: tl.constexpr, HAS_PATCH: tl.constexpr, PREC: tl.constexpr):
    """(k, v) of the tokens ``offs`` of image b, sharing one load of the tokens and patches."""
    zt = _tokens(Z, b, offs, N, C, offs_c)
    if KIND == 1:
        return zt, zt
    pt = zt
    if HAS_PATCH:
        pt = _patches(X, b, offs, N, H, Wd, P, offs_p)
    DT = Z.dtype.element_ty
    k = _proj(zt, pt, WT, BT, m, 1, offs_c, offs_p, offs_d, BLOCK_C, KB, BLOCK_D, HAS_PATCH, PREC).to(DT)
    v = _proj(zt, pt, WT, BT, m, 2, offs_c, offs_p, offs_d, BLOCK_C, KB, BLOCK_D, HAS_PATCH, PREC).to(DT)
    return k, v


@triton.jit
def _grad_a(G, WOT, b, m, offs, N, C, offs_c, offs_d, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
            KIND: tl.constexpr, PREC: tl.constexpr):
    """``da = g W_out`` (identity: g) of the tokens ``offs``, in the data dtype, (rows, BLOCK_D)."""
    g = _tokens(G, b, offs, N, C, offs_c)
    if KIND == 1:
        return g
    wo = tl.load(WOT + (m * BLOCK_D + offs_d)[:, None] * BLOCK_C + offs_c[None, :])     # [e, c]
    return _dot(g, tl.trans(wo), PREC).to(G.dtype.element_ty)


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_INT_ARGS)
def _block_fwd_kernel(
    Z, X, WT, BT, WOT, BO, OUT, LSE, IDX, seed: tl.int64,
    B_per, NB, N, H, Wd, C, P, ipp, qk_scale,
    BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    KIND: tl.constexpr, HAS_PATCH: tl.constexpr, GUMBEL: tl.constexpr, PREC: tl.constexpr, N_MULT: tl.constexpr,
):
    """Block forward for query rows ``pid_m*BLOCK ...`` of images ``pid_b*ipp ...`` (clipped to NB).

    Z: (NB, C, H, W) embedding, X: (NB, P // 9, H, W) input (HAS_PATCH), contiguous; WT (M, 3, KB,
    BLOCK_D), BT (M, 3, BLOCK_D), WOT (M, BLOCK_D, BLOCK_C), BO (M, BLOCK_C): the packed, zero-padded
    weights of member ``b // B_per`` (``pack_weights``; unused for identity, where BLOCK_D = BLOCK_C);
    OUT: (NB, C, H, W) contiguous; LSE: (NB, N) float32, log2-domain log-sum-exp of ``qk_scale * s``
    (s = q.k, + Gumbel noise for top-1); IDX: (NB, N) int64 argmax (top-1 only). qk_scale: scale *
    log2(e) (top-1: log2(e) / T). N_MULT: 16 when N is a multiple of 16, else 1 (vector loads).
    """
    N = (N // N_MULT) * N_MULT          # the same value; tells the compiler its divisibility
    KB: tl.constexpr = BLOCK_C + BLOCK_P if HAS_PATCH else BLOCK_C
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
        q = _qkv(Z, X, WT, BT, b, m, offs_m, N, H, Wd, C, P, offs_c, offs_p, offs_d, 0, BLOCK_C, KB, BLOCK_D,
                 KIND, HAS_PATCH, PREC)
        m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK], dtype=tl.float32)
        acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
        best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        idx = tl.zeros([BLOCK], dtype=tl.int32)
        for start_n in range(0, N, BLOCK):
            offs_n = start_n + offs_n0
            k, v = _kv(Z, X, WT, BT, b, m, offs_n, N, H, Wd, C, P, offs_c, offs_p, offs_d, BLOCK_C, KB, BLOCK_D,
                       KIND, HAS_PATCH, PREC)
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
            a = _qkv(Z, X, WT, BT, b, m, idx, N, H, Wd, C, P, offs_c, offs_p, offs_d, 2, BLOCK_C, KB, BLOCK_D,
                     KIND, HAS_PATCH, PREC)
            tl.store(IDX + b * N + offs_m, idx.to(tl.int64), mask=offs_m < N)
        else:
            a = (acc / l_i[:, None]).to(DT)
        if KIND == 1:
            o = a.to(tl.float32)
        else:
            wo = tl.load(WOT + (m * BLOCK_D + offs_d)[:, None] * BLOCK_C + offs_c[None, :])      # [e, c]
            o = _dot(a, wo, PREC) + tl.load(BO + m * BLOCK_C + offs_c).to(tl.float32)[None, :]
        # the residual: z reloaded (cache-hot) rather than kept live across the key loop
        out = _tokens(Z, b, offs_m, N, C, offs_c).to(tl.float32) + o
        optrs = (OUT + b * (C * N)) + (offs_c[None, :] * N + offs_m[:, None])
        tl.store(optrs, out.to(DT), mask=(offs_m[:, None] < N) & (offs_c[None, :] < C))
        tl.store(LSE + b * N + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < N)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_INT_ARGS)
def _block_bwd_kernel(
    Z, X, WT, BT, WOT, G, LSE, IDX, DELTA, DZ, DPATCH, AOUT, DQKV, seed: tl.int64,
    B_per, NB, N, H, Wd, C, P, ipp, qk_scale, sm_scale,
    BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    KIND: tl.constexpr, HAS_PATCH: tl.constexpr, GUMBEL: tl.constexpr, WRITE_DPATCH: tl.constexpr,
    PREC: tl.constexpr, N_MULT: tl.constexpr,
):
    """Block backward of images ``pid*ipp ...`` (clipped to NB): dz, the patch-feature gradient and what
    the weight-gradient kernel reads; no reduction over images, so no partials.

    Z, X, WT, BT, WOT as in the forward; G: (NB, C, H, W) output gradient, contiguous; LSE, IDX: the
    forward's; DELTA: (NB, N) float32 scratch (written, then read, by this program only);
    DZ: (NB, C, H, W) contiguous; DPATCH: (NB, N, P) float32 patch-feature gradient (WRITE_DPATCH);
    AOUT: (NB, N, BLOCK_D) the attention output a (top-1: the hard one) and DQKV: (NB, N, 3, BLOCK_D)
    the gradients of q, k, v, both in the data dtype (not for identity). sm_scale: the score scale
    (top-1: 1 / T); qk_scale = sm_scale * log2(e).
    """
    N = (N // N_MULT) * N_MULT
    KB: tl.constexpr = BLOCK_C + BLOCK_P if HAS_PATCH else BLOCK_C
    pid = tl.program_id(0)
    offs0 = tl.arange(0, BLOCK)
    offs_c = tl.arange(0, BLOCK_C)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    DT = Z.dtype.element_ty
    n_here = tl.minimum(ipp, NB - pid * ipp)
    for s_i in range(0, n_here):
        b = (pid * ipp + s_i).to(tl.int64)
        m = b // B_per
        # ---- pass A: Delta_i = a_i . da_i (a: the softmax, or top-1 surrogate, output); a for dW_out
        for start_m in range(0, N, BLOCK):
            offs_m = start_m + offs0
            q = _qkv(Z, X, WT, BT, b, m, offs_m, N, H, Wd, C, P, offs_c, offs_p, offs_d, 0, BLOCK_C, KB, BLOCK_D,
                     KIND, HAS_PATCH, PREC)
            lse2 = tl.load(LSE + b * N + offs_m, mask=offs_m < N, other=0.0)
            a = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
            for start_n in range(0, N, BLOCK):
                offs_n = start_n + offs0
                k, v = _kv(Z, X, WT, BT, b, m, offs_n, N, H, Wd, C, P, offs_c, offs_p, offs_d, BLOCK_C, KB, BLOCK_D,
                           KIND, HAS_PATCH, PREC)
                s = _scores(q, k, seed, b, offs_m, offs_n, N, PREC, GUMBEL) * qk_scale
                p = tl.where(offs_n[None, :] < N, tl.math.exp2(s - lse2[:, None]), 0.0)
                a += _dot(p.to(DT), v, PREC)
            da = _grad_a(G, WOT, b, m, offs_m, N, C, offs_c, offs_d, BLOCK_C, BLOCK_D, KIND, PREC)
            delta = tl.sum(a.to(DT).to(tl.float32) * da.to(tl.float32), 1)
            tl.store(DELTA + b * N + offs_m, delta, mask=offs_m < N)
            if KIND != 1:
                if KIND == 2:
                    idx = tl.load(IDX + b * N + offs_m, mask=offs_m < N, other=0).to(tl.int32)
                    a = _qkv(Z, X, WT, BT, b, m, idx, N, H, Wd, C, P, offs_c, offs_p, offs_d, 2, BLOCK_C, KB,
                             BLOCK_D, KIND, HAS_PATCH, PREC)
                _store_rows(AOUT, b, offs_m, N, 0, 1, offs_d, BLOCK_D, a.to(DT))
        tl.debug_barrier()   # DELTA of every row is written before pass B reads it
        # ---- pass B, per token block j: B1 dk_j, dv_j (j as key), B2 dq_j (j as query); dz_j from them
        for start_j in range(0, N, BLOCK):
            offs_j = start_j + offs0
            # B1: j as key, i as query; rows j, columns i
            kj, vj = _kv(Z, X, WT, BT, b, m, offs_j, N, H, Wd, C, P, offs_c, offs_p, offs_d, BLOCK_C, KB, BLOCK_D,
                         KIND, HAS_PATCH, PREC)
            dk = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
            dv = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
            for start_i in range(0, N, BLOCK):
                offs_i = start_i + offs0
                qi = _qkv(Z, X, WT, BT, b, m, offs_i, N, H, Wd, C, P, offs_c, offs_p, offs_d, 0, BLOCK_C, KB, BLOCK_D,
                          KIND, HAS_PATCH, PREC)
                dai = _grad_a(G, WOT, b, m, offs_i, N, C, offs_c, offs_d, BLOCK_C, BLOCK_D, KIND, PREC)
                lse2_i = tl.load(LSE + b * N + offs_i, mask=offs_i < N, other=0.0)
                delta_i = tl.load(DELTA + b * N + offs_i, mask=offs_i < N, other=0.0)
                valid = (offs_j[:, None] < N) & (offs_i[None, :] < N)
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
            dk = dk * sm_scale
            if KIND == 1:
                dz = dk + dv
            else:   # kept in DQKV (read back below and by the weight-gradient kernel), not in registers
                _store_rows(DQKV, b, offs_j, N, 1, 3, offs_d, BLOCK_D, dk.to(DT))
                _store_rows(DQKV, b, offs_j, N, 2, 3, offs_d, BLOCK_D, dv.to(DT))
            # B2: j as query, i as key; rows j, columns i
            qj = _qkv(Z, X, WT, BT, b, m, offs_j, N, H, Wd, C, P, offs_c, offs_p, offs_d, 0, BLOCK_C, KB, BLOCK_D,
                      KIND, HAS_PATCH, PREC)
            daj = _grad_a(G, WOT, b, m, offs_j, N, C, offs_c, offs_d, BLOCK_C, BLOCK_D, KIND, PREC)
            lse2_j = tl.load(LSE + b * N + offs_j, mask=offs_j < N, other=0.0)
            delta_j = tl.load(DELTA + b * N + offs_j, mask=offs_j < N, other=0.0)
            dq = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
            for start_i in range(0, N, BLOCK):
                offs_i = start_i + offs0
                ki, vi = _kv(Z, X, WT, BT, b, m, offs_i, N, H, Wd, C, P, offs_c, offs_p, offs_d, BLOCK_C, KB,
                             BLOCK_D, KIND, HAS_PATCH, PREC)
                valid = (offs_j[:, None] < N) & (offs_i[None, :] < N)
                s = _scores(qj, ki, seed, b, offs_j, offs_i, N, PREC, GUMBEL) * qk_scale
                p = tl.where(valid, tl.math.exp2(s - lse2_j[:, None]), 0.0)
                ds = p * (_dot(daj, tl.trans(vi), PREC) - delta_j[:, None])
                dq += _dot(ds.to(DT), ki, PREC)
            dq = dq * sm_scale
            if KIND == 1:
                dz += dq
            else:
                _store_rows(DQKV, b, offs_j, N, 0, 3, offs_d, BLOCK_D, dq.to(DT))
                tl.debug_barrier()   # this block's dq, dk, dv rows are in DQKV before they are read back
                dq16 = _rows(DQKV, b, offs_j, N, 0, 3, offs_d, BLOCK_D)
                dk16 = _rows(DQKV, b, offs_j, N, 1, 3, offs_d, BLOCK_D)
                dv16 = _rows(DQKV, b, offs_j, N, 2, 3, offs_d, BLOCK_D)
                if WRITE_DPATCH:
                    dp = _back(dq16, WT, m, 0, BLOCK_C, offs_p, offs_d, KB, BLOCK_D, PREC)
                    dp += _back(dk16, WT, m, 1, BLOCK_C, offs_p, offs_d, KB, BLOCK_D, PREC)
                    dp += _back(dv16, WT, m, 2, BLOCK_C, offs_p, offs_d, KB, BLOCK_D, PREC)
                    tl.store(DPATCH + (b * N + offs_j)[:, None] * P + offs_p[None, :], dp,
                             mask=(offs_j[:, None] < N) & (offs_p[None, :] < P))
                dz = _back(dq16, WT, m, 0, 0, offs_c, offs_d, KB, BLOCK_D, PREC)
                dz += _back(dk16, WT, m, 1, 0, offs_c, offs_d, KB, BLOCK_D, PREC)
                dz += _back(dv16, WT, m, 2, 0, offs_c, offs_d, KB, BLOCK_D, PREC)
            dz += _tokens(G, b, offs_j, N, C, offs_c).to(tl.float32)            # the residual
            tl.store((DZ + b * (C * N)) + (offs_c[None, :] * N + offs_j[:, None]), dz.to(DT),
                     mask=(offs_j[:, None] < N) & (offs_c[None, :] < C))


@triton.jit(do_not_specialize=_INT_ARGS)
def _block_wgrad_kernel(
    Z, X, G, AOUT, DQKV, PW, PB, PWO, PBO,
    B_per, N, H, Wd, C, P, ipw,
    BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_PATCH: tl.constexpr, PREC: tl.constexpr, N_MULT: tl.constexpr,
):
    """Weight gradients of images ``m*B_per + s*ipw ...`` (clipped to the member) of member m =
    program_id(2), split s = program_id(1) of G = num_programs(1); target t = program_id(0):
    t < 3: ``W_j^T[:C]`` (z columns) of projection j = t and its bias; 3 <= t < 6 (HAS_PATCH): the patch
    columns of projection t - 3; t = 3 (no patches) or 6: ``W_out^T`` and its bias.

    Z, X, G, AOUT, DQKV as in the backward; float32 partials of this (member, split) slot, every element
    written (zeros in the padding): PW (M, G, 3, KB, BLOCK_D), PB (M, G, 3, BLOCK_D), PWO (M, G, BLOCK_D,
    BLOCK_C), PBO (M, G, BLOCK_C). The launcher sums them over G in a fixed order: no atomics.
    """
    N = (N // N_MULT) * N_MULT
    KB: tl.constexpr = BLOCK_C + BLOCK_P if HAS_PATCH else BLOCK_C
    LAST: tl.constexpr = 6 if HAS_PATCH else 3
    t = tl.program_id(0)
    s = tl.program_id(1)
    m = tl.program_id(2).to(tl.int64)
    slot = m * tl.num_programs(1) + s
    offs0 = tl.arange(0, BLOCK)
    offs_c = tl.arange(0, BLOCK_C)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    b0 = m * B_per + s * ipw
    n_here = tl.minimum(ipw, B_per - s * ipw)
    if t == LAST:
        acc_o = tl.zeros([BLOCK_D, BLOCK_C], dtype=tl.float32)
        bias_o = tl.zeros([BLOCK_C], dtype=tl.float32)
        for s_i in range(0, n_here):
            b = b0 + s_i
            for start in range(0, N, BLOCK):
                offs = start + offs0
                g = _tokens(G, b, offs, N, C, offs_c)
                a = _rows(AOUT, b, offs, N, 0, 1, offs_d, BLOCK_D)
                acc_o += _dot(tl.trans(a), g, PREC)
                bias_o += tl.sum(g.to(tl.float32), 0)
        tl.store(PWO + (slot * BLOCK_D + offs_d)[:, None] * BLOCK_C + offs_c[None, :], acc_o)
        tl.store(PBO + slot * BLOCK_C + offs_c, bias_o)
    elif t < 3:
        acc_z = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
        bias_z = tl.zeros([BLOCK_D], dtype=tl.float32)
        for s_i in range(0, n_here):
            b = b0 + s_i
            for start in range(0, N, BLOCK):
                offs = start + offs0
                zt = _tokens(Z, b, offs, N, C, offs_c)
                dp = _rows(DQKV, b, offs, N, t, 3, offs_d, BLOCK_D)
                acc_z += _dot(tl.trans(zt), dp, PREC)
                bias_z += tl.sum(dp.to(tl.float32), 0)
        tl.store(PW + ((slot * 3 + t) * KB + offs_c)[:, None] * BLOCK_D + offs_d[None, :], acc_z)
        tl.store(PB + (slot * 3 + t) * BLOCK_D + offs_d, bias_z)
    else:
        if HAS_PATCH:
            j = t - 3
            acc_p = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
            for s_i in range(0, n_here):
                b = b0 + s_i
                for start in range(0, N, BLOCK):
                    offs = start + offs0
                    pt = _patches(X, b, offs, N, H, Wd, P, offs_p)
                    dp = _rows(DQKV, b, offs, N, j, 3, offs_d, BLOCK_D)
                    acc_p += _dot(tl.trans(pt), dp, PREC)
            tl.store(PW + ((slot * 3 + j) * KB + BLOCK_C + offs_p)[:, None] * BLOCK_D + offs_d[None, :], acc_p)


# ----------------------------------------------------------------------------------------------
# heuristics and launchers
# ----------------------------------------------------------------------------------------------
#: (member, split) slots of the weight-gradient reduction per launch: enough programs (x 4 or 7 targets)
#: to fill a GPU, few enough that the float32 partials (slots x the padded weights) stay small
MAX_WGRAD_SLOTS = 128


def token_block(n: int) -> int:
    """BLOCK (query and key rows per tile, forward and backward): next_pow2(N) clipped to [16, 32]. 64
    spilled in the backward on sm_90a in bf16 (docs/attention-block.md); one size for both passes keeps
    the backward's recomputed scores the forward's bit for bit where the dot's tile shape matters (the
    interpreter's matmul: top-1's unscaled surrogate logits amplify an ulp)."""
    return min(max(triton.next_power_of_2(int(n)), 16), 32)


def images_per_program(nb: int, n_blocks: int, n: int) -> int:
    """Images per program: several when one image is a single small block and the batch is large
    (short rows, as attorch does), keeping >= ~1024 programs; a divisor of nb when one is near."""
    want = max(1, min(8, nb // 1024)) if (n_blocks == 1 and n <= 16) else 1
    want = max(want, triton.cdiv(nb, 65535))
    for ipp in range(want, min(2 * want, nb) + 1):
        if nb % ipp == 0:
            return ipp
    return want


def wgrad_splits(b_per: int, members: int) -> tuple[int, int]:
    """(G, images per split) of the weight-gradient reduction of ``members`` members of ``b_per`` images."""
    ipw = triton.cdiv(b_per, max(1, min(b_per, MAX_WGRAD_SLOTS // members)))
    return triton.cdiv(b_per, ipw), ipw


def launch_config() -> tuple[int, int]:
    """(num_warps, num_stages) of the forward and the backward: 8 warps, 1 stage, from ``ptxas -v`` on sm_80
    and sm_90a at the study's shapes (no spills; docs/attention-block.md), until a GPU measurement."""
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
                BLOCK_D=feature_block(C if kind == "identity" else D), HAS_PATCH=P > 0,
                N_MULT=16 if N % 16 == 0 else 1)


def _data(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` contiguous with 16-byte aligned data (what the kernels index and the compiled variants assume):
    ``t`` itself when it is, else a copy."""
    if t is None or (t.is_contiguous() and t.data_ptr() % 16 == 0):
        return t
    return torch.empty(t.shape, device=t.device, dtype=t.dtype).copy_(t)


def pack_weights(kind: str, w_qkv, b_qkv, w_out, b_out, like: torch.Tensor, meta: dict):
    """The weights as the kernels read them, zero-padded to the blocks (no masks, aligned rows):
    WT (M, 3, KB, BLOCK_D) with ``WT[m, j, c, e] = w_qkv[m, j*d + e, c]`` (c < C) and
    ``WT[m, j, BLOCK_C + f, e] = w_qkv[m, j*d + e, C + f]`` (patch features, KB = BLOCK_C + BLOCK_P),
    BT (M, 3, BLOCK_D), WOT (M, BLOCK_D, BLOCK_C) = w_out^T, BO (M, BLOCK_C); identity: placeholders."""
    if kind == "identity":
        e = like.new_zeros(1)
        return e, e, e, e
    BC, BP, BD = meta["BLOCK_C"], meta["BLOCK_P"], meta["BLOCK_D"]
    M, three_d, K = w_qkv.shape
    D, C = three_d // 3, w_out.shape[1]
    KB = BC + BP if meta["HAS_PATCH"] else BC
    w = w_qkv.reshape(M, 3, D, K).transpose(-1, -2)                          # (M, 3, K, D)
    wt = like.new_zeros(M, 3, KB, BD)
    wt[:, :, :C, :D] = w[:, :, :C]
    if meta["HAS_PATCH"]:
        wt[:, :, BC:BC + K - C, :D] = w[:, :, C:]
    bt = like.new_zeros(M, 3, BD)
    bt[:, :, :D] = b_qkv.reshape(M, 3, D)
    wot = like.new_zeros(M, BD, BC)
    wot[:, :D, :C] = w_out.transpose(-1, -2)
    bo = like.new_zeros(M, BC)
    bo[:, :C] = b_out
    return wt, bt, wot, bo


def unpack_grads(parts, C: int, P: int, D: int, meta: dict):
    """Sum the weight-gradient partials over the splits (fixed order) and undo ``pack_weights``:
    (dw_qkv (M, 3D, C+P), db_qkv (M, 3D), dw_out (M, C, D), db_out (M, C)), float32."""
    pw, pb, pwo, pbo = (t.sum(1) for t in parts)
    M, BC = pw.shape[0], meta["BLOCK_C"]
    cols = [pw[:, :, :C, :D]] + ([pw[:, :, BC:BC + P, :D]] if P else [])
    dw = torch.cat(cols, 2).transpose(-1, -2).reshape(M, 3 * D, C + P)
    return dw, pb[:, :, :D].reshape(M, 3 * D), pwo[:, :D, :C].transpose(-1, -2).contiguous(), pbo[:, :C].contiguous()


def block_forward(z: torch.Tensor, x: torch.Tensor | None, w_qkv, b_qkv, w_out, b_out, *, kind: str,
                  members: int, qk_scale: float, gumbel: bool = False, seed: int = 0,
                  out: torch.Tensor | None = None):
    """Launch the forward. z: (NB, C, H, W); x: (NB, c, H, W) or None; weights (M, ...) (None for
    identity); ``members`` = M (NB = M * B_per); ``qk_scale``: the score scale (top-1: 1 / T).
    Returns (out (NB, C, H, W) contiguous, lse (NB, N) float32 log2-domain, idx (NB, N) int64 or None).
    ``out`` may be given (tests poison it): contiguous, fully overwritten."""
    NB, C, H, W = z.shape
    N = H * W
    P = 0 if x is None else 9 * x.shape[1]
    D = C if kind == "identity" else w_qkv.shape[-2] // 3
    check_inputs(kind, z.dtype, N, C, P, D)
    z, x = _data(z), _data(x)
    meta = _meta(kind, C, P, D, N)
    wt, bt, wot, bo = pack_weights(kind, w_qkv, b_qkv, w_out, b_out, z, meta)
    if out is None:
        out = torch.empty((NB, C, H, W), device=z.device, dtype=z.dtype)
    lse = torch.empty((NB, N), device=z.device, dtype=torch.float32)
    idx = torch.empty((NB, N) if kind == "top1" else (1,), device=z.device, dtype=torch.int64)
    n_blocks = triton.cdiv(N, meta["BLOCK"])
    ipp = images_per_program(NB, n_blocks, N)
    gumbel = bool(gumbel) and kind == "top1"
    nw, ns = launch_config()
    _block_fwd_kernel[(n_blocks, triton.cdiv(NB, ipp))](
        z, z if x is None else x, wt, bt, wot, bo, out, lse, idx, int(seed),
        NB // members, NB, N, H, W, C, P, ipp, float(qk_scale) * LOG2E,
        **meta, KIND=KINDS[kind], GUMBEL=gumbel, PREC=dot_precision(z.dtype), num_warps=nw, num_stages=ns, maxnreg=MAXNREG,
    )
    return out, lse, (idx if kind == "top1" else None)


def block_backward(g: torch.Tensor, z: torch.Tensor, x: torch.Tensor | None, w_qkv, b_qkv, w_out, b_out,
                   lse: torch.Tensor, idx: torch.Tensor | None, *, kind: str, members: int, sm_scale: float,
                   gumbel: bool = False, seed: int = 0, need_dpatch: bool = False):
    """Launch the backward (and, unless identity, the weight-gradient kernel). Returns (dz (NB, C, H, W)
    contiguous, dpatch (NB, N, P) float32 or None, dw_qkv (M, 3D, C+P), db_qkv (M, 3D), dw_out (M, C, D),
    db_out (M, C) float32 or None for identity): partials summed over splits in a fixed order (deterministic)."""
    NB, C, H, W = z.shape
    N = H * W
    P = 0 if x is None else 9 * x.shape[1]
    D = C if kind == "identity" else w_qkv.shape[-2] // 3
    check_inputs(kind, z.dtype, N, C, P, D)
    g, z, x = _data(g), _data(z), _data(x)
    meta = _meta(kind, C, P, D, N)
    wt, bt, wot, _ = pack_weights(kind, w_qkv, b_qkv, w_out, b_out, z, meta)
    B_per = NB // members
    dev, f32, BD = z.device, torch.float32, meta["BLOCK_D"]
    weighted = kind != "identity"
    dz = torch.empty((NB, C, H, W), device=dev, dtype=z.dtype)
    delta = torch.empty((NB, N), device=dev, dtype=f32)
    dpatch = torch.empty((NB, N, P), device=dev, dtype=f32) if (need_dpatch and P) else delta
    aout = torch.empty((NB, N, BD) if weighted else (1,), device=dev, dtype=z.dtype)
    dqkv = torch.empty((NB, N, 3, BD) if weighted else (1,), device=dev, dtype=z.dtype)
    ipp = images_per_program(NB, 1, N)
    nw, ns = launch_config()
    no_idx = torch.zeros(1, device=dev, dtype=torch.int64)
    _block_bwd_kernel[(triton.cdiv(NB, ipp),)](
        z, z if x is None else x, wt, bt, wot, g, lse, no_idx if idx is None else idx, delta, dz, dpatch, aout, dqkv,
        int(seed), B_per, NB, N, H, W, C, P, ipp, float(sm_scale) * LOG2E, float(sm_scale),
        **meta, KIND=KINDS[kind], GUMBEL=bool(gumbel) and kind == "top1",
        WRITE_DPATCH=bool(need_dpatch and P),
        PREC=dot_precision(z.dtype), num_warps=nw, num_stages=ns, maxnreg=MAXNREG,
    )
    grads = (None,) * 4
    if weighted:
        n_splits, ipw = wgrad_splits(B_per, members)
        KB = meta["BLOCK_C"] + (meta["BLOCK_P"] if P else 0)
        parts = [torch.empty((members, n_splits, *s), device=dev, dtype=f32) for s in
                 ((3, KB, BD), (3, BD), (BD, meta["BLOCK_C"]), (meta["BLOCK_C"],))]
        _block_wgrad_kernel[(7 if P else 4, n_splits, members)](
            z, z if x is None else x, g, aout, dqkv, *parts, B_per, N, H, W, C, P, ipw,
            **meta, PREC=dot_precision(z.dtype), num_warps=WGRAD_WARPS, num_stages=1, maxnreg=MAXNREG,
        )
        grads = unpack_grads(parts, C, P, D, meta)
    return (dz, dpatch if (need_dpatch and P) else None, *grads)


#: warps of the weight-gradient kernel (one (BLOCK_C or BLOCK_P) x BLOCK_D float32 accumulator)
WGRAD_WARPS = 4


# ----------------------------------------------------------------------------------------------
# ahead-of-time compile configurations
# ----------------------------------------------------------------------------------------------
#: the study's shapes and their neighbours, (N, C, P, d), and the smallest blocks (N, C, d <= 16, c = 1,
#: N a multiple of 16 or not (N_MULT): what the GPU-compile guard launches)
STUDY_SHAPES = ((64, 64, 27, 64), (64, 64, 0, 64), (64, 64, 27, 16), (256, 64, 27, 64), (64, 16, 27, 16),
                (16, 16, 9, 16), (16, 16, 0, 16), (15, 16, 9, 16), (15, 16, 0, 16))


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def compile_configs(dtypes=("fp32", "bf16")) -> list[dict]:
    """The configurations the launchers launch at ``STUDY_SHAPES``: forward, backward and weight gradient,
    each kind (identity only without patches; no weight gradient), GUMBEL for top-1, WRITE_DPATCH (the dx
    path) with patches, and for float32 each dot precision of the fp32 policy (``_common.dot_precisions``).
    Each a ``make_config`` dict."""
    out = []
    data = {"Z", "X", "WT", "BT", "WOT", "BO", "OUT", "G", "DZ", "AOUT", "DQKV"}      # data-dtype pointers
    f32_ptrs = {"LSE", "DELTA", "DPATCH", "PW", "PB", "PWO", "PBO"}
    for dt, (n, c, p, d), kind in itertools.product(dtypes, STUDY_SHAPES, KINDS):
        if kind == "identity" and p:
            continue
        meta = _meta(kind, c, p, d, n)
        bwd = [(_block_bwd_kernel, "bwd", {"KIND": KINDS[kind], "WRITE_DPATCH": w}) for w in ((False, True) if p else (False,))]
        fns = [(_block_fwd_kernel, "fwd", {"KIND": KINDS[kind]}), *bwd]
        if kind != "identity":
            fns.append((_block_wgrad_kernel, "wgrad", {}))
        for fn, which, extra in fns:
            gumbels = (False, True) if (kind == "top1" and "GUMBEL" in fn.arg_names) else (False,)
            for gumbel, prec in itertools.product(gumbels, dot_precisions(_DTYPES[dt])):
                nw, ns = (WGRAD_WARPS, 1) if which == "wgrad" else launch_config()
                args = set(fn.arg_names)
                pointers = {a: (None if a in data else "i64" if a == "IDX" else "fp32")
                            for a in args & (data | f32_ptrs | {"IDX"})}
                const = dict(meta, PREC=prec, **extra)
                if "GUMBEL" in args:
                    const["GUMBEL"] = gumbel
                name = f"attention_block.{fn.__name__}" + ("" if fn is _block_wgrad_kernel else f".{kind}")
                cfg = make_config(name, fn, dt, const, nw, ns, maxnreg=MAXNREG,
                                  pointers=pointers, fp32=tuple(a for a in ("qk_scale", "sm_scale") if a in args),
                                  i64=("seed",) if "seed" in args else (), aligned=tuple(pointers))
                if all(config_key(cfg) != config_key(o) for o in out):   # N = 64 and 256 share BLOCK = 64
                    out.append(cfg)
    return out


__all__ = ["block_forward", "block_backward", "check_inputs", "compile_configs", "MAX_N", "MAX_FEATURES",
           "TL_LOG2E"]
