"""GPU-compile guard: every launcher compiles with the JIT's own specialisation for sm_80 and sm_90,
on a machine without a GPU.

The interpreter (how CPU CI runs the kernels) never specialises arguments, so failures that only the
JIT's specialisation produces are invisible to the other tests: on a GPU an integer argument equal to
1 arrives as a constexpr Python int (``seed.to(tl.int64)`` raised ``AttributeError: 'int' object has
no attribute 'to'`` in the reverse-step kernel at 19d5887, FINDINGS.md), and one divisible by 16 gets a
divisibility hint. Here, in a subprocess without ``TRITON_INTERPRET``:

* a stand-in active driver reports a CUDA target (``GPUTarget("cuda", arch, 32)``, device, stream);
* ``JITFunction.run`` compiles in warm-up mode instead of launching;
* the library's real launchers (``fastscore.kernels.*``) and the Philox test kernel are called with
  CPU tensors, driving every integer through the values that specialise (0, 1, 16, 17, ragged sizes,
  values past 2**31, seeds and offsets as ints and as 1-element tensors), so each kernel is compiled
  exactly as a GPU would compile it: frontend (where the AttributeError arises), TTIR, TTGIR (which
  differs between sm_80 and sm_90), LLIR and PTX. The compile stops before ``ptxas`` (the PTX -> cubin
  step): the failures guarded against happen earlier, ptxas's own checks (registers, spills) are the
  compile report's job (tests/test_compile_report.py), and it keeps the guard independent of which
  ``ptxas`` a triton wheel bundles;
* every compiled variant is checked against the kernels' rule (``kernels/_common.py``): no integer
  argument is specialised (no constexpr int, no divisibility hint), so the variants do not depend
  on the data;
* a canary kernel with the 19d5887 bug must fail to compile, or the guard has lost its power.

Everything runs in a child process, which restores the driver, ``JITFunction.run`` and the hooks when
done anyway, so this process (interpreter on, or a real GPU) is untouched. Compiled kernels are cached
under pytest's cache directory (a cache of its own: kernels compiled without a cubin must never meet a
real launch), so a second run takes a few seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton
import triton.language as tl

from fastscore.kernels._common import TARGETS

# cpu_only: a stand-in driver compiles for a GPU on a machine without one; with a GPU the kernels
# themselves are compiled and run by the rest of the suite
pytestmark = pytest.mark.cpu_only
ROOT = Path(__file__).resolve().parents[1]
LAST_STAGE = "ptx"   # the last compile stage run: everything before ptxas


@triton.jit
def _canary_kernel(out_ptr, n):
    """19d5887's bug in small: ``n.to`` fails when the JIT turns ``n == 1`` into a Python int."""
    tl.store(out_ptr, n.to(tl.int64))


# ----------------------------------------------------------------------------------------------
# the child process
# ----------------------------------------------------------------------------------------------
class _StandInDriver:
    """The part of an active Triton driver that ``JITFunction.run`` asks for before a launch. The device
    index is the capability, so each target gets its own binder and kernel cache in the JIT."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return self.arch

    def get_current_stream(self, device=None) -> int:
        return 0

    def is_active(self) -> bool:
        return True


class _StopAfter:
    """``knobs.runtime.add_stages_inspection_hook``: the stages after ``last`` return empty modules.
    triton >= 3.7 also calls it without arguments for a cache key of the modified pipeline."""

    def __init__(self, last: str):
        self.last = last

    def __call__(self, *args):
        if not args:
            return f"fastscore-stop-after-{self.last}", f"stop{self.last}"
        stages = args[1]
        names = list(stages)
        for name in names[names.index(self.last) + 1:]:
            stages[name] = lambda src, metadata, name=name: b"" if name in ("cubin", "hsaco") else ""


class compile_only:
    """Context manager: while active, a launch ``kernel[grid](...)`` compiles ``kernel`` for ``arch``
    (up to stage ``last``) and records it, instead of launching. Restores everything on exit."""

    def __init__(self, arch: int, last: str = LAST_STAGE):
        self.arch, self.last = arch, last
        self.compiled: list[dict] = []

    def _record(self, *, key, repr, fn, compile, is_manual_warmup, already_compiled):
        self.compiled.append({"fn": fn.jit_function, "signature": dict(compile["signature"]),
                              "constants": dict(compile["constants"]), "attrs": dict(compile["configs"][0]),
                              "num_warps": compile["num_warps"], "num_stages": compile["num_stages"]})
        return False  # go on compiling

    def __enter__(self):
        from triton import knobs
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction
        self._saved = (getattr(driver, "_active", None), JITFunction.run, knobs.runtime.add_stages_inspection_hook,
                       knobs.runtime.jit_cache_hook)
        real_run = JITFunction.run

        def run(fn, *args, grid, warmup, **kwargs):
            return real_run(fn, *args, grid=grid, warmup=True, **kwargs)

        driver.set_active(_StandInDriver(self.arch))
        JITFunction.run = run
        knobs.runtime.add_stages_inspection_hook = _StopAfter(self.last)
        knobs.runtime.jit_cache_hook = self._record
        return self

    def __exit__(self, *exc):
        from triton import knobs
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction
        active, JITFunction.run, knobs.runtime.add_stages_inspection_hook, knobs.runtime.jit_cache_hook = self._saved
        driver.set_active(active)
        return False


def _specialised_ints(rec: dict) -> list[str]:
    """Integer arguments the JIT specialised in one compiled variant: turned into a constant (an int,
    not a None pointer or a bool flag) or given a divisibility hint although not a pointer."""
    fn = rec["fn"]
    names = fn.arg_names
    constexpr_params = {p.name for p in fn.params if p.is_constexpr}
    bad = []
    for path, value in rec["constants"].items():
        name = names[path[0]] if isinstance(path, tuple) and path[0] < len(names) else path
        if name not in constexpr_params and isinstance(value, int) and not isinstance(value, bool):
            bad.append(f"{name}={value} (constexpr)")
    for path, attrs in rec["attrs"].items():
        if path[0] >= len(names):  # not an argument (triton >= 3.7 adds the custom pipeline's key)
            continue
        name = names[path[0]]
        if not str(rec["signature"].get(name, "")).startswith("*") and attrs:
            bad.append(f"{name} ({attrs})")
    return bad


def _by_name(fn, d: dict) -> dict:
    """{argument name: value} from a JIT / ``ASTSource`` dict keyed by argument paths or names."""
    out = {}
    for key, value in d.items():
        if isinstance(key, tuple):
            if key[0] >= len(fn.arg_names):  # not an argument (triton >= 3.7 adds the custom pipeline's key)
                continue
            key = fn.arg_names[key[0]]
        out[key] = value
    return out


def _variant(fn, signature: dict, constants: dict, attrs: dict, num_warps: int, num_stages: int) -> str:
    """A canonical string of one compiled variant: what the JIT compiled, or a ``compile_configs()`` entry."""
    attrs = {k: sorted(map(tuple, v)) for k, v in _by_name(fn, attrs).items() if v}
    return repr((fn.__name__, sorted(signature.items()), sorted(_by_name(fn, constants).items(), key=str),
                 sorted(attrs.items()), num_warps, num_stages))


def _listed_variants() -> set[str]:
    """Every configuration the kernel modules list for the ahead-of-time compile report."""
    from fastscore.kernels import attention, attention_block, reverse_step, top1
    return {_variant(c["fn"], c["signature"], c["constexprs"], c["attrs"], c["num_warps"], c["num_stages"])
            for mod in (attention, attention_block, reverse_step, top1) for c in mod.compile_configs()}


def _cases():
    """(launcher, case, thunk) for every launcher and the values that specialise."""
    import torch

    from fastscore.kernels import attention as A
    from fastscore.kernels import reverse_step as R
    from fastscore.kernels import top1 as T
    sys.path.insert(0, str(ROOT / "tests"))
    from test_philox import triton_words

    big = 2**31 + 5
    coef, still = (0.9, 0.4, 0.95, 0.3, 0.2), (0.9, 0.4, 0.95, 0.3, 0.0)
    one = lambda v: torch.tensor([v], dtype=torch.int64)  # noqa: E731
    for shape in ((1, 1), (1, 16), (16, 1), (2, 3, 5, 5), (3, 7)):
        x = torch.zeros(shape)
        yield "reverse_step", f"{shape} ones", lambda x=x: R.reverse_step(x, x, coef, 1, 1, 1, clip_x0=True)
        yield "reverse_step", f"{shape} zeros", lambda x=x: R.reverse_step(x, x, coef, 0, 0, 0, out=x)
        yield "reverse_step", f"{shape} no noise", lambda x=x: R.reverse_step(x, x, still, 1, 1, 1)
        for v in (16, 17, big):
            yield "reverse_step", f"{shape} seed={v}", lambda x=x, v=v: R.reverse_step(x, x, coef, v, 3, 2)
            yield "reverse_step", f"{shape} offset={v}", lambda x=x, v=v: R.reverse_step(x, x, coef, 5, 3, v)
        for v in (16, 17, 2**31 - 1):
            yield "reverse_step", f"{shape} step={v}", lambda x=x, v=v: R.reverse_step(x, x, coef, 5, v, 2)
        for s, o in ((one(1), 1), (1, one(1)), (one(big), one(16))):
            yield "reverse_step", f"{shape} tensor seed/offset", lambda x=x, s=s, o=o: R.reverse_step(x, x, coef, s, 1, o)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.zeros(2, 3, 5, 5, dtype=dtype)
        yield "reverse_step", f"{dtype}", lambda x=x: R.reverse_step(x, x, coef, 1, 1, 1, clip_x0=True)

    def attention(b, nq, nk, d, dv, dtype=torch.float32, strided=False):
        q, k = torch.zeros(b, nq, d, dtype=dtype), torch.zeros(b, nk, d, dtype=dtype)
        v, do = torch.zeros(b, nk, dv, dtype=dtype), torch.zeros(b, nq, dv, dtype=dtype)
        if strided:
            q = torch.zeros(b, nq, d + 3, dtype=dtype)[..., 1:]
        out, lse = A.attention_forward(q, k, v, 0.5)
        A.attention_backward(q, k, v, out, lse, do, 0.5)
        if nq == nk and d == dv:
            out, lse = A.identity_forward(q, 1.0)
            A.identity_backward(q, out, lse, do, 1.0)

    # every integer at 1, at 16, and ragged (feature blocks and the EVEN_* flags are the compile report's)
    for shape in ((1, 1, 1, 1, 1), (16, 16, 16, 16, 16), (2, 17, 5, 24, 8)):
        yield "attention", f"{shape}", lambda s=shape: attention(*s)
    yield "attention", "strided (2, 9, 9, 13, 12)", lambda: attention(2, 9, 9, 13, 12, strided=True)
    yield "attention", "bf16 (2, 17, 17, 16, 16)", lambda: attention(2, 17, 17, 16, 16, torch.bfloat16)

    def top1(b, n, d, dv, seed, gumbel, dtype=torch.float32, strided=False):
        q, k = torch.zeros(b, n, d, dtype=dtype), torch.zeros(b, n, d, dtype=dtype)
        v, do = torch.zeros(b, n, dv, dtype=dtype), torch.zeros(b, n, dv, dtype=dtype)
        if strided:
            q = torch.zeros(n, b, d, dtype=dtype).transpose(0, 1)
        out, idx = T.top1_forward(q, k, v, gumbel, seed)
        T.top1_backward(do, q, k, v, idx.zero_(), 0.7, gumbel, seed)

    for shape in ((1, 1, 1, 1), (2, 16, 16, 16), (2, 17, 5, 3)):
        for seed in (0, 1, 16, big):
            yield "top1", f"{shape} seed={seed}", lambda s=shape, seed=seed: top1(*s, seed, True)
        yield "top1", f"{shape} no gumbel", lambda s=shape: top1(*s, 1, False)
    yield "top1", "strided (2, 16, 16, 16)", lambda: top1(2, 16, 16, 16, 1, True, strided=True)
    yield "top1", "bf16 (2, 17, 100, 64)", lambda: top1(2, 17, 100, 64, 1, True, torch.bfloat16)

    def at_precision(precision, launch):   # the fp32 policy: each torch float32 matmul precision a variant
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(precision)
        try:
            launch()
        finally:
            torch.set_float32_matmul_precision(before)

    for p in ("high", "medium"):
        yield "attention", f"fp32 precision {p}", lambda p=p: at_precision(p, lambda: attention(2, 17, 17, 16, 16))
        yield "top1", f"fp32 precision {p}", lambda p=p: at_precision(p, lambda: top1(2, 17, 5, 3, 1, True))

    # ---- the fused attention block (kernels/attention_block.py): forward and backward of every kind,
    # with and without patch features and dx, one member and two, every integer at 1, 16 and ragged
    # (all at the smallest blocks, which compile_configs() lists); seeds as for top-1
    from fastscore.kernels import attention_block as AB

    def block(kind, nb, c, h, w, cx, d, members=1, seed=1, dtype=torch.float32, dx=False):
        z = torch.zeros(nb, c, h, w, dtype=dtype)
        x = torch.zeros(nb, cx, h, w, dtype=dtype) if cx else None
        ws = (None,) * 4 if kind == "identity" else tuple(torch.zeros(members, *s, dtype=dtype) for s in (
            (3 * d, c + 9 * cx), (3 * d,), (c, d), (c,)))
        out, lse, idx = AB.block_forward(z, x, *ws, kind=kind, members=members, qk_scale=0.5, gumbel=True, seed=seed)
        AB.block_backward(out, z, x, *ws, lse, idx, kind=kind, members=members, sm_scale=0.5, gumbel=True,
                          seed=seed, need_dpatch=dx)

    for kind in ("softmax", "top1", "identity"):
        for shape in ((1, 1, 1, 1, 1, 1), (16, 16, 4, 4, 1, 16), (3, 7, 5, 3, 1, 5)):
            shp = shape[:4] + ((0,) if kind == "identity" else shape[4:5]) + shape[5:]
            yield "attention_block", f"{kind} {shp}", lambda k=kind, s=shp: block(k, *s)
        yield "attention_block", f"{kind} members=2", lambda k=kind: block(k, 4, 16, 4, 4, 0, 16, members=2)
        yield "attention_block", f"{kind} bf16", lambda k=kind: block(k, 2, 16, 4, 4, 0, 16, dtype=torch.bfloat16)
    for seed in (0, 16, big):
        yield "attention_block", f"top1 seed={seed}", lambda seed=seed: block("top1", 2, 16, 4, 4, 1, 16, seed=seed)
    yield "attention_block", "softmax dx", lambda: block("softmax", 2, 16, 4, 4, 1, 16, dx=True)
    yield "attention_block", "top1 dx bf16", lambda: block("top1", 2, 16, 4, 4, 1, 16, dtype=torch.bfloat16, dx=True)

    for n in (1, 16, 17):
        c = torch.zeros(n, dtype=torch.int64)
        for seed, c2, c3 in ((0, 0, 0), (1, 1, 1), (16, 16, 0), (big, 17, 1)):
            yield "philox test kernel", f"n={n} seed={seed} c2={c2} c3={c3}", \
                lambda c=c, seed=seed, c2=c2, c3=c3: triton_words(seed, c, c, c2, c3)


def main(arch: int, last: str = LAST_STAGE) -> int:
    """Compile every case for ``arch``; one JSON line per case, then a summary line; exit code 0."""
    from collections import Counter

    import torch

    torch.set_num_threads(1)
    with compile_only(arch, last) as guard:
        try:
            _canary_kernel[(1,)](torch.zeros(1, dtype=torch.int64), 1)
            canary = "compiled"
        except Exception as e:  # noqa: BLE001
            canary = f"{type(e).__name__}: {str(e)[-300:]}"
        n_canary = len(guard.compiled)
        for launcher, case, thunk in _cases():
            try:
                thunk()
                row = {"launcher": launcher, "case": case, "error": None}
            except Exception as e:  # noqa: BLE001  (a compile failure is the finding)
                row = {"launcher": launcher, "case": case, "error": f"{type(e).__name__}: {str(e)[-400:]}"}
            print(json.dumps(row), flush=True)
        library = [rec for rec in guard.compiled[n_canary:] if rec["fn"].__name__ != "_philox_words_kernel"]
        violations = sorted({f"{rec['fn'].__name__}: {', '.join(bad)}" for rec in library
                             if (bad := _specialised_ints(rec))})
        listed = _listed_variants()
        unlisted = sorted({v for rec in library if (v := _variant(rec["fn"], rec["signature"], rec["constants"],
                                                                   rec["attrs"], rec["num_warps"], rec["num_stages"]))
                           not in listed})
    print(json.dumps({"summary": True, "arch": arch, "last_stage": last, "triton": triton.__version__,
                      "variants": len(guard.compiled) - n_canary, "canary": canary, "unlisted": unlisted,
                      "per_kernel": dict(Counter(rec["fn"].__name__ for rec in guard.compiled[n_canary:])), "violations": violations}))
    return 0


# ----------------------------------------------------------------------------------------------
# the tests
# ----------------------------------------------------------------------------------------------
def _start_guard(arch: int, cache_dir: Path) -> subprocess.Popen:
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(cache_dir), CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, __file__, str(arch)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def guard_runs(request, tmp_path_factory):
    """Both targets' guard processes, started together (two cores: half the wall time). Their Triton
    cache is their own, per triton version and last stage (triton 3.6 does not key its cache by the
    stages run), kept in pytest's cache directory when there is one."""
    name = f"fastscore-triton-guard-{triton.__version__}-{LAST_STAGE}"
    cache_provider = getattr(request.config, "cache", None)
    cache = Path(cache_provider.mkdir(name) if cache_provider else tmp_path_factory.mktemp(name))
    procs = {arch: _start_guard(arch, cache / str(arch)) for arch in TARGETS}
    yield procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()


def _result(proc: subprocess.Popen) -> tuple[list[dict], dict]:
    out, err = proc.communicate(timeout=900)
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    summary = next((r for r in lines if r.get("summary")), None)
    assert proc.returncode == 0 and summary is not None, f"guard process failed:\n{err[-4000:]}"
    return [r for r in lines if not r.get("summary")], summary


@pytest.mark.parametrize("arch", sorted(TARGETS))
def test_every_launcher_compiles_with_the_jit_specialisation(arch, guard_runs):
    """Every launcher, driven through the integer values that specialise, compiles for sm_``arch``
    (frontend to PTX) as the JIT compiles it on a GPU; no kernel specialises an integer argument; and
    the canary (19d5887's ``.to`` on an int argument equal to 1) fails, so the guard sees that class."""
    rows, summary = _result(guard_runs[arch])
    print(f"\n[guard] sm_{arch}, triton {summary['triton']}: {len(rows)} cases, {summary['variants']} compiles "
          f"(to {summary['last_stage']}): {summary['per_kernel']}")
    failed = [f"{r['launcher']} [{r['case']}]: {r['error']}" for r in rows if r["error"]]
    assert not failed, f"{len(failed)} of {len(rows)} cases do not compile for sm_{arch}:\n" + "\n".join(failed[:8])
    assert {r["launcher"] for r in rows} == {"reverse_step", "attention", "top1", "attention_block",
                                                  "philox test kernel"}
    assert not summary["violations"], "integer arguments specialised by the JIT:\n" + "\n".join(summary["violations"])
    assert not summary["unlisted"], ("variants the JIT compiled that compile_configs() does not list (so the "
                                     "compile report does not check them):\n" + "\n".join(summary["unlisted"][:5]))
    assert summary["variants"] > 0
    assert "has no attribute 'to'" in summary["canary"], (
        f"the canary kernel did not fail as a GPU compile does ({summary['canary']}): triton "
        f"{summary['triton']} no longer specialises 1s this way, or the guard no longer compiles like the JIT")


def test_compile_only_restores_the_driver_and_the_jit():
    from triton import knobs
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction
    before = (getattr(driver, "_active", None), JITFunction.run, knobs.runtime.add_stages_inspection_hook,
              knobs.runtime.jit_cache_hook)
    with compile_only(90):
        assert driver.active.get_current_target().arch == 90
        assert JITFunction.run is not before[1]
    after = (getattr(driver, "_active", None), JITFunction.run, knobs.runtime.add_stages_inspection_hook,
             knobs.runtime.jit_cache_hook)
    assert all(a is b for a, b in zip(after, before))


if __name__ == "__main__":
    # the JIT, not the interpreter, for every kernel imported from here on ("0", not unset: conftest,
    # imported by the Philox test module, sets it to "1" when unset and there is no GPU)
    os.environ["TRITON_INTERPRET"] = "0"
    sys.exit(main(int(sys.argv[1]), *(sys.argv[2:3])))
