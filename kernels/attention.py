"""Softmax patch attention, forward and backward, as fused Triton kernels.

``out = softmax(scale * q k^T) v`` for ``q, k: (B, N, D)``, ``v: (B, N, Dv)``. Layout follows
Liger-Kernel: the ``@triton.jit`` kernels first, then the launchers that pick block sizes and grids.
The kernel bodies follow Triton's tutorial 06 and flash-attention's ``flash_attn_triton.py``:

* forward: online softmax in the exp2 domain, float32 accumulators, saves the natural-log
  log-sum-exp ``lse[b, i] = log sum_j exp(scale * q_i . k_j)`` as (B, Nq) float32;
* backward: ``Delta = rowsum(o * do)``, then one program per key block for dk/dv and one per
  query block for dq. Nothing of size N x N is ever stored;
* identity case (q = k = v = z): the forward loads each key tile once and uses it as k and v;
  the backward is one kernel that reads each z/do tile once per step and returns ``dz`` directly
  (the scores of the identity case are symmetric, so one ``z_i z_j^T`` product serves both the
  "j as key" (dk, dv) and the "j as query" (dq) terms).

Ragged shapes: ``BLOCK_D = max(next_pow2(max(D, Dv)), 16)`` with masked loads; ``EVEN_N`` and
``EVEN_D`` constexprs drop the masks when the shape allows. Short sequences: when ``N * D`` is small
one program handles several sequences (``seqs_per_prog``). Offsets: the batch offset is int64;
in-sequence offsets are int32, and the launchers copy an input to contiguous memory when its
in-sequence span would pass 2^31. Inputs may be float32, float16 or bfloat16; math is float32
(float32 inputs use IEEE float32 ``tl.dot``, like torch's default matmul).

This module imports nothing from ``fastscore``.
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_BLOCK_D = 256
_INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, n_cols, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a (len(rows), len(cols)) tile, zero outside ``rows < n_rows`` / ``cols < n_cols``."""
    if EVEN_N and EVEN_D:
        x = tl.load(ptrs)
    elif EVEN_N:
        x = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    elif EVEN_D:
        x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    return x


@triton.jit
def _store_tile(ptrs, x, rows, n_rows, cols, n_cols, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr):
    """Store a tile, skipping elements outside ``rows < n_rows`` / ``cols < n_cols``."""
    if EVEN_N and EVEN_D:
        tl.store(ptrs, x)
    elif EVEN_N:
        tl.store(ptrs, x, mask=cols[None, :] < n_cols)
    elif EVEN_D:
        tl.store(ptrs, x, mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


@triton.jit
def _load_row(ptrs, rows, n_rows, EVEN_N: tl.constexpr):
    """Load a float32 vector (LSE or Delta), zero outside ``rows < n_rows``."""
    if EVEN_N:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=rows < n_rows, other=0.0)
    return x


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qn, stride_qd,
    stride_kb, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_vd,
    stride_ob, stride_on, stride_od,
    B, NQ, NK, D, DV, qk_scale, seqs_per_prog,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, IDENTITY: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Attention forward for one block of BLOCK_M queries of ``seqs_per_prog`` sequences.

    Program (pid_m, pid_b) computes rows ``pid_m*BLOCK_M ...`` of ``out[b]`` and ``lse[b]`` for
    ``b`` in ``pid_b*seqs_per_prog ... (pid_b+1)*seqs_per_prog - 1`` (clipped to B), streaming the
    keys of each sequence in blocks of BLOCK_N with an online softmax in base 2.
    Q: (B, NQ, D) queries; K: (B, NK, D) keys; V: (B, NK, DV) values; O: (B, NQ, DV) output;
    ``stride_xb / stride_xn / stride_xd`` are each tensor's strides (elements) along batch,
    sequence and feature. LSE: (B, NQ) contiguous float32, natural-log log-sum-exp of the
    scaled scores. qk_scale = scale * log2(e). IDENTITY: K is V (one load serves both).
    """
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    b_first = pid_b * seqs_per_prog
    for s in range(0, seqs_per_prog):
        # the launcher makes seqs_per_prog divide B; the clamp only guards a ragged last group
        # (which then recomputes and rewrites the last sequence with identical values)
        b = tl.minimum(b_first + s, B - 1).to(tl.int64)
        q_ptrs = Q + b * stride_qb + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
        q = _load_tile(q_ptrs, offs_m, NQ, offs_d, D, EVEN_N, EVEN_D)
        k_base = K + b * stride_kb
        v_base = V + b * stride_vb
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(0, NK, BLOCK_N):
            offs_n = start_n + offs_n0
            k = _load_tile(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                           offs_n, NK, offs_d, D, EVEN_N, EVEN_D)
            if IDENTITY:
                v = k
            else:
                v = _load_tile(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                               offs_n, NK, offs_d, DV, EVEN_N, EVEN_D)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            if not EVEN_N:
                qk = tl.where(offs_n[None, :] < NK, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        acc = acc / l_i[:, None]
        o_ptrs = O + b * stride_ob + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
        _store_tile(o_ptrs, acc.to(O.dtype.element_ty), offs_m, NQ, offs_d, DV, EVEN_N, EVEN_D)
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
        lse_ptrs = LSE + b * NQ + offs_m
        if EVEN_N:
            tl.store(lse_ptrs, lse)
        else:
            tl.store(lse_ptrs, lse, mask=offs_m < NQ)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_on, stride_od,
    stride_dob, stride_don, stride_dod,
    B, NQ, DV, seqs_per_prog,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
):
    """Delta[b, i] = sum_d O[b, i, d] * DO[b, i, d] (float32) for one block of BLOCK_M rows.

    Program (pid_m, pid_b) handles rows ``pid_m*BLOCK_M ...`` of sequences
    ``pid_b*seqs_per_prog ...``. O, DO: (B, NQ, DV) output and its gradient, with strides along
    batch / sequence / feature; DELTA: (B, NQ) contiguous float32.
    """
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    b_first = pid_b * seqs_per_prog
    for s in range(0, seqs_per_prog):
        # the launcher makes seqs_per_prog divide B; the clamp only guards a ragged last group
        # (which then recomputes and rewrites the last sequence with identical values)
        b = tl.minimum(b_first + s, B - 1).to(tl.int64)
        o = _load_tile(O + b * stride_ob + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
                       offs_m, NQ, offs_d, DV, EVEN_N, EVEN_D)
        do = _load_tile(DO + b * stride_dob + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
                        offs_m, NQ, offs_d, DV, EVEN_N, EVEN_D)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        if EVEN_N:
            tl.store(DELTA + b * NQ + offs_m, delta)
        else:
            tl.store(DELTA + b * NQ + offs_m, delta, mask=offs_m < NQ)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV_,
    stride_qb, stride_qn, stride_qd,
    stride_kb, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_vd,
    stride_dob, stride_don, stride_dod,
    stride_dkb, stride_dkn, stride_dkd,
    stride_dvb, stride_dvn, stride_dvd,
    B, NQ, NK, D, DV, sm_scale, qk_scale, seqs_per_prog,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dK and dV for one block of BLOCK_N keys of ``seqs_per_prog`` sequences.

    Program (pid_n, pid_b) loops over all query blocks of each sequence, recomputing
    ``P^T = exp2(qk_scale * k q^T - lse * log2 e)`` tile by tile:
    ``dV += P^T dO``, ``dS^T = P^T * (V dO^T - Delta)``, ``dK += dS^T Q``, finally ``dK *= sm_scale``.
    Q: (B, NQ, D); K: (B, NK, D); V: (B, NK, DV); DO: (B, NQ, DV) output gradient; LSE, DELTA:
    (B, NQ) contiguous float32 from the forward and the preprocess; DK: (B, NK, D) and DV_:
    (B, NK, DV) outputs. ``stride_xb / xn / xd``: strides along batch / sequence / feature.
    """
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    b_first = pid_b * seqs_per_prog
    for s in range(0, seqs_per_prog):
        # the launcher makes seqs_per_prog divide B; the clamp only guards a ragged last group
        # (which then recomputes and rewrites the last sequence with identical values)
        b = tl.minimum(b_first + s, B - 1).to(tl.int64)
        k = _load_tile(K + b * stride_kb + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                       offs_n, NK, offs_d, D, EVEN_N, EVEN_D)
        v = _load_tile(V + b * stride_vb + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                       offs_n, NK, offs_d, DV, EVEN_N, EVEN_D)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        q_base = Q + b * stride_qb
        do_base = DO + b * stride_dob
        for start_m in range(0, NQ, BLOCK_M):
            offs_m = start_m + offs_m0
            q = _load_tile(q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                           offs_m, NQ, offs_d, D, EVEN_N, EVEN_D)
            do = _load_tile(do_base + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
                            offs_m, NQ, offs_d, DV, EVEN_N, EVEN_D)
            lse2 = _load_row(LSE + b * NQ + offs_m, offs_m, NQ, EVEN_N) * 1.4426950408889634
            delta = _load_row(DELTA + b * NQ + offs_m, offs_m, NQ, EVEN_N)
            qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
            pT = tl.math.exp2(qkT - lse2[None, :])
            if not EVEN_N:
                pT = tl.where(offs_m[None, :] < NQ, pT, 0.0)
            dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PRECISION)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PRECISION)
        dk = dk * sm_scale
        _store_tile(DK + b * stride_dkb + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
                    dk.to(DK.dtype.element_ty), offs_n, NK, offs_d, D, EVEN_N, EVEN_D)
        _store_tile(DV_ + b * stride_dvb + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
                    dv.to(DV_.dtype.element_ty), offs_n, NK, offs_d, DV, EVEN_N, EVEN_D)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qn, stride_qd,
    stride_kb, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_vd,
    stride_dob, stride_don, stride_dod,
    stride_dqb, stride_dqn, stride_dqd,
    B, NQ, NK, D, DV, sm_scale, qk_scale, seqs_per_prog,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dQ for one block of BLOCK_M queries of ``seqs_per_prog`` sequences.

    Program (pid_m, pid_b) loops over all key blocks: ``P = exp2(qk_scale * q k^T - lse log2 e)``,
    ``dS = P * (dO V^T - Delta)``, ``dQ += dS K``, finally ``dQ *= sm_scale``.
    Pointers as in ``_attn_bwd_dkdv_kernel``; DQ: (B, NQ, D) output with its strides.
    """
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    b_first = pid_b * seqs_per_prog
    for s in range(0, seqs_per_prog):
        # the launcher makes seqs_per_prog divide B; the clamp only guards a ragged last group
        # (which then recomputes and rewrites the last sequence with identical values)
        b = tl.minimum(b_first + s, B - 1).to(tl.int64)
        q = _load_tile(Q + b * stride_qb + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                       offs_m, NQ, offs_d, D, EVEN_N, EVEN_D)
        do = _load_tile(DO + b * stride_dob + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
                        offs_m, NQ, offs_d, DV, EVEN_N, EVEN_D)
        lse2 = _load_row(LSE + b * NQ + offs_m, offs_m, NQ, EVEN_N) * 1.4426950408889634
        delta = _load_row(DELTA + b * NQ + offs_m, offs_m, NQ, EVEN_N)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        k_base = K + b * stride_kb
        v_base = V + b * stride_vb
        for start_n in range(0, NK, BLOCK_N):
            offs_n = start_n + offs_n0
            k = _load_tile(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                           offs_n, NK, offs_d, D, EVEN_N, EVEN_D)
            v = _load_tile(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                           offs_n, NK, offs_d, DV, EVEN_N, EVEN_D)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            p = tl.math.exp2(qk - lse2[:, None])
            if not EVEN_N:
                p = tl.where(offs_n[None, :] < NK, p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        dq = dq * sm_scale
        _store_tile(DQ + b * stride_dqb + offs_m[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
                    dq.to(DQ.dtype.element_ty), offs_m, NQ, offs_d, D, EVEN_N, EVEN_D)


@triton.jit
def _identity_bwd_kernel(
    Z, DO, LSE, DELTA, DZ,
    stride_zb, stride_zn, stride_zd,
    stride_dob, stride_don, stride_dod,
    stride_dzb, stride_dzn, stride_dzd,
    B, N, D, sm_scale, qk_scale, seqs_per_prog,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dZ of ``out = softmax(sm_scale * z z^T) z`` for one block j of BLOCK tokens.

    Program (pid_j, pid_b) loads z_j, dO_j, lse_j, Delta_j once, then streams every block i of
    the sequence (z_i, dO_i, lse_i, Delta_i, each read once per step). The scaled scores
    ``S_ij = z_i . z_j`` serve both roles of token j: as key/value
    (``P_ij = exp(S_ij - lse_i)``, ``dS_ij = P_ij (dO_i . z_j - Delta_i)``, ``dV_j += P_ij dO_i``,
    ``dK_j += dS_ij z_i``) and as query (``P_ji = exp(S_ij - lse_j)``,
    ``dS_ji = P_ji (dO_j . z_i - Delta_j)``, ``dQ_j += dS_ji z_i``), so
    ``dZ_j = sm_scale (dK_j + dQ_j) + dV_j`` with one product for dK + dQ.
    Z, DO, DZ: (B, N, D) with strides along batch / sequence / feature; LSE, DELTA: (B, N)
    contiguous float32.
    """
    pid_j = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_j = pid_j * BLOCK + tl.arange(0, BLOCK)
    offs_i0 = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    b_first = pid_b * seqs_per_prog
    for s in range(0, seqs_per_prog):
        # the launcher makes seqs_per_prog divide B; the clamp only guards a ragged last group
        # (which then recomputes and rewrites the last sequence with identical values)
        b = tl.minimum(b_first + s, B - 1).to(tl.int64)
        z_base = Z + b * stride_zb
        do_base = DO + b * stride_dob
        zj = _load_tile(z_base + offs_j[:, None] * stride_zn + offs_d[None, :] * stride_zd,
                        offs_j, N, offs_d, D, EVEN_N, EVEN_D)
        doj = _load_tile(do_base + offs_j[:, None] * stride_don + offs_d[None, :] * stride_dod,
                         offs_j, N, offs_d, D, EVEN_N, EVEN_D)
        lse2_j = _load_row(LSE + b * N + offs_j, offs_j, N, EVEN_N) * 1.4426950408889634
        delta_j = _load_row(DELTA + b * N + offs_j, offs_j, N, EVEN_N)
        dv = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
        dkq = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
        for start_i in range(0, N, BLOCK):
            offs_i = start_i + offs_i0
            zi = _load_tile(z_base + offs_i[:, None] * stride_zn + offs_d[None, :] * stride_zd,
                            offs_i, N, offs_d, D, EVEN_N, EVEN_D)
            doi = _load_tile(do_base + offs_i[:, None] * stride_don + offs_d[None, :] * stride_dod,
                             offs_i, N, offs_d, D, EVEN_N, EVEN_D)
            lse2_i = _load_row(LSE + b * N + offs_i, offs_i, N, EVEN_N) * 1.4426950408889634
            delta_i = _load_row(DELTA + b * N + offs_i, offs_i, N, EVEN_N)
            # rows i, columns j: S[i, j] = qk_scale * z_i . z_j
            sij = tl.dot(zi, tl.trans(zj), input_precision=DOT_PRECISION) * qk_scale
            p_ij = tl.math.exp2(sij - lse2_i[:, None])      # query i, key j
            p_ji = tl.math.exp2(sij - lse2_j[None, :])      # query j, key i (transposed)
            if not EVEN_N:
                p_ij = tl.where(offs_i[:, None] < N, p_ij, 0.0)
                p_ji = tl.where(offs_i[:, None] < N, p_ji, 0.0)
            dv += tl.dot(tl.trans(p_ij.to(zi.dtype)), doi, input_precision=DOT_PRECISION)
            dp_ij = tl.dot(doi, tl.trans(zj), input_precision=DOT_PRECISION)   # dO_i . v_j
            dp_ji = tl.dot(zi, tl.trans(doj), input_precision=DOT_PRECISION)   # dO_j . v_i
            ds = p_ij * (dp_ij - delta_i[:, None]) + p_ji * (dp_ji - delta_j[None, :])
            dkq += tl.dot(tl.trans(ds.to(zi.dtype)), zi, input_precision=DOT_PRECISION)
        dz = dkq * sm_scale + dv
        _store_tile(DZ + b * stride_dzb + offs_j[:, None] * stride_dzn + offs_d[None, :] * stride_dzd,
                    dz.to(DZ.dtype.element_ty), offs_j, N, offs_d, D, EVEN_N, EVEN_D)


# ----------------------------------------------------------------------------------------------
# heuristics
# ----------------------------------------------------------------------------------------------
_BLOCKS = (16, 32, 64)
_BLOCK_DS = (16, 32, 64, 128, 256)
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def block_d(d: int) -> int:
    """Feature block: ``max(next_pow2(d), 16)``."""
    return max(triton.next_power_of_2(int(d)), 16)


def _block_cap(kernel: str, bd: int) -> int:
    """Largest sequence block for ``kernel`` at feature block ``bd`` (keeps tiles in registers)."""
    if kernel in ("fwd", "bwd_preprocess"):
        return 32 if bd >= 256 else 64
    return 16 if bd >= 256 else (32 if bd >= 128 else 64)


def _block(n: int, bd: int, kernel: str = "fwd") -> int:
    """Sequence block for sequences of length ``n``: ``next_pow2(n)`` within [16, cap]."""
    return min(_block_cap(kernel, bd), max(16, triton.next_power_of_2(int(n))))


def _num_warps(kernel: str, block: int, bd: int) -> int:
    """Warps per program: one per 1024 tile elements (block x bd) in the forward, twice that in
    the backward kernels (which hold two float32 accumulators), between 1 and 8."""
    per = 1024 if kernel in ("fwd", "bwd_preprocess") else 512
    return max(1, min(8, block * bd // per))


def _num_stages(kernel: str) -> int:
    return 1 if kernel == "bwd_preprocess" else 2


def _seqs_per_program(b: int, n_blocks: int, n: int, bd: int) -> int:
    """Sequences per program: several when one sequence is a small amount of work (``N * D`` small)
    and the batch is large, keeping at least ~2048 programs; at least enough to keep the second
    grid axis under CUDA's 65535 limit."""
    need = triton.cdiv(b, 65535)
    want = max(1, min(8, b // 2048)) if (n_blocks == 1 and n * bd <= 64 * 32) else 1
    want = max(need, want)
    for spp in range(want, min(2 * want, b) + 1):  # prefer a divisor of b: no ragged last group
        if b % spp == 0:
            return spp
    return want


def _dot_precision(dtype: torch.dtype) -> str:
    """IEEE float32 products for float32 inputs (torch's default matmul precision); 16-bit operands
    use tensor cores with float32 accumulation whatever this says."""
    return "ieee"


def _check_dtype(*xs: torch.Tensor) -> None:
    for x in xs:
        if x.dtype not in _DTYPES:
            raise TypeError(f"q, k, v: the Triton attention kernels take float32/float16/bfloat16, got {x.dtype}")


def _span_ok(x: torch.Tensor) -> bool:
    """True when the in-sequence offsets (dims 1 and 2) of ``x`` fit in int32."""
    return (x.shape[1] - 1) * x.stride(1) + (x.shape[2] - 1) * x.stride(2) <= _INT32_MAX


def _prep(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its feature stride is 1 (the kernels are compiled for unit feature stride;
    batch and sequence strides are free) and its in-sequence offsets fit in int32; else a copy."""
    if (x.stride(2) == 1 or x.shape[2] == 1) and _span_ok(x):
        return x
    x = x.contiguous()
    if not _span_ok(x):
        raise ValueError(f"one sequence of shape {tuple(x.shape[1:])} exceeds 2^31 elements")
    return x


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise (TypeError / ValueError) for what the kernels cannot take: dtypes other than
    float32/float16/bfloat16, and feature sizes above ``MAX_BLOCK_D``."""
    _check_dtype(q, k, v)
    _check_d(max(q.shape[2], v.shape[2]))


def _st(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, sequence, feature) strides; the feature stride is 1 after ``_prep``."""
    return x.stride(0), x.stride(1), 1


def _check_d(d: int) -> int:
    bd = block_d(d)
    if bd > MAX_BLOCK_D:
        raise ValueError(f"D: the Triton attention kernels support feature sizes up to {MAX_BLOCK_D}, got {d}")
    return bd


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      out: torch.Tensor | None = None, lse: torch.Tensor | None = None):
    """Launch the forward. q, k: (B, Nq|Nk, D); v: (B, Nk, Dv) -> (out (B, Nq, Dv), lse (B, Nq) fp32).

    ``out`` / ``lse`` may be given (tests poison them); they are fully overwritten.
    ``k is v is q`` selects the identity specialisation (one load per key tile).
    """
    _check_dtype(q, k, v)
    identity = q is k and k is v
    q, k, v = _prep(q), _prep(k), _prep(v)
    if identity:
        k = v = q
    B, NQ, D = q.shape
    NK, DV = k.shape[1], v.shape[2]
    bd = _check_d(max(D, DV))
    blk = _block(max(NQ, NK), bd)
    if out is None:
        out = torch.empty((B, NQ, DV), device=q.device, dtype=q.dtype)
    if lse is None:
        lse = torch.empty((B, NQ), device=q.device, dtype=torch.float32)
    out = _prep(out)
    n_blocks = triton.cdiv(NQ, blk)
    spp = _seqs_per_program(B, n_blocks, max(NQ, NK), bd)
    grid = (n_blocks, triton.cdiv(B, spp))
    _attn_fwd_kernel[grid](
        q, k, v, out, lse,
        *_st(q),
        *_st(k),
        *_st(v),
        *_st(out),
        B, NQ, NK, D, DV, float(scale) * LOG2E, spp,
        BLOCK_M=blk, BLOCK_N=blk, BLOCK_D=bd,
        EVEN_N=(NQ % blk == 0 and NK % blk == 0), EVEN_D=(D == bd and DV == bd),
        IDENTITY=identity, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=_num_warps("fwd", blk, bd), num_stages=_num_stages("fwd"),
    )
    return out, lse


def _delta(o: torch.Tensor, do: torch.Tensor, blk: int, bd: int, spp: int) -> torch.Tensor:
    B, NQ, DV = o.shape
    delta = torch.empty((B, NQ), device=o.device, dtype=torch.float32)
    grid = (triton.cdiv(NQ, blk), triton.cdiv(B, spp))
    _attn_bwd_preprocess_kernel[grid](
        o, do, delta,
        *_st(o),
        *_st(do),
        B, NQ, DV, spp,
        BLOCK_M=blk, BLOCK_D=bd, EVEN_N=(NQ % blk == 0), EVEN_D=(DV == bd),
        num_warps=_num_warps("bwd_preprocess", blk, bd), num_stages=_num_stages("bwd_preprocess"),
    )
    return delta


def attention_backward(q, k, v, out, lse, do, scale: float, dq=None, dk=None, dv=None):
    """Launch the backward: Delta preprocess, dk/dv per key block, dq per query block.

    Returns (dq, dk, dv) in the input dtype; ``dq``/``dk``/``dv`` may be given and are overwritten.
    """
    _check_dtype(q, k, v, out, do)
    q, k, v, out, do = (_prep(x) for x in (q, k, v, out, do))
    B, NQ, D = q.shape
    NK, DV = k.shape[1], v.shape[2]
    bd = _check_d(max(D, DV))
    blk = _block(max(NQ, NK), bd, "bwd")
    dq = torch.empty_like(q, memory_format=torch.contiguous_format) if dq is None else _prep(dq)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format) if dk is None else _prep(dk)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format) if dv is None else _prep(dv)
    spp = _seqs_per_program(B, max(triton.cdiv(NQ, blk), triton.cdiv(NK, blk)), max(NQ, NK), bd)
    delta = _delta(out, do, blk, bd, spp)
    even_n = NQ % blk == 0 and NK % blk == 0
    even_d = D == bd and DV == bd
    prec = _dot_precision(q.dtype)
    common = dict(BLOCK_M=blk, BLOCK_N=blk, BLOCK_D=bd, EVEN_N=even_n, EVEN_D=even_d, DOT_PRECISION=prec)
    _attn_bwd_dkdv_kernel[(triton.cdiv(NK, blk), triton.cdiv(B, spp))](
        q, k, v, do, lse, delta, dk, dv,
        *_st(q),
        *_st(k),
        *_st(v),
        *_st(do),
        *_st(dk),
        *_st(dv),
        B, NQ, NK, D, DV, float(scale), float(scale) * LOG2E, spp,
        num_warps=_num_warps("bwd_dkdv", blk, bd), num_stages=_num_stages("bwd_dkdv"), **common,
    )
    _attn_bwd_dq_kernel[(triton.cdiv(NQ, blk), triton.cdiv(B, spp))](
        q, k, v, do, lse, delta, dq,
        *_st(q),
        *_st(k),
        *_st(v),
        *_st(do),
        *_st(dq),
        B, NQ, NK, D, DV, float(scale), float(scale) * LOG2E, spp,
        num_warps=_num_warps("bwd_dq", blk, bd), num_stages=_num_stages("bwd_dq"), **common,
    )
    return dq, dk, dv


def identity_forward(z: torch.Tensor, scale: float, out=None, lse=None):
    """Forward of ``softmax(scale z z^T) z``: the identity specialisation of ``attention_forward``."""
    return attention_forward(z, z, z, scale, out=out, lse=lse)


def identity_backward(z, out, lse, do, scale: float, dz=None):
    """Backward of the identity case: Delta preprocess, then one fused kernel returning dz (B, N, D)."""
    _check_dtype(z, out, do)
    z, out, do = _prep(z), _prep(out), _prep(do)
    B, N, D = z.shape
    bd = _check_d(D)
    blk = _block(N, bd, "bwd")
    dz = torch.empty_like(z, memory_format=torch.contiguous_format) if dz is None else _prep(dz)
    n_blocks = triton.cdiv(N, blk)
    spp = _seqs_per_program(B, n_blocks, N, bd)
    delta = _delta(out, do, blk, bd, spp)
    _identity_bwd_kernel[(n_blocks, triton.cdiv(B, spp))](
        z, do, lse, delta, dz,
        *_st(z),
        *_st(do),
        *_st(dz),
        B, N, D, float(scale), float(scale) * LOG2E, spp,
        BLOCK=blk, BLOCK_D=bd, EVEN_N=(N % blk == 0), EVEN_D=(D == bd),
        DOT_PRECISION=_dot_precision(z.dtype),
        num_warps=_num_warps("identity_bwd", blk, bd), num_stages=_num_stages("identity_bwd"),
    )
    return dz


# ----------------------------------------------------------------------------------------------
# ahead-of-time compile configurations
# ----------------------------------------------------------------------------------------------
def _signature(fn, ptr_types: dict[str, str], floats: tuple[str, ...], constexprs: dict) -> dict:
    """ASTSource signature of ``fn``; adds the unit feature strides (``stride_*d``, which Triton's
    JIT specialises to the constant 1) to ``constexprs`` in place."""
    sig = {}
    for name in fn.arg_names:
        if name.startswith("stride_") and name.endswith("d"):
            constexprs[name] = 1
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptr_types:
            sig[name] = ptr_types[name]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_configs(dtypes=("fp32", "fp16", "bf16")) -> list[dict]:
    """Every (kernel, constexprs, num_warps, num_stages) the launchers can launch, for ``dtypes``.

    Each entry: ``{"name", "fn", "signature", "constexprs", "num_warps", "num_stages", "attrs"}`` in
    the ``triton.compiler.ASTSource`` format of triton 3.6 (``attrs``: the divisibility hints the JIT
    would derive for contiguous tensors; optional for consumers).
    """
    out = []
    for dt in dtypes:
        p = f"*{dt}"
        precs = ("ieee",)
        for prec, bd, even_n, even_d in itertools.product(precs, _BLOCK_DS, (True, False), (True, False)):
            for blk in _BLOCKS:
                for identity in (False, True):
                    if blk > _block_cap("fwd", bd):
                        continue
                    c = dict(BLOCK_M=blk, BLOCK_N=blk, BLOCK_D=bd, EVEN_N=even_n, EVEN_D=even_d,
                             IDENTITY=identity, DOT_PRECISION=prec)
                    out.append(dict(
                        name="identity_fwd" if identity else "fwd", fn=_attn_fwd_kernel,
                        signature=_signature(_attn_fwd_kernel, {"Q": p, "K": p, "V": p, "O": p, "LSE": "*fp32"},
                                             ("qk_scale",), c),
                        constexprs=c, num_warps=_num_warps("fwd", blk, bd), num_stages=_num_stages("fwd")))
                for name, fn in (("bwd_dkdv", _attn_bwd_dkdv_kernel), ("bwd_dq", _attn_bwd_dq_kernel)):
                    if blk > _block_cap(name, bd):
                        continue
                    c = dict(BLOCK_M=blk, BLOCK_N=blk, BLOCK_D=bd, EVEN_N=even_n, EVEN_D=even_d,
                             DOT_PRECISION=prec)
                    ptrs = {a: p for a in ("Q", "K", "V", "DO", "DK", "DV_", "DQ")}
                    ptrs.update(LSE="*fp32", DELTA="*fp32")
                    out.append(dict(name=name, fn=fn,
                                    signature=_signature(fn, ptrs, ("sm_scale", "qk_scale"), c),
                                    constexprs=c, num_warps=_num_warps(name, blk, bd),
                                    num_stages=_num_stages(name)))
                c = dict(BLOCK=blk, BLOCK_D=bd, EVEN_N=even_n, EVEN_D=even_d, DOT_PRECISION=prec)
                if blk <= _block_cap("identity_bwd", bd):
                    out.append(dict(name="identity_bwd", fn=_identity_bwd_kernel,
                                signature=_signature(_identity_bwd_kernel,
                                                     {"Z": p, "DO": p, "DZ": p, "LSE": "*fp32", "DELTA": "*fp32"},
                                                     ("sm_scale", "qk_scale"), c),
                                constexprs=c, num_warps=_num_warps("identity_bwd", blk, bd),
                                num_stages=_num_stages("identity_bwd")))
                if blk <= _block_cap("bwd", bd):
                    c = dict(BLOCK_M=blk, BLOCK_D=bd, EVEN_N=even_n, EVEN_D=even_d)
                    out.append(dict(name="bwd_preprocess", fn=_attn_bwd_preprocess_kernel,
                                    signature=_signature(_attn_bwd_preprocess_kernel,
                                                         {"O": p, "DO": p, "DELTA": "*fp32"}, (), c),
                                    constexprs=c, num_warps=_num_warps("bwd_preprocess", blk, bd),
                                    num_stages=_num_stages("bwd_preprocess")))
    for c in out:
        c["name"] = f"attention.{c['name']}"
        c["attrs"] = _attrs(c)
    return out


def _attrs(cfg: dict) -> dict:
    """``tt.divisibility`` 16 where Triton's JIT would find it for contiguous torch tensors:
    every pointer, and the batch / sequence strides when D is a multiple of 16 (EVEN_D)."""
    even_d = cfg["constexprs"].get("EVEN_D", False)
    attrs = {}
    for i, (name, ty) in enumerate(cfg["signature"].items()):
        if ty.startswith("*") or (even_d and name.startswith("stride_") and name[-1] in "bn"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs
