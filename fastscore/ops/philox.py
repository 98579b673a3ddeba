"""Philox4x32-10 in torch integer arithmetic, bit-exact with Triton's ``tl.philox``.

Stream layout (shared by the Triton kernels and this reference):

- key: ``(seed & 0xffffffff, seed >> 32)``, ``seed`` in ``[0, 2**63)``;
- counter: ``(g & 0xffffffff, g >> 32, c2, c3)`` where ``g = e // 4`` is the *group* of the
  element with global index ``e``; one Philox call yields four uint32 words for four
  consecutive elements, element ``e`` takes word ``e % 4``;
- ``c3`` tags the purpose: ``STREAM_NOISE = 0`` (reverse-diffusion noise, ``c2`` = step index),
  ``STREAM_GUMBEL = 1`` (top-1 Gumbel noise, ``c2 = 0``);
- uniforms: Triton's ``uint_to_uniform_float`` (int32 bitcast, fold negatives, times
  ``4.6566127342e-10``), in ``[0, 1)``;
- normals: Box-Muller on word pairs, ``(n0, n1) = BM(u0, u1)``, ``(n2, n3) = BM(u2, u3)`` with
  ``BM(a, b) = sqrt(-2 log max(a, 1e-7)) * (cos 2πb, sin 2πb)`` in float32.

All words are held in int64 tensors with values in ``[0, 2**32)``; works on any device.
"""
from __future__ import annotations

import numpy as np
import torch

MASK32 = 0xFFFFFFFF
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57
STREAM_NOISE, STREAM_GUMBEL = 0, 1
_SCALE = 4.6566127342e-10


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of ``a * b`` for a 32-bit constant ``a`` and 32-bit words ``b``."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p_hi = b * a_hi  # < 2**48
    p_lo = b * a_lo  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & MASK32
    return hi, lo


def _philox_numpy(seed: int, c0, c1, c2, c3, n_rounds: int):
    """The same rounds in numpy uint64 (one exact 64-bit product per multiply); CPU fast path."""
    u = np.uint64
    m = u(MASK32)
    k0, k1 = u(seed & MASK32), u((seed >> 32) & MASK32)
    a, b, s32 = u(ROUND_A), u(ROUND_B), u(32)
    with np.errstate(over="ignore"):
        for _ in range(n_rounds):
            pb, pa = b * c2, a * c0
            c0, c1, c2, c3 = (pb >> s32) ^ c1 ^ k0, pb & m, (pa >> s32) ^ c3 ^ k1, pa & m
            k0, k1 = (k0 + u(KEY_A)) & m, (k1 + u(KEY_B)) & m
    return c0, c1, c2, c3


def philox4x32(seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor | int,
               c3: torch.Tensor | int, n_rounds: int = 10) -> tuple[torch.Tensor, ...]:
    """Philox4x32 with key ``seed`` on counters ``(c0, c1, c2, c3)`` (int64 words in [0, 2**32))."""
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    if c0.device.type == "cpu":  # torch's int64 multiply is slow on CPU; numpy's uint64 is exact and fast
        w0, w1, w2, w3 = (np.broadcast_to(torch.as_tensor(c, dtype=torch.int64).numpy(), c0.shape).astype(np.uint64)
                          for c in (c0, c1, c2, c3))
        return tuple(torch.from_numpy(w.astype(np.int64)) for w in _philox_numpy(seed, w0, w1, w2, w3, n_rounds))
    c0 = c0.to(torch.int64)
    c1 = torch.as_tensor(c1, dtype=torch.int64, device=c0.device).expand_as(c0)
    c2 = torch.as_tensor(c2, dtype=torch.int64, device=c0.device).expand_as(c0)
    c3 = torch.as_tensor(c3, dtype=torch.int64, device=c0.device).expand_as(c0)
    for _ in range(n_rounds):
        hi_b, lo_b = _mulhilo(ROUND_B, c2)
        hi_a, lo_a = _mulhilo(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & MASK32, (k1 + KEY_B) & MASK32
    return c0, c1, c2, c3


def uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` for uint32 words held in int64: float32 in [0, 1)."""
    x = torch.where(x >= 2**31, x - 2**32, x)
    x = torch.where(x < 0, -x - 1, x)
    # a Python scale is rounded to float32 by the multiply (bit-identical to a float32 tensor
    # constant) and, unlike ``torch.tensor(_SCALE, device=...)``, costs no host-to-device copy,
    # which synchronises the host with a CUDA stream
    return x.to(torch.float32) * _SCALE


def _group_words(seed: int, index: torch.Tensor, c2: int, c3: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(words (G, 4), pos)``: the uint32 words of the groups that ``index`` touches, one Philox call
    per group, and each element's position in ``words.flatten()``."""
    flat = index.reshape(-1).to(torch.int64)
    if flat.numel() == 0:
        return torch.zeros((0, 4), dtype=torch.int64, device=index.device), flat
    g0 = int(flat.min()) >> 2
    g1 = int(flat.max()) >> 2
    if g1 - g0 + 1 <= 2 * flat.numel():  # dense indices (the usual case): every group in range
        g = torch.arange(g0, g1 + 1, dtype=torch.int64, device=index.device)
        pos = flat - 4 * g0
    else:
        g = flat >> 2
        pos = torch.arange(flat.numel(), device=flat.device) * 4 + (flat & 3)
    return torch.stack(philox4x32(seed, g & MASK32, g >> 32, c2, c3), dim=-1), pos


def uniform(seed: int, index: torch.Tensor, *, c2: int = 0, c3: int = STREAM_GUMBEL) -> torch.Tensor:
    """Uniform float32 in [0, 1) for global element indices ``index`` (int64, any shape)."""
    words, pos = _group_words(seed, index, c2, c3)
    return uint32_to_uniform(words).flatten()[pos].view(index.shape)


def uniform_range(seed: int, start: int, count: int, *, c2: int = 0, c3: int = STREAM_GUMBEL,
                  device: str | torch.device = "cpu") -> torch.Tensor:
    """``uniform(seed, arange(start, start + count))`` (count,) float32, bit-identical; on a CPU the
    words and their conversion stay in numpy (top-1's Gumbel noise: ~2x faster than the indexed path)."""
    if count == 0:
        return torch.zeros(0, dtype=torch.float32, device=device)
    g0, g1 = start >> 2, (start + count - 1) >> 2
    lo = start - 4 * g0
    if torch.device(device).type == "cpu":
        gn = np.arange(g0, g1 + 1, dtype=np.uint64)
        m = np.uint64(MASK32)
        wn = np.stack(_philox_numpy(seed, gn & m, gn >> np.uint64(32), np.uint64(c2), np.uint64(c3), 10), axis=-1)
        xn = wn.astype(np.uint32).view(np.int32).reshape(-1)[lo:lo + count]
        xn = xn ^ (xn >> 31)  # uint_to_uniform_float's fold: -x - 1 == ~x for negative int32
        return torch.from_numpy(xn.astype(np.float32)) * _SCALE
    g = torch.arange(g0, g1 + 1, dtype=torch.int64, device=device)
    words = torch.stack(philox4x32(seed, g & MASK32, g >> 32, c2, c3), dim=-1)
    return uint32_to_uniform(words).flatten()[lo:lo + count]


def _box_muller(words: torch.Tensor) -> torch.Tensor:
    """(G, 4) standard normals float32 from (G, 4) uint32 words: pairs (0, 1) and (2, 3)."""
    u = uint32_to_uniform(words)
    u0 = torch.clamp(u[:, 0::2], min=1.0e-7)  # words 0 and 2
    th = 6.283185307179586 * u[:, 1::2]       # words 1 and 3
    r = torch.sqrt(-2.0 * torch.log(u0))
    return torch.stack([r[:, 0] * torch.cos(th[:, 0]), r[:, 0] * torch.sin(th[:, 0]),
                        r[:, 1] * torch.cos(th[:, 1]), r[:, 1] * torch.sin(th[:, 1])], dim=-1)


def normal(seed: int, index: torch.Tensor, *, c2: int = 0, c3: int = STREAM_NOISE) -> torch.Tensor:
    """Standard normal float32 for global element indices ``index`` (int64, any shape)."""
    words, pos = _group_words(seed, index, c2, c3)
    return _box_muller(words).flatten()[pos].view(index.shape)


def normal_range(seed: int, start: int, count: int, *, c2: int = 0, c3: int = STREAM_NOISE,
                 device: str | torch.device = "cpu") -> torch.Tensor:
    """``normal(seed, arange(start, start + count))`` (count,) float32, bit-identical, without
    reading indices back from the device (no host sync: the sampler's loop calls it per batch)."""
    if count == 0:
        return torch.zeros(0, dtype=torch.float32, device=device)
    g0, g1 = start >> 2, (start + count - 1) >> 2
    g = torch.arange(g0, g1 + 1, dtype=torch.int64, device=device)
    words = torch.stack(philox4x32(seed, g & MASK32, g >> 32, c2, c3), dim=-1)
    lo = start - 4 * g0
    return _box_muller(words).flatten()[lo:lo + count]
