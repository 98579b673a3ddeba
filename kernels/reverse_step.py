"""Fused reverse-diffusion update: ``x_{t-1}`` from ``x_t`` and the predicted noise ``eps``.

One pass reads ``x_t`` and ``eps``, draws the Gaussian noise in the kernel and writes
``x_{t-1}`` (in place when ``out`` is ``x_t``). With per-step scalars ``a = sqrt(ab_t)``,
``b = sqrt(1 - ab_t)``, ``a_prev = sqrt(ab_prev)``, ``d`` (direction coefficient) and ``sigma``::

    x0 = (x - b * eps) / a;   if CLIP_X0: x0 = clamp(x0, -1, 1);  eps = (x - a * x0) / b
    y  = a_prev * x0 + d * eps + sigma * z

DDPM ancestral and DDIM(eta) differ only in the scalars. All math is float32; ``x``, ``eps``
and ``out`` share one dtype (float32, float16 or bfloat16).

Noise stream (Philox4x32-10, identical to the torch reference ``fastscore.ops.philox``):
element ``e = (sample_offset + i) * per_sample + j`` (global index in the whole sampling run)
belongs to group ``g = e // 4``; one Philox call (``_common.philox_group``) on the uint32 counter
``(lo32(g), hi32(g), step, STREAM_NOISE = 0)`` with key ``(lo32(seed), hi32(seed))`` gives the
four words of the group, and Box-Muller on word pairs (0, 1) and (2, 3) gives the four normals,
element ``e`` taking normal ``e % 4``. Counters are built as uint32 explicitly, so the stream
does not depend on how a Triton version's ``tl.randn`` treats 64-bit offsets.

Programs tile the *global group* axis, so every Philox call serves four elements even when
``sample_offset * per_sample`` is not a multiple of 4. Nothing here imports from ``fastscore``.
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl
from triton.language.random import uint_to_uniform_float

from ._common import MAXNREG, STREAM_NOISE, TL_DTYPES, make_config, philox_group

BLOCK = 1024        # elements per program (BLOCK // 4 Philox calls)
NUM_WARPS = 4
NUM_STAGES = 1
#: integer arguments, never specialised by value (``_common``: a 1 would arrive as a Python int, and
#: ``seed``, ``step``, ``sample_offset`` change at every call); annotated, so the JIT types them as the
#: compile configurations do (i64 / i32) whatever their magnitude
_INT_ARGS = ("seed", "sample_offset", "per_sample", "n_elements", "step")


def _maxnreg(has_noise: bool, aligned4: bool, even16: bool) -> int | None:
    """Register cap of a configuration (ptxas -v, benchmarks/compile_report.py): the noise path with
    aligned groups and a ragged element count sits at 32 registers on sm_80, where ptxas spills 4 bytes
    to keep full occupancy unless given a cap (``_common.MAXNREG``); with one it takes 32-40. Elsewhere
    no cap: ptxas's own choice has no spill, and a cap would raise the unaligned path from ~50 to 80."""
    return MAXNREG if has_noise and aligned4 and not even16 else None


@triton.jit
def _box_muller(u_r, u_th):
    """Two standard normals from two uniforms (Triton's ``pair_uniform_to_normal``)."""
    u_r = tl.maximum(1.0e-7, u_r)
    th = 6.283185307179586 * u_th
    r = tl.sqrt(-2.0 * tl.log(u_r))
    return r * tl.cos(th), r * tl.sin(th)


@triton.jit(do_not_specialize=_INT_ARGS)
def _reverse_step_kernel(
    x_ptr, eps_ptr, out_ptr,        # (n_elements,) contiguous, one dtype
    seed_ptr, offset_ptr,           # 1-element int64 tensors (SEED_FROM_PTR / OFFSET_FROM_PTR) or None
    seed: tl.int64, sample_offset: tl.int64,  # used when the matching *_FROM_PTR is False
    per_sample: tl.int64, n_elements: tl.int64,  # elements per sample, total elements
    step: tl.int32,                 # step index (< 2**31)
    coef_a, coef_b, coef_a_prev, coef_d, coef_sigma,  # fp32 step scalars (see module docstring)
    HAS_NOISE: tl.constexpr, CLIP_X0: tl.constexpr,
    SEED_FROM_PTR: tl.constexpr, OFFSET_FROM_PTR: tl.constexpr, ALIGNED4: tl.constexpr,
    EVEN16: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program writes ``BLOCK`` consecutive elements of ``out``.

    ``x_ptr``, ``eps_ptr``, ``out_ptr``: flat contiguous views of the (B, ...) batch; ``out_ptr``
    may equal ``x_ptr`` (each element is read before it is written by the same program).
    Without noise, program ``pid`` covers local elements ``[pid * BLOCK, (pid + 1) * BLOCK)``.
    With noise, it covers the ``BLOCK // 4`` Philox groups starting at global group
    ``base // 4 + pid * BLOCK // 4`` where ``base = sample_offset * per_sample``; local index
    ``k = e - base`` of global element ``e``, masked to ``0 <= k < n_elements``. ``ALIGNED4``
    (``base % 4 == 0``, e.g. ``per_sample % 4 == 0``) makes that ``[pid * BLOCK, (pid + 1) * BLOCK)``.
    ``EVEN16``: ``n_elements`` arrives in units of 16 elements, so the compiler knows the mask is
    constant over 16 elements and vectorises loads and stores (what the JIT's divisibility hint did
    before the integers were unspecialised; without it the noise path spilled 4 bytes on sm_80).
    """
    pid = tl.program_id(0).to(tl.int64)
    n_elements = n_elements.to(tl.int64)
    if EVEN16:
        n_elements = n_elements * 16
    if HAS_NOISE:
        if OFFSET_FROM_PTR:
            base = tl.load(offset_ptr).to(tl.int64) * per_sample.to(tl.int64)
        else:
            base = sample_offset.to(tl.int64) * per_sample.to(tl.int64)
        if SEED_FROM_PTR:
            key = tl.load(seed_ptr).to(tl.int64)
        else:
            key = seed.to(tl.int64)
        G: tl.constexpr = BLOCK // 4
        g = base // 4 + pid * G + tl.arange(0, G).to(tl.int64)        # global Philox groups
        w0, w1, w2, w3 = philox_group(key, g, step, STREAM_NOISE)
        n0, n1 = _box_muller(uint_to_uniform_float(w0), uint_to_uniform_float(w1))
        n2, n3 = _box_muller(uint_to_uniform_float(w2), uint_to_uniform_float(w3))
        # (G, 2, 2) -> (BLOCK,): element 4 * r + 2 * i + j takes normal 2 * i + j of group r
        z = tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), [BLOCK])
        if ALIGNED4:  # base % 4 == 0: the same elements as below, in a form the compiler can vectorise
            k = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
            mask = k < n_elements
        else:
            k = (base // 4 + pid * G) * 4 + tl.arange(0, BLOCK).to(tl.int64) - base
            mask = (k >= 0) & (k < n_elements)
    else:
        k = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = k < n_elements

    x = tl.load(x_ptr + k, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(eps_ptr + k, mask=mask, other=0.0).to(tl.float32)
    x0 = (x - coef_b * e) / coef_a
    if CLIP_X0:
        x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
        e = (x - coef_a * x0) / coef_b
    y = coef_a_prev * x0 + coef_d * e
    if HAS_NOISE:
        y = y + coef_sigma * z
    tl.store(out_ptr + k, y.to(out_ptr.dtype.element_ty), mask=mask)


def _scalar_or_ptr(v, name: str):
    """(scalar, pointer) kernel arguments for an int or a 1-element int64 tensor."""
    if isinstance(v, torch.Tensor):
        if v.dtype != torch.int64 or v.numel() != 1:
            raise ValueError(f"{name} given as a tensor must hold one int64, got {v.dtype} of {v.numel()} elements")
        return 0, v
    return int(v), None


def reverse_step(x_t: torch.Tensor, eps: torch.Tensor, coef, seed, step: int, sample_offset=0,
                 clip_x0: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the fused update; returns ``out`` (a new tensor when ``out`` is None).

    ``x_t``, ``eps``: (B, ...) tensors of one dtype (float32/float16/bfloat16) on one device.
    ``coef``: five floats ``(a, b, a_prev, d, sigma)`` (module docstring). ``seed`` and
    ``sample_offset``: python ints, or 1-element int64 tensors on the device (read by the kernel,
    so a captured CUDA graph can change them between replays). ``sigma == 0`` skips the noise.
    ``out`` may be ``x_t`` (in place). The caller validates ranges; this checks only layout.
    """
    if x_t.dtype not in TL_DTYPES or eps.dtype != x_t.dtype or eps.shape != x_t.shape:
        raise ValueError("x_t and eps must share shape and a float32/float16/bfloat16 dtype")
    a, b, a_prev, d, sigma = (float(c) for c in coef)
    n = x_t.numel()
    per = n // x_t.shape[0]
    xc = x_t.contiguous()
    ec = eps.contiguous()
    if out is None:
        dst = torch.empty_like(xc)
    elif out.is_contiguous():
        dst = out
    else:
        dst = torch.empty_like(xc)
    if n == 0:
        return out if out is not None else dst
    has_noise = sigma > 0.0
    seed_val, seed_ptr = _scalar_or_ptr(seed, "seed")
    off_val, off_ptr = _scalar_or_ptr(sample_offset, "sample_offset")
    if not has_noise:
        seed_ptr = off_ptr = None
    aligned4 = True
    if has_noise:
        aligned4 = per % 4 == 0 or (off_ptr is None and (off_val * per) % 4 == 0)
    # unaligned: the first group may start up to 3 elements before the batch
    grid = (triton.cdiv(n + (0 if aligned4 else 3), BLOCK),)
    _reverse_step_kernel[grid](
        xc, ec, dst, seed_ptr, off_ptr, seed_val, off_val, per, n // 16 if n % 16 == 0 else n, int(step),
        a, b, a_prev, d, sigma,
        HAS_NOISE=has_noise, CLIP_X0=bool(clip_x0),
        SEED_FROM_PTR=seed_ptr is not None, OFFSET_FROM_PTR=off_ptr is not None, ALIGNED4=aligned4,
        EVEN16=n % 16 == 0, BLOCK=BLOCK, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        maxnreg=_maxnreg(has_noise, aligned4, n % 16 == 0),
    )
    if out is not None and dst is not out:
        out.copy_(dst.view(out.shape))
        return out
    return dst


def compile_configs() -> list[dict]:
    """Every configuration ``reverse_step`` can launch (``_common.make_config`` form).

    The pointers carry the 16-byte divisibility that the JIT infers for fresh torch allocations
    (unaligned pointers compile an unvectorised variant); the integers are typed as their
    annotations say, as the JIT does (they are never specialised by value).
    """
    pointers = {"x_ptr": None, "eps_ptr": None, "out_ptr": None, "seed_ptr": "i64", "offset_ptr": "i64"}
    i64 = ("seed", "sample_offset", "per_sample", "n_elements")
    fp32 = ("coef_a", "coef_b", "coef_a_prev", "coef_d", "coef_sigma")
    configs = []
    for ty in TL_DTYPES.values():
        for has_noise in (False, True):
            for clip in (False, True):
                modes = [(s, o, al) for s in (False, True) for o in (False, True) for al in (True, False)] \
                    if has_noise else [(False, False, True)]
                for (seed_ptr, off_ptr, aligned4), even16 in itertools.product(modes, (True, False)):
                    constexprs = {"HAS_NOISE": has_noise, "CLIP_X0": clip, "SEED_FROM_PTR": seed_ptr,
                                  "OFFSET_FROM_PTR": off_ptr, "ALIGNED4": aligned4, "EVEN16": even16,
                                  "BLOCK": BLOCK}
                    if not seed_ptr:
                        constexprs["seed_ptr"] = None
                    if not off_ptr:
                        constexprs["offset_ptr"] = None
                    name = (f"reverse_step_{ty}" + ("_noise" if has_noise else "") + ("_clip" if clip else "")
                            + ("_seedptr" if seed_ptr else "") + ("_offptr" if off_ptr else "")
                            + ("" if aligned4 else "_unaligned") + ("" if even16 else "_ragged"))
                    configs.append(make_config(
                        name, _reverse_step_kernel, ty, constexprs, NUM_WARPS, NUM_STAGES,
                        pointers={k: v for k, v in pointers.items() if k not in constexprs}, fp32=fp32, i64=i64,
                        aligned=tuple(k for k in pointers if k not in constexprs),
                        maxnreg=_maxnreg(has_noise, aligned4, even16)))
    return configs
