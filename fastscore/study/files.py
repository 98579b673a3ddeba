"""A study's directory: what it holds, how it is resumed, and what ``force`` may remove.

``out/study.json`` is the config (a different config is refused without ``force``);
``rows/<net>-seed<s>.json`` one finished row each (the unit of resumption; a row's training resumes
from ``checkpoints/<net>-seed<s>.partial.safetensors`` until its checkpoint is saved, and that file stays
listed in the manifest after its removal); ``checkpoints/``,
``samples/``, ``figures/``; ``results.json``/``results.md``; ``invocations.json`` (wall time per
invocation). ``manifest.txt`` lists, one relative path a line, every file the study wrote, appended
after each atomic write (an ``O_APPEND`` write of one line, safe from several worker processes).
``force`` removes only the files in the manifest: nothing a user put in the directory is touched.
"""
from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from .._validate import UsageError
from ..checkpoint import (
    atomic_write,
    atomic_write_text,
    check_writable,
    load_model,
    load_tensors,
    read_meta,
    save_model,
    save_tensors,
)
from .config import StudyConfig

MANIFEST = "manifest.txt"
FIGURES = ("samples", "consistency", "loss", "attention")   # figures/<name>.png (figures.py)


def row_name(net: str, seed: int) -> str:
    return f"{net}-seed{seed}"


# the settings every fastscore study.json holds: StudyConfig's fields when settings could first be
# added. Never add to this list: a setting added since may be missing from a study.json written before
# it, and then has its default (``StudyConfig.matches``); a file without these is not a study.json.
STUDY_JSON_KEYS = frozenset((
    "n_pairs", "n_colours", "image_size", "n_train", "data_seed", "networks", "analytic", "els_patch", "width",
    "attn_dim", "attn_patch", "temperature", "coord_channels", "train_steps", "batch_size", "lr", "ema", "t_focus",
    "t_focus_prob", "n_seeds", "n_samples", "sampler", "steps", "eta", "clip_x0", "probe_t", "probe_n", "n_random"))


def read_study_json(path: Path) -> dict:
    """The config saved in ``path``; UsageError naming the file if it is not a fastscore study.json."""
    try:
        have = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON ({e}); it is not a fastscore study") from None
    if not isinstance(have, dict):
        raise UsageError(f"{path} is not a fastscore study.json (not a JSON object); choose another --out")
    fields = set(StudyConfig.__dataclass_fields__)
    if not STUDY_JSON_KEYS <= set(have) <= fields:
        raise UsageError(f"{path} is not a fastscore study.json of this version (missing "
                         f"{sorted(STUDY_JSON_KEYS - set(have))}, unknown {sorted(set(have) - fields)}); "
                         "choose another --out")
    try:
        StudyConfig.from_dict(have)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{path} is not a fastscore study.json (invalid config: {e}); choose another --out") from None
    return have


@dataclass(frozen=True)
class StudyDir:
    """The output directory of one study; every write goes through here and into the manifest."""
    path: Path

    def prepare(self, config: StudyConfig, force: bool) -> None:
        """Make a new study directory, or resume one with the same config; with ``force``, replace a
        study of another config (its manifest's files only). Refuses any other directory."""
        out = self.path
        check_writable(out, directory=True)
        study = out / "study.json"
        if out.exists() and any(out.iterdir()):
            if not study.exists():  # never delete anything in a directory the study did not make
                raise FileExistsError(f"{out} exists, is not empty and is not a fastscore study; choose another --out")
            have = read_study_json(study)
            if config.matches(have):
                if not (out / MANIFEST).exists():
                    self._adopt(config)
                return  # resume
            if not (out / MANIFEST).exists():
                raise FileExistsError(f"{out} holds a study without a manifest (written by an older fastscore), so "
                                      "what it wrote cannot be told apart: remove it yourself or choose another --out")
            if not force:
                raise FileExistsError(f"{out} holds a study with another config; pass --force (force=True) to "
                                      "replace it (only the files it wrote are removed), or choose another --out")
            self.remove_written()
        out.mkdir(parents=True, exist_ok=True)
        self.write_text("study.json", json.dumps(config.to_dict(), indent=2))

    def _adopt(self, config: StudyConfig) -> None:
        """A study from before the manifest, resumed: record the files it has under the names this
        config writes (so a later ``force`` removes them, and no stale row survives a replacement)."""
        names = [row_name(n, s) for n, s in config.jobs()]
        rels = (["study.json", "results.json", "results.md", "invocations.json"]
                + [f"{d}/{n}.{ext}" for n in names
                   for d, ext in (("rows", "json"), ("samples", "safetensors"), ("checkpoints", "safetensors"))]
                + [f"figures/{f}.png" for f in FIGURES])
        for rel in rels:
            if (self.path / rel).is_file():
                self._record(rel)

    def written(self) -> list[str]:
        m = self.path / MANIFEST
        return list(dict.fromkeys(m.read_text().split("\n"))) if m.exists() else []

    def remove_written(self) -> None:
        """Remove every file in the manifest, then the manifest, then folders left empty."""
        root = self.path.resolve()
        dirs: set[Path] = set()
        for rel in self.written():
            if not rel:
                continue
            p = (self.path / rel)
            if root not in p.resolve().parents:   # a manifest entry that points outside: never follow it
                continue
            if p.is_file() or p.is_symlink():
                p.unlink()
            dirs.update(q for q in p.parents if root in q.resolve().parents)
        (self.path / MANIFEST).unlink(missing_ok=True)
        for d in sorted(dirs, key=lambda q: -len(q.parts)):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()

    def _record(self, rel: str) -> None:
        """Add ``rel`` to the manifest unless it is listed already (a file written again: a report, a cell's
        measurement)."""
        manifest = self.path / MANIFEST
        if manifest.exists() and rel in manifest.read_text().splitlines():
            return
        fd = os.open(manifest, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, (rel + "\n").encode())
        finally:
            os.close(fd)

    def _write(self, rel: str, write: Callable[[Path], Any]) -> Path:
        self._record(rel)   # before the write: a file is never on disk without its manifest line
        write(self.path / rel)
        return self.path / rel

    def write_text(self, rel: str, text: str) -> Path:
        return self._write(rel, lambda p: atomic_write_text(p, text, overwrite=True))

    def write_json(self, rel: str, doc: Any, indent: int | None = None) -> Path:
        return self.write_text(rel, json.dumps(doc, indent=indent))

    def write_with(self, rel: str, write: Callable[[str], None]) -> Path:
        """``write(tmp_path)`` then an atomic move to ``rel`` (figures)."""
        return self._write(rel, lambda p: atomic_write(p, write, overwrite=True))

    def save_model(self, rel: str, model, **kw) -> Path:
        return self._write(rel, lambda p: save_model(p, model, overwrite=True, **kw))

    def save_samples(self, name: str, x: torch.Tensor, config: StudyConfig) -> Path:
        """Samples as a file ``fastscore score`` can read (it records the dataset and training set)."""
        return self._write(f"samples/{name}.safetensors", lambda p: save_tensors(
            p, {"samples": x}, {"kind": "samples", "data": config.data_config().to_dict(),
                                "extra": {"n_train": config.n_train, "data_seed": config.data_seed}}, overwrite=True))

    def load_samples(self, name: str) -> torch.Tensor | None:
        path = self.path / "samples" / f"{name}.safetensors"
        return load_tensors(path, "samples")[0]["samples"] if path.exists() else None

    def partial(self, name: str) -> Path:
        """``checkpoints/<name>.partial.safetensors``: the partial-training state of row(s) ``name``, which
        ``fastscore.train`` writes itself (``resume``); recorded in the manifest here, before any write."""
        rel = f"checkpoints/{name}.partial.safetensors"
        self._record(rel)
        return self.path / rel

    def checkpoint(self, net: str, seed: int) -> Path:
        return self.path / "checkpoints" / f"{row_name(net, seed)}.safetensors"

    def row_path(self, net: str, seed: int) -> Path:
        return self.path / "rows" / f"{row_name(net, seed)}.json"

    def finished_rows(self, jobs: list[tuple[str, int]]) -> dict:
        """The rows of ``jobs`` already saved: ``{(net, seed): row}``."""
        return {(n, s): json.loads(self.row_path(n, s).read_text()) for n, s in jobs if self.row_path(n, s).exists()}

    def record_invocation(self, seconds: float, rows_run: int, interrupted: bool = False) -> list[dict]:
        """Append this invocation's wall time to ``invocations.json``; the study's wall time is their sum
        (an interrupted invocation counts too). A results.json written before this file existed
        contributes its recorded wall time."""
        path = self.path / "invocations.json"
        if path.exists():
            runs = json.loads(path.read_text())
        elif (self.path / "results.json").exists():
            runs = [{"seconds": json.loads((self.path / "results.json").read_text())["wall_seconds"],
                     "rows_run": None}]
        else:
            runs = []
        runs.append({"seconds": seconds, "rows_run": rows_run, **({"interrupted": True} if interrupted else {})})
        self.write_json("invocations.json", runs, indent=1)
        return runs


def versions(device: torch.device) -> dict:
    try:
        import triton
        tv = triton.__version__
    except Exception:  # pragma: no cover
        tv = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"fastscore": __version__, "torch": torch.__version__, "triton": tv, "python": platform.python_version(),
            "device": str(device), "device_name": name, "threads": torch.get_num_threads()}


def check_checkpoint(path: Path, config: StudyConfig, net: str, seed: int, half: str | None = None) -> None:
    """Check that the checkpoint ``path`` was trained as ``config`` trains row ``(net, seed)`` (of half
    ``half`` in the halves study): model, training and data configs, training set (``n_train``,
    ``data_seed``), the half, and the initial-weights seed where the file records it (since this check
    exists). A checkpoint of another run (copied in by hand, or left by other settings) is a UsageError
    naming the file and what differs: it is never used silently. Reads the metadata only."""
    from ..data import KVConfig
    from ..models import ModelConfig
    from ..training import TrainConfig
    from .config import MODEL_SEED
    meta = read_meta(path, "model")
    want = {"n_train": config.n_train, "data_seed": config.data_seed, "half": half}
    saved_extra = meta.get("extra") or {}
    if "init_seed" in saved_extra:
        want["init_seed"] = MODEL_SEED + seed
    differ = [f"extra {k} (saved {saved_extra.get(k)!r}, here {v!r})" for k, v in want.items()
              if saved_extra.get(k) != v]
    pairs = (("model", lambda: ModelConfig(**meta["model"]), config.model_config(net)),
             ("train", lambda: TrainConfig(**meta["train"]), config.train_config(seed)),
             ("data", lambda: KVConfig.from_dict(meta["data"]), config.data_config()))
    for name, saved_of, here in pairs:
        try:
            saved = saved_of()
        except (KeyError, TypeError, ValueError) as e:
            differ.append(f"{name} config (saved one unreadable: {e})")
            continue
        fields = [f for f in here.__dataclass_fields__ if getattr(saved, f, None) != getattr(here, f)]
        differ += [f"{name} {f} (saved {getattr(saved, f, None)!r}, here {getattr(here, f)!r})" for f in fields]
    if differ:
        row = f"{net}{'' if half is None else '-' + half} seed {seed}"
        raise UsageError(f"{path} was not trained as this study's row {row}: "
                         f"{'; '.join(differ[:4])}{' ...' if len(differ) > 4 else ''}. Move it away (or choose "
                         "another --out); it is not used or overwritten")


def load_checked_model(path: Path, config: StudyConfig, net: str, seed: int, *, backend: str = "auto",
                       device: str | torch.device = "cpu", half: str | None = None) -> tuple[torch.nn.Module, dict]:
    """``(model, meta)`` of the checkpoint ``path`` of row ``(net, seed)`` after ``check_checkpoint``."""
    check_checkpoint(path, config, net, seed, half)
    return load_model(path, backend=backend, device=device)
