"""What the three kernel modules share: constants, the Philox counters, the JIT specialisation rule,
the fp32 dot policy, the feature block and the ahead-of-time configuration builder.

**The fp32 policy** (every kernel): a ``tl.dot`` of float32 operands uses the precision torch would
use for a float32 matmul, ``torch.get_float32_matmul_precision()``, read by the launcher (host side)
at each launch and passed as the constexpr ``DOT_PRECISION`` (``dot_precision``): ``"highest"``
(torch's default) -> IEEE products, ``"high"`` and ``"medium"`` -> TF32 (what cuBLAS does for torch's
``"high"``; Triton has no bf16 mode for float32 operands, so ``"medium"`` gets TF32 too). 3xTF32
(``"tf32x3"``) is not used: its attention variants spilled registers on sm_80/sm_90a. 16-bit operands always run on tensor cores with float32 accumulation, so they
get one fixed value and no extra compiled variant. Scores, softmax statistics and accumulators are
float32 throughout; a saved log-sum-exp is in natural log (``torch.logsumexp``'s), kernels that work
in the exp2 domain scale it by ``LOG2E`` when they load it.

**The JIT specialisation rule.** On a GPU, Triton's JIT specialises integer arguments by value: an
argument equal to 1 becomes a constexpr *Python int* (so ``n.to(tl.int64)`` raises
``AttributeError: 'int' object has no attribute 'to'`` at compile time), and one divisible by 16 gets a
divisibility hint (a different compiled variant). The interpreter never specialises, so CPU runs do
not see either. Every kernel here therefore lists its integer arguments in ``do_not_specialize``
(they always arrive as i32 / i64 tensors, whatever their value, and the set of compiled variants
does not depend on the data), and the shared helpers below also accept plain ints, so a helper
called with a constexpr stays correct. tests/test_gpu_compile_guard.py compiles every launcher with
the JIT's own specialisation for sm_80 / sm_90 on a machine without a GPU to check this.

Nothing here imports from ``fastscore``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634   # log2(e): exp(x) = exp2(x * LOG2E)
LN2 = 0.6931471805599453     # ln(2):   log(x) = log2(x) * LN2
#: elements: the attention kernels take batch / sequence strides and feature sizes in these units
ALIGN = 8
# the same values for kernel bodies, which may only read globals that are constexprs
TL_LOG2E = tl.constexpr(LOG2E)
TL_LN2 = tl.constexpr(LN2)
TL_ALIGN = tl.constexpr(ALIGN)
#: smallest feature block (a ``tl.dot`` operand needs K >= 16)
MIN_BLOCK_D = 16

#: Philox counter word c3: which random stream (``fastscore.ops.philox`` uses the same values);
#: constexprs, because kernels may only read globals that are
STREAM_NOISE = tl.constexpr(0)    # reverse-diffusion noise, c2 = step index
STREAM_GUMBEL = tl.constexpr(1)   # top-1 Gumbel noise, c2 = 0

#: ``.maxnreg`` for the attention kernels. Without it ptxas trades a few bytes of spill
#: (4-64 B) for one more resident program per SM whenever a kernel sits just above an occupancy step
#: (80, 96, 128, 168 registers); with an explicit cap of 255 it allocates what the kernel needs.
MAXNREG = 255

#: dtypes the kernels take, with their Triton signature names
TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

#: ahead-of-time compile targets (no GPU needed): capability -> ptxas architecture name
TARGETS = {80: "sm_80", 90: "sm_90a"}


#: torch.get_float32_matmul_precision() -> ``input_precision`` of a float32 ``tl.dot``
FP32_DOT_PRECISION = {"highest": "ieee", "high": "tf32", "medium": "tf32"}
#: ``input_precision`` passed for 16-bit operands (tensor cores whatever it says: one compiled variant)
HALF_DOT_PRECISION = "ieee"


def dot_precision(dtype: torch.dtype) -> str:
    """``DOT_PRECISION`` for a launch whose dot operands have ``dtype``, by the fp32 policy (module
    docstring): for float32, torch's float32 matmul precision now."""
    if dtype == torch.float32:
        return FP32_DOT_PRECISION[torch.get_float32_matmul_precision()]
    return HALF_DOT_PRECISION


def dot_precisions(dtype: torch.dtype) -> tuple[str, ...]:
    """Every ``DOT_PRECISION`` a launch with operands of ``dtype`` can pass (for ``compile_configs``)."""
    return tuple(dict.fromkeys(FP32_DOT_PRECISION.values())) if dtype == torch.float32 else (HALF_DOT_PRECISION,)


def feature_block(d: int) -> int:
    """BLOCK_D for a feature size ``d``: ``max(next_pow2(d), MIN_BLOCK_D)``."""
    return max(triton.next_power_of_2(int(d)), MIN_BLOCK_D)


# ----------------------------------------------------------------------------------------------
# Philox4x32-10 counters (bit-exact with fastscore.ops.philox)
# ----------------------------------------------------------------------------------------------
@triton.jit
def philox_words(key, c0, c1, c2, c3):
    """The four uint32 words of ``Philox4x32-10`` with key ``(lo32(key), hi32(key))`` at counters
    ``(c0, c1, c2, c3)``. ``c0``, ``c1``: uint32 tensors of one shape; ``c2``, ``c3``: scalars,
    plain ints (a constexpr from the JIT's specialisation) or integer tensors, broadcast to that
    shape; ``key``: an int or an integer scalar tensor (``tl.philox`` widens it to 64 bits)."""
    zero = tl.zeros(c0.shape, tl.uint32)
    # ``zero + c`` works for an int and for a tensor alike (``c.to(...)`` would not for an int)
    return tl.philox(key, c0, c1, (zero + c2).to(tl.uint32), (zero + c3).to(tl.uint32))


@triton.jit
def philox_group(key, g, c2, c3):
    """``philox_words`` for the int64 group indices ``g`` (a tensor): ``c0 = lo32(g)``, ``c1 = hi32(g)``.
    Element ``e`` of a stream belongs to group ``e // 4`` and takes word ``e % 4``."""
    c0 = (g & 0xFFFFFFFF).to(tl.uint32)
    c1 = (g >> 32).to(tl.uint32)
    return philox_words(key, c0, c1, c2, c3)


# ----------------------------------------------------------------------------------------------
# ahead-of-time compile configurations
# ----------------------------------------------------------------------------------------------
def make_config(name: str, fn, dtype: str, constexprs: dict, num_warps: int, num_stages: int, *,
                pointers: dict[str, str | None], fp32: tuple[str, ...] = (), i64: tuple[str, ...] = (),
                aligned: tuple[str, ...] = (), maxnreg: int | None = None) -> dict:
    """One configuration of the ``@triton.jit`` kernel ``fn`` in ``triton.compiler.ASTSource`` form
    (``signature``: argument -> type; ``constexprs``: argument -> value; ``attrs``: 16-byte
    divisibility of the arguments in ``aligned``, as the JIT infers for aligned pointers).

    ``pointers`` maps each pointer argument to its element type, ``None`` meaning ``dtype`` (the data
    dtype: "fp32", "fp16" or "bf16"); arguments in ``fp32`` are floats, in ``i64`` 64-bit integers,
    any other non-constexpr argument is an i32 (integers are never specialised by value, see the
    module docstring). Returns ``{"name", "fn", "dtype", "signature", "constexprs", "attrs",
    "num_warps", "num_stages", "maxnreg"}`` (``maxnreg``, like ``num_warps``, is a compile option).
    """
    sig, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            sig[arg] = "constexpr"
        elif arg in pointers:
            sig[arg] = "*" + (pointers[arg] or dtype)
        elif arg in fp32:
            sig[arg] = "fp32"
        else:
            sig[arg] = "i64" if arg in i64 else "i32"
        if arg in aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    unknown = (set(constexprs) | set(pointers) | set(fp32) | set(i64) | set(aligned)) - set(fn.arg_names)
    if unknown:
        raise ValueError(f"{name}: {sorted(unknown)} are not arguments of {fn.__name__}")
    return {"name": name, "fn": fn, "dtype": dtype, "signature": sig, "constexprs": dict(constexprs),
            "attrs": attrs, "num_warps": num_warps, "num_stages": num_stages, "maxnreg": maxnreg}


def config_key(cfg: dict) -> tuple:
    """Hashable identity of a configuration: kernel function, data dtype, constexprs, warps, stages,
    register cap (what a launch of the same variant would also have)."""
    return (cfg["fn"].__name__, cfg["dtype"], tuple(sorted(cfg["constexprs"].items())), cfg["num_warps"],
            cfg["num_stages"], cfg.get("maxnreg"))
