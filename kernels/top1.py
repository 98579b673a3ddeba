"""Top-1 (hard) attention: Triton kernels and their launchers.

Forward: ``idx_i = argmax_j s_ij`` (ties: lowest j; a row with a NaN score takes its first NaN
column, as ``torch.argmax`` does, and outputs NaN) and ``out_i = v[idx_i]``, with
``s_ij = q_i . k_j (+ g_ij)``; one pass over the key blocks with a running max / argmax, no
score buffer.

Backward (straight-through):
  * ``dv_j = sum_{i: idx_i = j} dout_i``: the launcher sorts each batch's index map (stable,
    torch ops); one program per key block sums its contiguous run of the sorted queries in a
    fixed order with a one-hot ``tl.dot``. No atomics: results repeat bit for bit.
  * dq, dk through the surrogate ``O_soft = softmax(s / T) v`` (same Gumbel noise):
    ``P = softmax(s / T)``, ``dP = dout v^T``, ``dS = P * (dP - Delta) / T`` with
    ``Delta_i = sum_j P_ij dP_ij = dout_i . O_soft_i`` (the *surrogate* output, not the hard one),
    so a preprocess pass computes the log-sum-exp of ``s / T`` and ``O_soft`` online and stores
    only ``lse`` and ``Delta`` (B, N) float32; then ``dq = dS k`` per query block and
    ``dk = dS^T q`` per key block. Nothing of size N x N is ever stored.

Gumbel noise ``g_ij = -log(-log(u))`` with ``u`` = Philox4x32-10 keyed by ``seed`` at global
element index ``e = (b * N + i) * N + j``: counter ``(e // 4 low 32 bits, e // 4 high bits, 0,
STREAM_GUMBEL = 1)``, word ``e % 4``, ``tl.uint_to_uniform_float``, clamped to [1e-10, 1 - 1e-7].

Determinism: no atomics anywhere, and every kernel reads contiguous tensors with 16-byte aligned
data (``_prep`` copies any other layout; ``_buffer`` / ``_finish`` do the same for given outputs) and
unspecialised integers, so one input shape and dtype always runs the same compiled variant with the
same reduction order, whatever the caller's strides: dq, dk, dv repeat bit for bit.

Precision: scores and all accumulations in float32; float32 dots follow torch's float32 matmul
precision (the fp32 policy of ``_common``: IEEE products at torch's default "highest", so the argmax
agrees with an fp32 eager matmul up to rounding-level near-ties; TF32 at "high" and
"medium"); float16/bfloat16 inputs feed tensor cores in their own dtype (probabilities and dS are
rounded to that dtype before their dots, as in flash attention). The saved log-sum-exp is in natural
log, as the attention kernels'.
Launch configurations: ``launch_config`` picks (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel,
dtype class (float32 / 16-bit) and BLOCK_D = max(16, next_pow2(max(D, Dv))) from a table tuned so
that no configuration spills registers on sm_80 or sm_90a; ``compile_configs`` lists exactly those
configurations for the ahead-of-time compile report.

Limits: ``D, Dv <= max_features(dtype)``: ``MAX_D`` = 128 (the workload's largest head size;
BLOCK_D = 256 tiles spill at every tile size worth launching) for float16/bfloat16 and
``MAX_D_FP32`` = 64 for float32 (its dq / dk tiles spilled at BLOCK_D = 128 with 3xTF32 dots, even
at 16 x 16 with 4 or 8 warps; the fp32 policy no longer uses 3xTF32, the limit stays until re-measured). The launchers raise above the limit and ``fastscore.ops`` routes such inputs
to the torch reference.
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from ._common import (
    LOG2E,
    STREAM_GUMBEL,
    TL_DTYPES,
    TL_LN2,
    TL_LOG2E,
    dot_precision,
    dot_precisions,
    make_config,
    philox_group,
)
from ._common import feature_block as _pow2_block

MAX_D = 128
MAX_D_FP32 = 64
KERNELS = ("fwd", "bwd_preprocess", "bwd_dq", "bwd_dk", "bwd_dv")
_DTYPES = tuple(TL_DTYPES)
_BLOCK_DS = (16, 32, 64, 128)
#: integer arguments, never specialised by value (see ``_common``): sizes and strides equal to 1 or
#: divisible by 16 would otherwise compile extra variants (and a different variant for a strided
#: input is a different reduction layout: see ``_prep``); ``seed`` is annotated int64, so its type
#: does not depend on its magnitude either
_INT_ARGS = ("seed", "N", "D", "DV", "n_blocks", "stride_ib", "stride_in",
             *(f"stride_{t}{a}" for t in ("q", "k", "v", "o", "do", "dq", "dk", "dv") for a in "bnd"))


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _gumbel(seed, b, offs_m, offs_n, N):
    """Gumbel(0, 1) noise of shape (len(offs_m), len(offs_n)) for batch ``b`` (int64 scalar)."""
    e = (b * N + offs_m.to(tl.int64)[:, None]) * N + offs_n.to(tl.int64)[None, :]
    r0, r1, r2, r3 = philox_group(seed, e // 4, 0, STREAM_GUMBEL)
    w = e % 4
    word = tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))
    u = tl.uint_to_uniform_float(word)
    u = tl.minimum(tl.maximum(u, 1e-10), 1.0 - 1e-7)
    return -tl.log(-tl.log(u))


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_INT_ARGS)
def _top1_fwd_kernel(Q, K, V, Out, Idx, seed: tl.int64, N, D, DV,
                     stride_qb, stride_qn, stride_qd, stride_kb, stride_kn, stride_kd,
                     stride_vb, stride_vn, stride_vd, stride_ob, stride_on, stride_od,
                     stride_ib, stride_in,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     GUMBEL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program: BLOCK_M queries of batch ``program_id(1)``; scans all N keys once.

    Q, K: (B, N, D) and V: (B, N, DV), any strides (stride_xb / _xn / _xd: batch, token,
    feature). Out: (B, N, DV) in V's dtype; Idx: (B, N) int64. ``seed``: Gumbel key (GUMBEL).
    BLOCK_D >= max(D, DV), a power of two >= 16; padded features are masked to 0.
    """
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    q = tl.load(Q + b * stride_qb + offs_m.to(tl.int64)[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None] & (offs_d < D)[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    idx_i = tl.zeros((BLOCK_M,), tl.int32)
    nan_i = tl.zeros((BLOCK_M,), tl.int32) + N  # first NaN column, N if none
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        kt = tl.load(K + b * stride_kb + offs_n.to(tl.int64)[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=mask_n[None, :] & (offs_d < D)[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION)
        if GUMBEL:
            s += _gumbel(seed, b, offs_m, offs_n, N)
        is_nan = (s != s) & mask_n[None, :]
        nan_i = tl.minimum(nan_i, tl.min(tl.where(is_nan, offs_n[None, :], N), 1))
        s = tl.where(mask_n[None, :] & (s == s), s, float("-inf"))
        bmax = tl.max(s, 1)
        barg = tl.min(tl.where(s == bmax[:, None], offs_n[None, :], N), 1)
        upd = bmax > m_i  # strict: an earlier block keeps its (lower) index on ties
        m_i = tl.where(upd, bmax, m_i)
        idx_i = tl.where(upd, barg, idx_i)
    has_nan = nan_i < N
    idx_i = tl.where(has_nan, nan_i, idx_i)
    mask_v = mask_m[:, None] & (offs_d < DV)[None, :]
    vrow = tl.load(V + b * stride_vb + idx_i.to(tl.int64)[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                   mask=mask_v, other=0.0).to(tl.float32)
    vrow = tl.where(has_nan[:, None], float("nan"), vrow)
    tl.store(Out + b * stride_ob + offs_m.to(tl.int64)[:, None] * stride_on + offs_d[None, :] * stride_od,
             vrow.to(Out.dtype.element_ty), mask=mask_v)
    tl.store(Idx + b * stride_ib + offs_m.to(tl.int64) * stride_in, idx_i.to(tl.int64), mask=mask_m)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_INT_ARGS)
def _top1_bwd_preprocess_kernel(Q, K, V, DO, Lse, Delta, seed: tl.int64, N, D, DV, scale2,
                                stride_qb, stride_qn, stride_qd, stride_kb, stride_kn, stride_kd,
                                stride_vb, stride_vn, stride_vd, stride_dob, stride_don, stride_dod,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                GUMBEL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program: BLOCK_M queries of batch ``program_id(1)``; online softmax of s / T over all keys.

    Writes ``Lse`` = the natural-log log-sum-exp of ``s / T`` (computed in the exp2 domain with
    ``scale2 = log2(e) / T``) and
    ``Delta = rowsum(dO * O_soft)`` with ``O_soft = softmax(s / T) v``; both (B, N) float32
    contiguous. Q, K: (B, N, D); V, DO: (B, N, DV); strides as in the forward kernel.
    """
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    q = tl.load(Q + b * stride_qb + offs_m.to(tl.int64)[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None] & (offs_d < D)[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        kt = tl.load(K + b * stride_kb + offs_n.to(tl.int64)[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=mask_n[None, :] & (offs_d < D)[:, None], other=0.0)
        v = tl.load(V + b * stride_vb + offs_n.to(tl.int64)[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=mask_n[:, None] & (offs_d < DV)[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION)
        if GUMBEL:
            s += _gumbel(seed, b, offs_m, offs_n, N)
        s = tl.where(mask_n[None, :], s * scale2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    o = acc / l_i[:, None]
    do = tl.load(DO + b * stride_dob + offs_m.to(tl.int64)[:, None] * stride_don + offs_d[None, :] * stride_dod,
                 mask=mask_m[:, None] & (offs_d < DV)[None, :], other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    tl.store(Lse + b * N + offs_m, (m_i + tl.log2(l_i)) * TL_LN2, mask=mask_m)
    tl.store(Delta + b * N + offs_m, delta, mask=mask_m)


@triton.jit(do_not_specialize=_INT_ARGS)
def _top1_bwd_dq_kernel(Q, K, V, DO, Lse, Delta, DQ, seed: tl.int64, N, D, DV, scale2, inv_t,
                        stride_qb, stride_qn, stride_qd, stride_kb, stride_kn, stride_kd,
                        stride_vb, stride_vn, stride_vd, stride_dob, stride_don, stride_dod,
                        stride_dqb, stride_dqn, stride_dqd,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        GUMBEL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program: dq for BLOCK_M queries of batch ``program_id(1)``, looping over all key blocks.

    ``dq_i = sum_j P_ij (dP_ij - Delta_i) k_j / T`` with ``P = exp2(s * scale2 - Lse * log2(e))``
    recomputed from ``Lse`` (natural log, see the preprocess kernel) and ``dP = dO v^T``. DQ: (B, N, D) in Q's dtype.
    """
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_qd = mask_m[:, None] & (offs_d < D)[None, :]
    q = tl.load(Q + b * stride_qb + offs_m.to(tl.int64)[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=mask_qd, other=0.0)
    do = tl.load(DO + b * stride_dob + offs_m.to(tl.int64)[:, None] * stride_don + offs_d[None, :] * stride_dod,
                 mask=mask_m[:, None] & (offs_d < DV)[None, :], other=0.0)
    lse2 = tl.load(Lse + b * N + offs_m, mask=mask_m, other=0.0) * TL_LOG2E
    delta = tl.load(Delta + b * N + offs_m, mask=mask_m, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        k = tl.load(K + b * stride_kb + offs_n.to(tl.int64)[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=mask_n[:, None] & (offs_d < D)[None, :], other=0.0)
        v = tl.load(V + b * stride_vb + offs_n.to(tl.int64)[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=mask_n[:, None] & (offs_d < DV)[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if GUMBEL:
            s += _gumbel(seed, b, offs_m, offs_n, N)
        p = tl.where(mask_n[None, :], tl.exp2(s * scale2 - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    tl.store(DQ + b * stride_dqb + offs_m.to(tl.int64)[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
             (dq * inv_t).to(DQ.dtype.element_ty), mask=mask_qd)


@triton.jit(do_not_specialize=_INT_ARGS)
def _top1_bwd_dk_kernel(Q, K, V, DO, Lse, Delta, DK, seed: tl.int64, N, D, DV, scale2, inv_t,
                        stride_qb, stride_qn, stride_qd, stride_kb, stride_kn, stride_kd,
                        stride_vb, stride_vn, stride_vd, stride_dob, stride_don, stride_dod,
                        stride_dkb, stride_dkn, stride_dkd,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        GUMBEL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program: dk for BLOCK_N keys of batch ``program_id(1)``, looping over all query blocks.

    ``dk_j = sum_i P_ij (dP_ij - Delta_i) q_i / T``; same inputs as the dq kernel.
    DK: (B, N, D) in K's dtype.
    """
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_kd = mask_n[:, None] & (offs_d < D)[None, :]
    k = tl.load(K + b * stride_kb + offs_n.to(tl.int64)[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=mask_kd, other=0.0)
    v = tl.load(V + b * stride_vb + offs_n.to(tl.int64)[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=mask_n[:, None] & (offs_d < DV)[None, :], other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        q = tl.load(Q + b * stride_qb + offs_m.to(tl.int64)[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                    mask=mask_m[:, None] & (offs_d < D)[None, :], other=0.0)
        do = tl.load(DO + b * stride_dob + offs_m.to(tl.int64)[:, None] * stride_don + offs_d[None, :] * stride_dod,
                     mask=mask_m[:, None] & (offs_d < DV)[None, :], other=0.0)
        lse2 = tl.load(Lse + b * N + offs_m, mask=mask_m, other=0.0) * TL_LOG2E
        delta = tl.load(Delta + b * N + offs_m, mask=mask_m, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if GUMBEL:
            s += _gumbel(seed, b, offs_m, offs_n, N)
        p = tl.where(mask_m[:, None] & mask_n[None, :], tl.exp2(s * scale2 - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    tl.store(DK + b * stride_dkb + offs_n.to(tl.int64)[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             (dk * inv_t).to(DK.dtype.element_ty), mask=mask_kd)


@triton.jit(do_not_specialize=_INT_ARGS)
def _top1_bwd_dv_kernel(DO, SortedIdx, Perm, Bounds, DV_out, N, DV, n_blocks,
                        stride_dob, stride_don, stride_dod, stride_dvb, stride_dvn, stride_dvd,
                        BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """One program: dv for BLOCK_N keys of batch ``program_id(1)`` by a deterministic gather.

    SortedIdx, Perm: (B, N) int64 contiguous, each row of the index map sorted (stable) and the
    query behind each entry. Bounds: (B, n_blocks + 1) int64 contiguous, ``Bounds[b, t]`` = number
    of entries of row b below key ``t * BLOCK_N``: the queries that picked this program's keys are
    ``Perm[b, Bounds[b, pid] : Bounds[b, pid + 1]]``, summed BLOCK_T at a time in that order
    (one-hot dot, float32 accumulation). DO: (B, N, DV); DV_out: (B, N, DV) in DO's dtype.
    """
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < DV
    start = tl.load(Bounds + b * (n_blocks + 1) + pid_n).to(tl.int32)
    end = tl.load(Bounds + b * (n_blocks + 1) + pid_n + 1).to(tl.int32)
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < end
        key = tl.load(SortedIdx + b * N + offs_t, mask=mask_t, other=-1).to(tl.int32)
        qi = tl.load(Perm + b * N + offs_t, mask=mask_t, other=0)
        do = tl.load(DO + b * stride_dob + qi[:, None] * stride_don + offs_d[None, :] * stride_dod,
                     mask=mask_t[:, None] & mask_d[None, :], other=0.0)
        onehot = (offs_n[:, None] == key[None, :]).to(do.dtype)
        acc += tl.dot(onehot, do, input_precision=DOT_PRECISION)
    tl.store(DV_out + b * stride_dvb + offs_n.to(tl.int64)[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             acc.to(DV_out.dtype.element_ty), mask=(offs_n < N)[:, None] & mask_d[None, :])


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
#: (BLOCK_M, BLOCK_N, num_warps, num_stages) per (kernel, dtype class, BLOCK_D, gumbel); dtype class
#: "fp32" (tuned with 3xTF32 dots, before the fp32 policy dropped them; every DOT_PRECISION uses them) or "half" (float16 and bfloat16). For ``bwd_dv`` BLOCK_M is BLOCK_T, the
#: queries gathered per step. Chosen so that no configuration spills on sm_80 or sm_90a (see
#: ``compile_configs`` and benchmarks/compile_report.py).
_TUNED: dict[tuple[str, str, int, bool], tuple[int, int, int, int]] = {
    ("fwd", "fp32", 16, False): (64, 32, 4, 2),
    ("fwd", "fp32", 16, True): (64, 32, 4, 2),
    ("fwd", "fp32", 32, False): (64, 32, 4, 2),
    ("fwd", "fp32", 32, True): (64, 32, 4, 2),
    ("fwd", "fp32", 64, False): (32, 32, 8, 1),
    ("fwd", "fp32", 64, True): (32, 16, 4, 2),
    ("fwd", "half", 16, False): (64, 64, 4, 2),
    ("fwd", "half", 16, True): (64, 32, 4, 2),
    ("fwd", "half", 32, False): (64, 64, 4, 2),
    ("fwd", "half", 32, True): (64, 32, 4, 2),
    ("fwd", "half", 64, False): (64, 32, 4, 2),
    ("fwd", "half", 64, True): (32, 32, 4, 2),
    ("fwd", "half", 128, False): (32, 32, 4, 2),
    ("fwd", "half", 128, True): (32, 32, 4, 2),
    ("bwd_preprocess", "fp32", 16, False): (64, 32, 4, 2),
    ("bwd_preprocess", "fp32", 16, True): (64, 32, 4, 2),
    ("bwd_preprocess", "fp32", 32, False): (32, 16, 4, 2),
    ("bwd_preprocess", "fp32", 32, True): (32, 16, 4, 2),
    ("bwd_preprocess", "fp32", 64, False): (16, 16, 4, 2),
    ("bwd_preprocess", "fp32", 64, True): (16, 16, 4, 2),
    ("bwd_preprocess", "half", 16, False): (64, 64, 4, 2),
    ("bwd_preprocess", "half", 16, True): (64, 32, 4, 2),
    ("bwd_preprocess", "half", 32, False): (64, 64, 4, 2),
    ("bwd_preprocess", "half", 32, True): (32, 32, 4, 2),
    ("bwd_preprocess", "half", 64, False): (32, 32, 4, 2),
    ("bwd_preprocess", "half", 64, True): (32, 16, 4, 2),
    ("bwd_preprocess", "half", 128, False): (16, 16, 4, 2),
    ("bwd_preprocess", "half", 128, True): (16, 16, 4, 2),
    ("bwd_dq", "fp32", 16, False): (64, 32, 4, 2),
    ("bwd_dq", "fp32", 16, True): (32, 16, 4, 2),
    ("bwd_dq", "fp32", 32, False): (16, 32, 4, 2),
    ("bwd_dq", "fp32", 32, True): (16, 32, 4, 2),
    ("bwd_dq", "fp32", 64, False): (16, 32, 4, 2),
    ("bwd_dq", "fp32", 64, True): (16, 32, 4, 2),
    ("bwd_dq", "half", 16, False): (64, 64, 4, 2),
    ("bwd_dq", "half", 16, True): (64, 32, 4, 2),
    ("bwd_dq", "half", 32, False): (64, 32, 4, 2),
    ("bwd_dq", "half", 32, True): (32, 32, 4, 2),
    ("bwd_dq", "half", 64, False): (32, 32, 4, 2),
    ("bwd_dq", "half", 64, True): (16, 32, 4, 2),
    ("bwd_dq", "half", 128, False): (16, 16, 4, 2),
    ("bwd_dq", "half", 128, True): (32, 32, 4, 2),
    ("bwd_dk", "fp32", 16, False): (32, 32, 4, 2),
    ("bwd_dk", "fp32", 16, True): (16, 16, 4, 2),
    ("bwd_dk", "fp32", 32, False): (16, 16, 4, 2),
    ("bwd_dk", "fp32", 32, True): (16, 16, 4, 2),
    ("bwd_dk", "fp32", 64, False): (16, 32, 4, 2),
    ("bwd_dk", "fp32", 64, True): (16, 32, 4, 2),
    ("bwd_dk", "half", 16, False): (64, 64, 4, 2),
    ("bwd_dk", "half", 16, True): (32, 32, 4, 2),
    ("bwd_dk", "half", 32, False): (32, 32, 4, 2),
    ("bwd_dk", "half", 32, True): (32, 64, 4, 2),
    ("bwd_dk", "half", 64, False): (16, 32, 4, 2),
    ("bwd_dk", "half", 64, True): (32, 32, 4, 2),
    ("bwd_dk", "half", 128, False): (16, 16, 4, 2),
    ("bwd_dk", "half", 128, True): (32, 32, 4, 2),
    ("bwd_dv", "fp32", 16, False): (32, 64, 4, 2),
    ("bwd_dv", "fp32", 32, False): (32, 32, 4, 2),
    ("bwd_dv", "fp32", 64, False): (32, 64, 4, 2),
    ("bwd_dv", "half", 16, False): (64, 64, 4, 2),
    ("bwd_dv", "half", 32, False): (64, 64, 4, 2),
    ("bwd_dv", "half", 64, False): (32, 64, 4, 2),
    ("bwd_dv", "half", 128, False): (16, 32, 4, 2),
}


def max_features(dtype: torch.dtype) -> int:
    """Largest D, Dv the kernels take for ``dtype``: ``MAX_D_FP32`` (64) for float32 (module docstring,
    Limits), else ``MAX_D`` (128)."""
    return MAX_D_FP32 if dtype == torch.float32 else MAX_D


def feature_block(d: int, dv: int, dtype: torch.dtype = torch.float16) -> int:
    """BLOCK_D = max(16, next_pow2(max(d, dv))); ValueError above ``max_features(dtype)``."""
    if max(d, dv) > max_features(dtype):
        raise ValueError(f"top-1 kernels support D, Dv <= {max_features(dtype)} for {dtype}, got D={d}, Dv={dv}")
    return _pow2_block(max(d, dv))


#: where IEEE float32 dots (the fp32 policy at torch's default precision: FMA units, operands held in
#: registers) spill with the ``_TUNED`` float32 tiles, the tiles they use instead (ptxas -v,
#: benchmarks/compile_report.py: bwd_dk at BLOCK_D = 64 spills 400-600 bytes at 16 x 32 with 4 warps,
#: 250-360 at 16 x 16; 16 x 16 with 8 warps takes 64-69 registers on sm_80 / sm_90a, no spill)
_TUNED_IEEE: dict[tuple[str, int, bool], tuple[int, int, int, int]] = {
    ("bwd_dk", 64, False): (16, 16, 8, 1),
    ("bwd_dk", 64, True): (16, 16, 8, 1),
}


def launch_config(kernel: str, block_d: int, dtype: torch.dtype, gumbel: bool = False,
                  precision: str | None = None) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` the launchers use for ``kernel`` (one of
    ``KERNELS``) at feature block ``block_d``, input ``dtype`` and ``DOT_PRECISION`` ``precision``
    (default: ``dot_precision(dtype)`` now); ``gumbel`` is ignored by bwd_dv."""
    cls = "fp32" if dtype == torch.float32 else "half"
    gumbel = bool(gumbel) and kernel != "bwd_dv"
    prec = dot_precision(dtype) if precision is None else precision
    if cls == "fp32" and prec == "ieee" and (kernel, block_d, gumbel) in _TUNED_IEEE:
        return _TUNED_IEEE[(kernel, block_d, gumbel)]
    return _TUNED[(kernel, cls, block_d, gumbel)]


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int]:
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"expected q, k (B, N, D) and v (B, N, Dv), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"q, k, v must share a dtype among float32/float16/bfloat16, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    b, n, d = q.shape
    if n < 1 or d < 1 or v.shape[2] < 1:
        raise ValueError(f"need N >= 1, D >= 1, Dv >= 1, got shapes {tuple(q.shape)}, {tuple(v.shape)}")
    return b, n, d, v.shape[2]


def _aligned(x: torch.Tensor | None) -> bool:
    return x is not None and x.is_contiguous() and x.data_ptr() % 16 == 0


def _prep(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the kernels read it: itself when contiguous with 16-byte aligned data, else a contiguous
    copy (a fresh allocation, aligned). With integer arguments unspecialised, the compiled variant then
    depends on the shape and dtype only, never on the caller's layout: on a GPU a strided or offset
    input otherwise compiles a variant with other load layouts, whose dots may reduce in another
    order (FINDINGS.md: dq changed bitwise with the input strides on an H100)."""
    return x if _aligned(x) else x.clone(memory_format=torch.contiguous_format)  # a contiguous x too


def _buffer(given: torch.Tensor | None, like: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Where a kernel writes a result: ``given`` when the kernels can take it as it is (``_prep``), else a
    fresh contiguous buffer that ``_finish`` copies into ``given``."""
    return given if _aligned(given) else torch.empty(shape, dtype=dtype, device=like.device)


def _finish(buf: torch.Tensor, given: torch.Tensor | None) -> torch.Tensor:
    if given is None or given is buf:
        return buf
    return given.copy_(buf)


def top1_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gumbel: bool = False, seed: int = 0,
                 out: torch.Tensor | None = None, idx: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: returns ``(out (B, N, Dv) in v's dtype, idx (B, N) int64)``.

    ``out`` / ``idx`` may be given (preallocated, any strides) and are then written in place.
    """
    b, n, d, dv = _check_inputs(q, k, v)
    block_d = feature_block(d, dv, q.dtype)
    prec = dot_precision(q.dtype)
    bm, bn, warps, stages = launch_config("fwd", block_d, q.dtype, gumbel, prec)
    q, k, v = _prep(q), _prep(k), _prep(v)
    o_buf = _buffer(out, v, (b, n, dv), v.dtype)
    i_buf = _buffer(idx, q, (b, n), torch.int64)
    _top1_fwd_kernel[(triton.cdiv(n, bm), b)](
        q, k, v, o_buf, i_buf, int(seed), n, d, dv,
        *q.stride(), *k.stride(), *v.stride(), *o_buf.stride(), *i_buf.stride(),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, GUMBEL=bool(gumbel), DOT_PRECISION=prec,
        num_warps=warps, num_stages=stages)
    return _finish(o_buf, out), _finish(i_buf, idx)


def top1_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                  temperature: float, gumbel: bool = False, seed: int = 0,
                  dq: torch.Tensor | None = None, dk: torch.Tensor | None = None,
                  dv: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels: returns ``(dq, dk, dv)`` in the input dtypes.

    dv is the hard gradient (gather of ``dout`` over the queries that picked each key, from
    ``idx``); dq, dk are those of the surrogate ``softmax(s / temperature) v``. Extra memory:
    ``lse``, ``Delta`` (B, N) float32 and the sorted index map (B, N) int64 x 2.
    """
    b, n, d, dvn = _check_inputs(q, k, v)
    if dout.shape != v.shape:
        raise ValueError(f"dout must have shape {tuple(v.shape)}, got {tuple(dout.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    block_d = feature_block(d, dvn, q.dtype)
    dout, q, k, v = _prep(dout.to(v.dtype)), _prep(q), _prep(k), _prep(v)
    scale2 = LOG2E / float(temperature)
    inv_t = 1.0 / float(temperature)
    dq_buf, dk_buf, dv_buf = (_buffer(g, x, tuple(x.shape), x.dtype) for g, x in ((dq, q), (dk, k), (dv, v)))
    lse = torch.empty((b, n), dtype=torch.float32, device=q.device)
    delta = torch.empty((b, n), dtype=torch.float32, device=q.device)
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    seed, gumbel, prec = int(seed), bool(gumbel), dot_precision(q.dtype)

    def meta(kernel):
        bm, bn, warps, stages = launch_config(kernel, block_d, q.dtype, gumbel, prec)
        return bm, bn, dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, GUMBEL=gumbel, DOT_PRECISION=prec,
                            num_warps=warps, num_stages=stages)

    bm, _, kw = meta("bwd_preprocess")
    _top1_bwd_preprocess_kernel[(triton.cdiv(n, bm), b)](q, k, v, dout, lse, delta, seed, n, d, dvn, scale2,
                                                         *strides, **kw)
    bm, _, kw = meta("bwd_dq")
    _top1_bwd_dq_kernel[(triton.cdiv(n, bm), b)](q, k, v, dout, lse, delta, dq_buf, seed, n, d, dvn, scale2, inv_t,
                                                 *strides, *dq_buf.stride(), **kw)
    _, bn, kw = meta("bwd_dk")
    _top1_bwd_dk_kernel[(triton.cdiv(n, bn), b)](q, k, v, dout, lse, delta, dk_buf, seed, n, d, dvn, scale2, inv_t,
                                                 *strides, *dk_buf.stride(), **kw)
    # hard dv: sort each row of the index map, then one program per key block gathers its run
    bt, bn, warps, stages = launch_config("bwd_dv", block_d, q.dtype, precision=prec)
    sorted_idx, perm = torch.sort(idx, dim=1, stable=True)
    n_blocks = triton.cdiv(n, bn)
    edges = (torch.arange(n_blocks + 1, device=idx.device, dtype=torch.int64) * bn).clamp_(max=n)
    bounds = torch.searchsorted(sorted_idx.contiguous(), edges.expand(b, n_blocks + 1).contiguous())
    _top1_bwd_dv_kernel[(n_blocks, b)](dout, sorted_idx.contiguous(), perm.contiguous(), bounds.contiguous(), dv_buf,
                                       n, dvn, n_blocks, *dout.stride(), *dv_buf.stride(),
                                       BLOCK_N=bn, BLOCK_T=bt, BLOCK_D=block_d, DOT_PRECISION=prec,
                                       num_warps=warps, num_stages=stages)
    return _finish(dq_buf, dq), _finish(dk_buf, dk), _finish(dv_buf, dv)


# ----------------------------------------------------------------------------------------------
# ahead-of-time compile configurations
# ----------------------------------------------------------------------------------------------
_DATA = {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV_out"}          # pointers of the data dtype
_OTHER = {"Idx": "i64", "Lse": "fp32", "Delta": "fp32", "SortedIdx": "i64", "Perm": "i64", "Bounds": "i64"}
_FNS = {"fwd": _top1_fwd_kernel, "bwd_preprocess": _top1_bwd_preprocess_kernel, "bwd_dq": _top1_bwd_dq_kernel,
        "bwd_dk": _top1_bwd_dk_kernel, "bwd_dv": _top1_bwd_dv_kernel}


def kernel_config(kernel: str, dtype: torch.dtype, block_d: int, gumbel: bool,
                  cfg: tuple[int, int, int, int], precision: str | None = None) -> dict:
    """One compile configuration (``_common.make_config``) of ``kernel`` with
    ``cfg = (BLOCK_M, BLOCK_N, num_warps, num_stages)`` as from ``launch_config`` and ``DOT_PRECISION``
    ``precision`` (default: ``dot_precision(dtype)`` now): pointers 16-byte aligned (``_prep`` and fresh
    allocations), ``seed`` int64, other integers i32, floats fp32."""
    bm, bn, warps, stages = cfg
    fn, ty = _FNS[kernel], TL_DTYPES[dtype]
    prec = dot_precision(dtype) if precision is None else precision
    tag = f"_{prec}" if dtype == torch.float32 else ""
    if kernel == "bwd_dv":
        consts = {"BLOCK_N": bn, "BLOCK_T": bm, "BLOCK_D": block_d, "DOT_PRECISION": prec}
        name = f"top1_{kernel}_{ty}_d{block_d}{tag}"
    else:
        consts = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": block_d, "GUMBEL": bool(gumbel), "DOT_PRECISION": prec}
        name = f"top1_{kernel}_{ty}_d{block_d}_{'g' if gumbel else 'n'}{tag}"
    args = set(fn.arg_names)
    pointers = {a: None for a in _DATA & args} | {a: t for a, t in _OTHER.items() if a in args}
    return make_config(name, fn, ty, consts, warps, stages, pointers=pointers,
                       fp32=tuple(a for a in ("scale2", "inv_t") if a in args), i64=("seed",) if "seed" in args else (),
                       aligned=tuple(pointers))


def compile_configs() -> list[dict]:
    """Exactly the (kernel, dtype, constexpr, num_warps, num_stages) configurations the launchers
    can launch: every kernel of ``KERNELS`` for every dtype, every BLOCK_D of ``feature_block``,
    both GUMBEL settings (bwd_dv has none) and, for float32, the ``DOT_PRECISION`` of each torch
    float32 matmul precision (``_common.dot_precisions``), each with its ``launch_config``."""
    configs = []
    for dtype, block_d, kernel in itertools.product(_DTYPES, _BLOCK_DS, KERNELS):
        if block_d > max_features(dtype):
            continue
        for gumbel, prec in itertools.product((False,) if kernel == "bwd_dv" else (False, True), dot_precisions(dtype)):
            cfg = launch_config(kernel, block_d, dtype, gumbel, prec)
            configs.append(kernel_config(kernel, dtype, block_d, gumbel, cfg, prec))
    return configs
