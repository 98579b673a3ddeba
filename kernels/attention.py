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
``EVEN_D`` constexprs drop the masks when the shape allows. The kernels take batch / sequence strides
and feature sizes in units of ``ALIGN = 8`` elements, so masked rows stay vectorised; the launchers
pass a tensor as it is when it has unit feature stride, 8-aligned rows and 16-byte aligned data, and
otherwise copy it, padding D with zeros to a multiple of 8 (zero features change no score).
Integer arguments are not specialised by the JIT, so the compiled variants are exactly
``compile_configs()``: per (kernel, BLOCK_D, dtype) one (BLOCK, num_warps, num_stages) from
``launch_config`` (chosen from ``ptxas -v``: no spills on sm_80 / sm_90a), EVEN_N / EVEN_D and, for
float32, ``DOT_PRECISION`` as the only other axes. Short sequences: when ``N * D`` is small one program handles several sequences
(``seqs_per_prog``, a runtime argument). Offsets: the batch offset is int64; in-sequence offsets are
int32 (a copy is made when a sequence's span would pass 2^31). Inputs may be float32, float16 or
bfloat16; math is float32; float32 dots follow torch's float32 matmul precision (the fp32 policy of
``_common``: IEEE products at torch's default).

This module imports nothing from ``fastscore``.
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from ._common import (
    ALIGN,
    LOG2E,
    MAXNREG,
    TL_ALIGN,
    TL_DTYPES,
    TL_LN2,
    TL_LOG2E,
    dot_precision,
    dot_precisions,
    make_config,
)
from ._common import config_key as config_key
from ._common import feature_block as _pow2_block

MAX_D = 256
_INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
# Integer arguments are not specialised by the JIT (``do_not_specialize``): a value of 1 or a
# multiple of 16 would otherwise compile a new variant, and the set of variants would depend on the
# data. Alignment is passed explicitly instead: batch / sequence strides and the feature sizes arrive
# in units of ALIGN = 8 elements (the launchers guarantee it, padding D when needed), and the kernels
# multiply them back, so the compiler sees 8-element-aligned rows and a feature mask that is constant
# over 8 columns: masked loads and stores along D stay vectorised (a plain ``cols < D`` mask with an
# unknown D makes every element a scalar access with its own 64-bit address, which doubled the
# register count of the first version of these kernels).
_INT_ARGS = ("B", "NQ", "NK", "N", "D", "DV", "seqs_per_prog")


def _no_spec(*strides: str) -> list[str]:
    return [*_INT_ARGS, *(f"stride_{s}{a}" for s in strides for a in "bn")]


@triton.jit
def _ptrs(base, rows, stride_n, cols):
    """Pointers ``base[rows, cols]`` of one sequence (unit feature stride)."""
    return base + rows[:, None] * stride_n + cols[None, :]


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


@triton.jit(do_not_specialize=_no_spec("q", "k", "v", "o"))
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qn, stride_kb, stride_kn, stride_vb, stride_vn, stride_ob, stride_on,
    B, NQ, NK, D, DV, qk_scale, seqs_per_prog,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, IDENTITY: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Attention forward for one block of BLOCK_M queries of ``seqs_per_prog`` sequences.

    Program (pid_m, pid_b) computes rows ``pid_m*BLOCK_M ...`` of ``out[b]`` and ``lse[b]`` for
    ``b`` in ``pid_b*seqs_per_prog ... (pid_b+1)*seqs_per_prog - 1`` (clipped to B), streaming the
    keys of each sequence in blocks of BLOCK_N with an online softmax in base 2.
    Q: (B, NQ, D) queries; K: (B, NK, D) keys; V: (B, NK, DV) values; O: (B, NQ, DV) output, all
    with unit feature stride; ``stride_xb / stride_xn``: each tensor's batch / sequence strides and
    D, DV: the feature sizes, all four in units of ALIGN = 8 elements. LSE: (B, NQ) contiguous
    float32, natural-log log-sum-exp of the scaled scores. qk_scale = scale * log2(e).
    IDENTITY: K is V (one load serves both).
    """
    stride_qb, stride_qn, stride_kb, stride_kn = stride_qb * TL_ALIGN, stride_qn * TL_ALIGN, stride_kb * TL_ALIGN, stride_kn * TL_ALIGN
    stride_vb, stride_vn, stride_ob, stride_on = stride_vb * TL_ALIGN, stride_vn * TL_ALIGN, stride_ob * TL_ALIGN, stride_on * TL_ALIGN
    D = D * TL_ALIGN
    DV = DV * TL_ALIGN
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    b_first = pid_b * seqs_per_prog
    for s in range(0, seqs_per_prog):
        # the launcher makes seqs_per_prog divide B where it can; the clamp guards a ragged last
        # group (which then recomputes and rewrites the last sequence with identical values)
        b = tl.minimum(b_first + s, B - 1).to(tl.int64)
        q = _load_tile(_ptrs(Q + b * stride_qb, offs_m, stride_qn, offs_d), offs_m, NQ, offs_d, D, EVEN_N, EVEN_D)
        k_base = K + b * stride_kb
        v_base = V + b * stride_vb
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(0, NK, BLOCK_N):
            offs_n = start_n + offs_n0
            k = _load_tile(_ptrs(k_base, offs_n, stride_kn, offs_d), offs_n, NK, offs_d, D, EVEN_N, EVEN_D)
            if IDENTITY:
                v = k
            else:
                v = _load_tile(_ptrs(v_base, offs_n, stride_vn, offs_d), offs_n, NK, offs_d, DV, EVEN_N, EVEN_D)
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
        _store_tile(_ptrs(O + b * stride_ob, offs_m, stride_on, offs_d), acc.to(O.dtype.element_ty),
                    offs_m, NQ, offs_d, DV, EVEN_N, EVEN_D)
        lse = (m_i + tl.math.log2(l_i)) * TL_LN2
        lse_ptrs = LSE + b * NQ + offs_m
        if EVEN_N:
            tl.store(lse_ptrs, lse)
        else:
            tl.store(lse_ptrs, lse, mask=offs_m < NQ)


@triton.jit(do_not_specialize=_no_spec("o", "do"))
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_on, stride_dob, stride_don,
    B, NQ, DV, seqs_per_prog,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Delta[b, i] = sum_d O[b, i, d] * DO[b, i, d] (float32) for one block of BLOCK_M rows.

    Program (pid_m, pid_b) handles rows ``pid_m*BLOCK_M ...`` of sequences
    ``pid_b*seqs_per_prog ...``. O, DO: (B, NQ, DV) output and its gradient, unit feature stride,
    batch / sequence strides and DV in units of 8 elements; DELTA: (B, NQ) contiguous float32.
    Memory-bound and cheap, so it is compiled once per feature block: rows and columns always masked.
    """
    stride_ob, stride_on, stride_dob, stride_don = stride_ob * TL_ALIGN, stride_on * TL_ALIGN, stride_dob * TL_ALIGN, stride_don * TL_ALIGN
    DV = DV * TL_ALIGN
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    b_first = pid_b * seqs_per_prog
    for s in range(0, seqs_per_prog):
        b = tl.minimum(b_first + s, B - 1).to(tl.int64)
        o = _load_tile(_ptrs(O + b * stride_ob, offs_m, stride_on, offs_d), offs_m, NQ, offs_d, DV, False, False)
        do = _load_tile(_ptrs(DO + b * stride_dob, offs_m, stride_don, offs_d), offs_m, NQ, offs_d, DV, False, False)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + b * NQ + offs_m, delta, mask=offs_m < NQ)


@triton.jit(do_not_specialize=_no_spec("q", "k", "v", "do", "dk", "dv"))
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV_,
    stride_qb, stride_qn, stride_kb, stride_kn, stride_vb, stride_vn,
    stride_dob, stride_don, stride_dkb, stride_dkn, stride_dvb, stride_dvn,
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
    (B, NK, DV) outputs. Unit feature strides; batch / sequence strides and D, DV in units of 8.
    """
    stride_qb, stride_qn, stride_kb, stride_kn = stride_qb * TL_ALIGN, stride_qn * TL_ALIGN, stride_kb * TL_ALIGN, stride_kn * TL_ALIGN
    stride_vb, stride_vn, stride_dob, stride_don = stride_vb * TL_ALIGN, stride_vn * TL_ALIGN, stride_dob * TL_ALIGN, stride_don * TL_ALIGN
    stride_dkb, stride_dkn, stride_dvb, stride_dvn = stride_dkb * TL_ALIGN, stride_dkn * TL_ALIGN, stride_dvb * TL_ALIGN, stride_dvn * TL_ALIGN
    D = D * TL_ALIGN
    DV = DV * TL_ALIGN
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    b_first = pid_b * seqs_per_prog
    for s in range(0, seqs_per_prog):
        b = tl.minimum(b_first + s, B - 1).to(tl.int64)
        k = _load_tile(_ptrs(K + b * stride_kb, offs_n, stride_kn, offs_d), offs_n, NK, offs_d, D, EVEN_N, EVEN_D)
        v = _load_tile(_ptrs(V + b * stride_vb, offs_n, stride_vn, offs_d), offs_n, NK, offs_d, DV, EVEN_N, EVEN_D)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        q_base = Q + b * stride_qb
        do_base = DO + b * stride_dob
        for start_m in range(0, NQ, BLOCK_M):
            offs_m = start_m + offs_m0
            q = _load_tile(_ptrs(q_base, offs_m, stride_qn, offs_d), offs_m, NQ, offs_d, D, EVEN_N, EVEN_D)
            do = _load_tile(_ptrs(do_base, offs_m, stride_don, offs_d), offs_m, NQ, offs_d, DV, EVEN_N, EVEN_D)
            lse2 = _load_row(LSE + b * NQ + offs_m, offs_m, NQ, EVEN_N) * TL_LOG2E
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
        _store_tile(_ptrs(DK + b * stride_dkb, offs_n, stride_dkn, offs_d), dk.to(DK.dtype.element_ty),
                    offs_n, NK, offs_d, D, EVEN_N, EVEN_D)
        _store_tile(_ptrs(DV_ + b * stride_dvb, offs_n, stride_dvn, offs_d), dv.to(DV_.dtype.element_ty),
                    offs_n, NK, offs_d, DV, EVEN_N, EVEN_D)


@triton.jit(do_not_specialize=_no_spec("q", "k", "v", "do", "dq"))
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qn, stride_kb, stride_kn, stride_vb, stride_vn,
    stride_dob, stride_don, stride_dqb, stride_dqn,
    B, NQ, NK, D, DV, sm_scale, qk_scale, seqs_per_prog,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dQ for one block of BLOCK_M queries of ``seqs_per_prog`` sequences.

    Program (pid_m, pid_b) loops over all key blocks: ``P = exp2(qk_scale * q k^T - lse log2 e)``,
    ``dS = P * (dO V^T - Delta)``, ``dQ += dS K``, finally ``dQ *= sm_scale``.
    Pointers as in ``_attn_bwd_dkdv_kernel``; DQ: (B, NQ, D) output with its strides.
    """
    stride_qb, stride_qn, stride_kb, stride_kn = stride_qb * TL_ALIGN, stride_qn * TL_ALIGN, stride_kb * TL_ALIGN, stride_kn * TL_ALIGN
    stride_vb, stride_vn, stride_dob, stride_don = stride_vb * TL_ALIGN, stride_vn * TL_ALIGN, stride_dob * TL_ALIGN, stride_don * TL_ALIGN
    stride_dqb, stride_dqn = stride_dqb * TL_ALIGN, stride_dqn * TL_ALIGN
    D = D * TL_ALIGN
    DV = DV * TL_ALIGN
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    b_first = pid_b * seqs_per_prog
    for s in range(0, seqs_per_prog):
        b = tl.minimum(b_first + s, B - 1).to(tl.int64)
        q = _load_tile(_ptrs(Q + b * stride_qb, offs_m, stride_qn, offs_d), offs_m, NQ, offs_d, D, EVEN_N, EVEN_D)
        do = _load_tile(_ptrs(DO + b * stride_dob, offs_m, stride_don, offs_d), offs_m, NQ, offs_d, DV, EVEN_N, EVEN_D)
        lse2 = _load_row(LSE + b * NQ + offs_m, offs_m, NQ, EVEN_N) * TL_LOG2E
        delta = _load_row(DELTA + b * NQ + offs_m, offs_m, NQ, EVEN_N)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        k_base = K + b * stride_kb
        v_base = V + b * stride_vb
        for start_n in range(0, NK, BLOCK_N):
            offs_n = start_n + offs_n0
            k = _load_tile(_ptrs(k_base, offs_n, stride_kn, offs_d), offs_n, NK, offs_d, D, EVEN_N, EVEN_D)
            v = _load_tile(_ptrs(v_base, offs_n, stride_vn, offs_d), offs_n, NK, offs_d, DV, EVEN_N, EVEN_D)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            p = tl.math.exp2(qk - lse2[:, None])
            if not EVEN_N:
                p = tl.where(offs_n[None, :] < NK, p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        dq = dq * sm_scale
        _store_tile(_ptrs(DQ + b * stride_dqb, offs_m, stride_dqn, offs_d), dq.to(DQ.dtype.element_ty),
                    offs_m, NQ, offs_d, D, EVEN_N, EVEN_D)


@triton.jit(do_not_specialize=_no_spec("z", "do", "dz"))
def _identity_bwd_kernel(
    Z, DO, LSE, DELTA, DZ,
    stride_zb, stride_zn, stride_dob, stride_don, stride_dzb, stride_dzn,
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
    Z, DO, DZ: (B, N, D), unit feature stride, batch / sequence strides and D in units of 8;
    LSE, DELTA: (B, N) contiguous float32.
    """
    stride_zb, stride_zn, stride_dob, stride_don = stride_zb * TL_ALIGN, stride_zn * TL_ALIGN, stride_dob * TL_ALIGN, stride_don * TL_ALIGN
    stride_dzb, stride_dzn = stride_dzb * TL_ALIGN, stride_dzn * TL_ALIGN
    D = D * TL_ALIGN
    pid_j = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_j = pid_j * BLOCK + tl.arange(0, BLOCK)
    offs_i0 = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    b_first = pid_b * seqs_per_prog
    for s in range(0, seqs_per_prog):
        b = tl.minimum(b_first + s, B - 1).to(tl.int64)
        z_base = Z + b * stride_zb
        do_base = DO + b * stride_dob
        zj = _load_tile(_ptrs(z_base, offs_j, stride_zn, offs_d), offs_j, N, offs_d, D, EVEN_N, EVEN_D)
        doj = _load_tile(_ptrs(do_base, offs_j, stride_don, offs_d), offs_j, N, offs_d, D, EVEN_N, EVEN_D)
        lse2_j = _load_row(LSE + b * N + offs_j, offs_j, N, EVEN_N) * TL_LOG2E
        delta_j = _load_row(DELTA + b * N + offs_j, offs_j, N, EVEN_N)
        dv = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
        dkq = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
        for start_i in range(0, N, BLOCK):
            offs_i = start_i + offs_i0
            zi = _load_tile(_ptrs(z_base, offs_i, stride_zn, offs_d), offs_i, N, offs_d, D, EVEN_N, EVEN_D)
            doi = _load_tile(_ptrs(do_base, offs_i, stride_don, offs_d), offs_i, N, offs_d, D, EVEN_N, EVEN_D)
            lse2_i = _load_row(LSE + b * N + offs_i, offs_i, N, EVEN_N) * TL_LOG2E
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
        _store_tile(_ptrs(DZ + b * stride_dzb, offs_j, stride_dzn, offs_d), dz.to(DZ.dtype.element_ty),
                    offs_j, N, offs_d, D, EVEN_N, EVEN_D)


# ----------------------------------------------------------------------------------------------
# heuristics: one launch configuration per (kernel, feature block, dtype)
# ----------------------------------------------------------------------------------------------
_BLOCK_DS = (16, 32, 64, 128, 256)
_DTYPES = TL_DTYPES
KERNELS = ("fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq", "identity_bwd")

#: (BLOCK, num_warps, num_stages) per (kernel, BLOCK_D, 16-bit inputs), chosen from ``ptxas -v``
#: (benchmarks/compile_report.py): no spills on sm_80 / sm_90a; most configurations use 64-210
#: registers, a few 16-bit BLOCK_D=64/128 ones reach 247-255 on sm_80 (without spilling).
#: float32 inputs at torch's default precision use IEEE float32 products, which run on the FMA units with
#: the operands held in registers, so their tiles are smaller than the tensor-core 16-bit ones at the
#: same feature block (the TF32 variants use the same float32 tiles).
_LAUNCH: dict[tuple[str, int, bool], tuple[int, int, int] | None] = {}





def _set_launch(kernel: str, sixteen: bool, table: dict[int, tuple[int, int, int] | None]) -> None:
    for bd, cfg in table.items():
        _LAUNCH[(kernel, bd, sixteen)] = cfg


# BLOCK_D:                            16            32            64            128           256
_set_launch("fwd", False,            {16: (32, 4, 1), 32: (32, 4, 1), 64: (32, 8, 1), 128: (16, 8, 1), 256: (16, 8, 1)})
_set_launch("fwd", True,             {16: (64, 4, 2), 32: (64, 4, 2), 64: (64, 4, 2), 128: (64, 8, 2), 256: (32, 8, 1)})
_set_launch("bwd_preprocess", False, {16: (64, 4, 1), 32: (64, 4, 1), 64: (64, 4, 1), 128: (32, 4, 1), 256: (16, 4, 1)})
_set_launch("bwd_preprocess", True,  {16: (64, 4, 1), 32: (64, 4, 1), 64: (64, 4, 1), 128: (32, 4, 1), 256: (16, 4, 1)})
_set_launch("bwd_dkdv", False,       {16: (32, 4, 1), 32: (32, 4, 1), 64: (32, 8, 1), 128: (16, 4, 1), 256: (16, 8, 1)})
_set_launch("bwd_dkdv", True,        {16: (64, 4, 1), 32: (64, 4, 1), 64: (32, 4, 1), 128: (32, 4, 1), 256: (16, 8, 1)})
_set_launch("bwd_dq", False,         {16: (16, 4, 1), 32: (32, 4, 1), 64: (16, 4, 1), 128: (16, 8, 1), 256: (16, 4, 1)})
_set_launch("bwd_dq", True,          {16: (64, 4, 1), 32: (64, 4, 1), 64: (64, 8, 1), 128: (32, 8, 1), 256: (16, 8, 1)})
# The fused identity backward holds four tiles and three score-sized products per step. In float32
# (FMA products keep each thread's operand rows and columns of length BLOCK_D in registers) it spills
# from BLOCK_D = 128 on at any tile, so there ``identity_backward`` runs the general backward instead
# (None: not launched) and sums dq + dk + dv.
_set_launch("identity_bwd", False,   {16: (16, 4, 1), 32: (16, 8, 1), 64: (16, 8, 1), 128: None, 256: None})
_set_launch("identity_bwd", True,    {16: (32, 4, 1), 32: (16, 4, 1), 64: (32, 4, 1), 128: (32, 8, 1), 256: (16, 8, 1)})


def max_features(dtype: torch.dtype) -> int:
    """Largest D, Dv the kernels take (any dtype): ``MAX_D``."""
    return MAX_D


def feature_block(d: int, dv: int, dtype: torch.dtype = torch.float32) -> int:
    """BLOCK_D = max(16, next_pow2(max(d, dv))); ValueError above ``max_features(dtype)``."""
    if max(d, dv) > max_features(dtype):
        raise ValueError(f"D: the Triton attention kernels support feature sizes up to {max_features(dtype)}, "
                         f"got D={d}, Dv={dv}")
    return _pow2_block(max(d, dv))


def launch_config(kernel: str, bd: int, dtype: torch.dtype) -> tuple[int, int, int] | None:
    """(BLOCK, num_warps, num_stages) the launchers use for ``kernel`` at feature block ``bd``
    (None: ``kernel`` is not launched there)."""
    return _LAUNCH[(kernel, bd, dtype != torch.float32)]


def _seqs_per_program(b: int, n_blocks: int, n: int, bd: int) -> int:
    """Sequences per program (a runtime argument: no extra compile): several when one sequence is a
    small amount of work (a single block with ``N * D`` small) and the batch is large, keeping at
    least ~2048 programs; at least enough to keep the second grid axis under CUDA's 65535 limit."""
    need = triton.cdiv(b, 65535)
    want = max(1, min(8, b // 2048)) if (n_blocks == 1 and n * bd <= 64 * 32) else 1
    want = max(need, want)
    for spp in range(want, min(2 * want, b) + 1):  # prefer a divisor of b: no ragged last group
        if b % spp == 0:
            return spp
    return want


def _check_dtype(*xs: torch.Tensor) -> None:
    for x in xs:
        if x.dtype not in _DTYPES:
            raise TypeError(f"q, k, v: the Triton attention kernels take float32/float16/bfloat16, got {x.dtype}")


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise (TypeError / ValueError) for what the kernels cannot take: dtypes other than
    float32/float16/bfloat16, and feature sizes above ``MAX_D``."""
    _check_dtype(q, k, v)
    feature_block(q.shape[2], v.shape[2], q.dtype)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _span_ok(x: torch.Tensor) -> bool:
    """True when the in-sequence offsets (dims 1 and 2) of ``x`` fit in int32."""
    return (x.shape[1] - 1) * x.stride(1) + (x.shape[2] - 1) * x.stride(2) <= _INT32_MAX


def _fits(x: torch.Tensor) -> bool:
    """True when the kernels can take ``x`` as it is: unit feature stride, a feature size and batch /
    sequence strides that are multiples of ALIGN (dimensions of size 1 excepted), data aligned to
    16 bytes (what the compiled kernels assume), strides and in-sequence offsets within int32."""
    if x.shape[2] % ALIGN or x.stride(2) != 1 or x.data_ptr() % 16:
        return False
    for dim in (0, 1):
        if x.shape[dim] > 1 and (x.stride(dim) % ALIGN or x.stride(dim) > _INT32_MAX):
            return False
    return _span_ok(x)


def _prep(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when ``_fits(x)``; else a contiguous copy whose feature dimension is padded with
    zeros to a multiple of ALIGN (zero features change no score, and give zero output columns)."""
    if _fits(x):
        return x
    B, N, D = x.shape
    dp = _round_up(D, ALIGN)
    y = torch.empty((B, N, dp), device=x.device, dtype=x.dtype)
    if dp != D:
        y[..., D:] = 0
    y[..., :D] = x
    if not _span_ok(y):
        raise ValueError(f"one sequence of shape {tuple(x.shape[1:])} exceeds 2^31 elements")
    return y


def _buffer(given: torch.Tensor | None, B: int, N: int, d: int, like: torch.Tensor) -> torch.Tensor:
    """Where a kernel writes a (B, N, d) result: ``given`` if the kernels can take it as it is, else
    a fresh (B, N, round_up(d, ALIGN)) buffer (``_finish`` copies or slices it)."""
    if given is not None and _fits(given):
        return given
    return torch.empty((B, N, _round_up(d, ALIGN)), device=like.device, dtype=like.dtype)


def _finish(buf: torch.Tensor, d: int, given: torch.Tensor | None) -> torch.Tensor:
    """The (B, N, d) result held in ``buf``: copied into ``given`` when one was given."""
    res = buf if buf.shape[2] == d else buf[..., :d]
    if given is None:
        return res if res is buf else res.contiguous()
    if given is not buf:
        given.copy_(res)
    return given


def _rows(given: torch.Tensor | None, B: int, N: int, device) -> torch.Tensor:
    """A (B, N) contiguous, 16-byte aligned float32 buffer (``given`` when it is one)."""
    if given is not None and given.is_contiguous() and given.dtype == torch.float32 and given.data_ptr() % 16 == 0:
        return given
    return torch.empty((B, N), device=device, dtype=torch.float32)


def _rows_in(x: torch.Tensor) -> torch.Tensor:
    """LSE as a kernel input: contiguous float32, 16-byte aligned."""
    if x.is_contiguous() and x.dtype == torch.float32 and x.data_ptr() % 16 == 0:
        return x
    y = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    y.copy_(x)
    return y


def _st(x: torch.Tensor) -> tuple[int, int]:
    """(batch, sequence) strides in units of ALIGN; 0 for a dimension of size 1."""
    return tuple(x.stride(i) // ALIGN if x.shape[i] > 1 else 0 for i in (0, 1))


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
    B, NQ, D = q.shape
    NK, DV = k.shape[1], v.shape[2]
    bd = feature_block(D, DV, q.dtype)
    q = _prep(q)
    k, v = (q, q) if identity else (_prep(k), _prep(v))
    Dp, DVp = q.shape[2], v.shape[2]
    blk, nw, ns = launch_config("fwd", bd, q.dtype)
    o = _buffer(out, B, NQ, DV, q)
    lse_buf = _rows(lse, B, NQ, q.device)
    n_blocks = triton.cdiv(NQ, blk)
    spp = _seqs_per_program(B, n_blocks, max(NQ, NK), bd)
    _attn_fwd_kernel[(n_blocks, triton.cdiv(B, spp))](
        q, k, v, o, lse_buf, *_st(q), *_st(k), *_st(v), *_st(o),
        B, NQ, NK, Dp // ALIGN, DVp // ALIGN, float(scale) * LOG2E, spp,
        BLOCK_M=blk, BLOCK_N=blk, BLOCK_D=bd,
        EVEN_N=(NQ % blk == 0 and NK % blk == 0), EVEN_D=(Dp == bd and DVp == bd),
        IDENTITY=identity, DOT_PRECISION=dot_precision(q.dtype), num_warps=nw, num_stages=ns, maxnreg=MAXNREG,
    )
    if lse is not None and lse is not lse_buf:
        lse.copy_(lse_buf)
        lse_buf = lse
    return _finish(o, DV, out), lse_buf


def _delta(o: torch.Tensor, do: torch.Tensor, bd: int) -> torch.Tensor:
    """Delta = rowsum(o * do) (B, NQ) float32; ``o`` and ``do`` already prepared."""
    B, NQ, DVp = o.shape
    blk, nw, ns = launch_config("bwd_preprocess", bd, o.dtype)
    delta = torch.empty((B, NQ), device=o.device, dtype=torch.float32)
    n_blocks = triton.cdiv(NQ, blk)
    spp = _seqs_per_program(B, n_blocks, NQ, bd)
    _attn_bwd_preprocess_kernel[(n_blocks, triton.cdiv(B, spp))](
        o, do, delta, *_st(o), *_st(do), B, NQ, DVp // ALIGN, spp,
        BLOCK_M=blk, BLOCK_D=bd, num_warps=nw, num_stages=ns, maxnreg=MAXNREG,
    )
    return delta


def attention_backward(q, k, v, out, lse, do, scale: float, dq=None, dk=None, dv=None):
    """Launch the backward: Delta preprocess, dk/dv per key block, dq per query block.

    Returns (dq, dk, dv) in the input dtype; ``dq``/``dk``/``dv`` may be given and are overwritten.
    """
    _check_dtype(q, k, v, out, do)
    B, NQ, D = q.shape
    NK, DV = k.shape[1], v.shape[2]
    bd = feature_block(D, DV, q.dtype)
    q, k, v, out, do = (_prep(x) for x in (q, k, v, out, do))
    lse = _rows_in(lse)
    Dp, DVp = q.shape[2], v.shape[2]
    dq_buf, dk_buf, dv_buf = _buffer(dq, B, NQ, D, q), _buffer(dk, B, NK, D, q), _buffer(dv, B, NK, DV, q)
    delta = _delta(out, do, bd)
    prec = dot_precision(q.dtype)
    even_d = Dp == bd and DVp == bd
    sizes = (B, NQ, NK, Dp // ALIGN, DVp // ALIGN, float(scale), float(scale) * LOG2E)

    blk, nw, ns = launch_config("bwd_dkdv", bd, q.dtype)
    n_blocks = triton.cdiv(NK, blk)
    spp = _seqs_per_program(B, n_blocks, max(NQ, NK), bd)
    _attn_bwd_dkdv_kernel[(n_blocks, triton.cdiv(B, spp))](
        q, k, v, do, lse, delta, dk_buf, dv_buf,
        *_st(q), *_st(k), *_st(v), *_st(do), *_st(dk_buf), *_st(dv_buf), *sizes, spp,
        BLOCK_M=blk, BLOCK_N=blk, BLOCK_D=bd, EVEN_N=(NQ % blk == 0 and NK % blk == 0), EVEN_D=even_d,
        DOT_PRECISION=prec, num_warps=nw, num_stages=ns, maxnreg=MAXNREG,
    )
    blk, nw, ns = launch_config("bwd_dq", bd, q.dtype)
    n_blocks = triton.cdiv(NQ, blk)
    spp = _seqs_per_program(B, n_blocks, max(NQ, NK), bd)
    _attn_bwd_dq_kernel[(n_blocks, triton.cdiv(B, spp))](
        q, k, v, do, lse, delta, dq_buf,
        *_st(q), *_st(k), *_st(v), *_st(do), *_st(dq_buf), *sizes, spp,
        BLOCK_M=blk, BLOCK_N=blk, BLOCK_D=bd, EVEN_N=(NQ % blk == 0 and NK % blk == 0), EVEN_D=even_d,
        DOT_PRECISION=prec, num_warps=nw, num_stages=ns, maxnreg=MAXNREG,
    )
    return _finish(dq_buf, D, dq), _finish(dk_buf, D, dk), _finish(dv_buf, DV, dv)


def identity_forward(z: torch.Tensor, scale: float, out=None, lse=None):
    """Forward of ``softmax(scale z z^T) z``: the identity specialisation of ``attention_forward``."""
    return attention_forward(z, z, z, scale, out=out, lse=lse)


def identity_backward(z, out, lse, do, scale: float, dz=None):
    """Backward of the identity case: Delta preprocess, then one fused kernel returning dz (B, N, D)."""
    _check_dtype(z, out, do)
    B, N, D = z.shape
    bd = feature_block(D, D, z.dtype)
    if launch_config("identity_bwd", bd, z.dtype) is None:  # unfused: dz = dq + dk + dv
        dq, dk, dv = attention_backward(z, z, z, out, lse, do, scale)
        res = dq.add_(dk).add_(dv)
        return res if dz is None else dz.copy_(res)
    z, out, do = _prep(z), _prep(out), _prep(do)
    lse = _rows_in(lse)
    dz_buf = _buffer(dz, B, N, D, z)
    delta = _delta(out, do, bd)
    blk, nw, ns = launch_config("identity_bwd", bd, z.dtype)
    n_blocks = triton.cdiv(N, blk)
    spp = _seqs_per_program(B, n_blocks, N, bd)
    _identity_bwd_kernel[(n_blocks, triton.cdiv(B, spp))](
        z, do, lse, delta, dz_buf, *_st(z), *_st(do), *_st(dz_buf),
        B, N, z.shape[2] // ALIGN, float(scale), float(scale) * LOG2E, spp,
        BLOCK=blk, BLOCK_D=bd, EVEN_N=(N % blk == 0), EVEN_D=(z.shape[2] == bd),
        DOT_PRECISION=dot_precision(z.dtype), num_warps=nw, num_stages=ns, maxnreg=MAXNREG,
    )
    return _finish(dz_buf, D, dz)


# ----------------------------------------------------------------------------------------------
# ahead-of-time compile configurations
# ----------------------------------------------------------------------------------------------
_KERNEL_FNS = {"fwd": _attn_fwd_kernel, "identity_fwd": _attn_fwd_kernel,
               "bwd_preprocess": _attn_bwd_preprocess_kernel, "bwd_dkdv": _attn_bwd_dkdv_kernel,
               "bwd_dq": _attn_bwd_dq_kernel, "identity_bwd": _identity_bwd_kernel}
_DATA = {"Q", "K", "V", "O", "DO", "DK", "DV_", "DQ", "Z", "DZ"}     # pointers of the data dtype


def kernel_config(name: str, dt: str, constexprs: dict, num_warps: int, num_stages: int) -> dict:
    """One compile configuration (``_common.make_config``) of kernel ``name`` (a key of ``_KERNEL_FNS``)
    for data dtype ``dt``: every pointer 16-byte aligned (as the launchers guarantee), LSE / DELTA
    float32, integers i32 (not specialised by the JIT), the two scales fp32."""
    fn = _KERNEL_FNS[name]
    args = set(fn.arg_names)
    pointers = {a: None for a in _DATA & args} | {a: "fp32" for a in ("LSE", "DELTA") if a in args}
    return make_config(f"attention.{name}", fn, dt, constexprs, num_warps, num_stages, pointers=pointers,
                       fp32=tuple(a for a in ("qk_scale", "sm_scale") if a in args), aligned=tuple(pointers),
                       maxnreg=MAXNREG)


def compile_configs(dtypes=("fp32", "fp16", "bf16")) -> list[dict]:
    """Exactly the (kernel, constexprs, num_warps, num_stages) the launchers can launch, for ``dtypes``:
    per (kernel, BLOCK_D, dtype) the one ``launch_config`` choice, with EVEN_N / EVEN_D (and IDENTITY
    for the forward) and, for float32, the ``DOT_PRECISION`` of each torch float32 matmul precision
    (``_common.dot_precisions``) as the only other axes; the preprocess has none.

    Each entry is a ``_common.make_config`` dict.
    """
    out = []
    flags = list(itertools.product((True, False), (True, False)))
    for dt, bd in itertools.product(dtypes, _BLOCK_DS):
        tdt = next(t for t, name in _DTYPES.items() if name == dt)
        precisions = dot_precisions(tdt)
        blk, nw, ns = launch_config("fwd", bd, tdt)
        for prec, identity, (even_n, even_d) in itertools.product(precisions, (False, True), flags):
            c = dict(BLOCK_M=blk, BLOCK_N=blk, BLOCK_D=bd, EVEN_N=even_n, EVEN_D=even_d, IDENTITY=identity,
                     DOT_PRECISION=prec)
            out.append(kernel_config("identity_fwd" if identity else "fwd", dt, c, nw, ns))
        blk, nw, ns = launch_config("bwd_preprocess", bd, tdt)
        out.append(kernel_config("bwd_preprocess", dt, dict(BLOCK_M=blk, BLOCK_D=bd), nw, ns))
        for name in ("bwd_dkdv", "bwd_dq", "identity_bwd"):
            if launch_config(name, bd, tdt) is None:
                continue
            blk, nw, ns = launch_config(name, bd, tdt)
            for prec, (even_n, even_d) in itertools.product(precisions, flags):
                blocks = dict(BLOCK=blk) if name == "identity_bwd" else dict(BLOCK_M=blk, BLOCK_N=blk)
                c = dict(**blocks, BLOCK_D=bd, EVEN_N=even_n, EVEN_D=even_d, DOT_PRECISION=prec)
                out.append(kernel_config(name, dt, c, nw, ns))
    return out
