"""Checkpoints and sample files: tensors in safetensors, configuration as JSON in its metadata.

One file holds everything: the weights (or samples) as safetensors tensors and, under the metadata
key ``"fastscore"``, a JSON document (format version, kind, model/data/train configs). Loading
never unpickles code. Files are written atomically (temporary file, then rename), and an existing
file is never replaced unless ``overwrite=True``.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = 1


def check_writable(path: str | os.PathLike, *, overwrite: bool = False, directory: bool = False) -> Path:
    """Check, before any work, that ``path`` (a file, or with ``directory=True`` a folder) can be written:
    FileExistsError (an existing file without ``overwrite``), IsADirectoryError / NotADirectoryError
    (the wrong kind of thing in the way) or PermissionError (the nearest existing folder refuses a
    file), each naming the path. Creates nothing that outlives the check."""
    path = Path(path)
    if directory:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"{path} is a file, not a directory")
        folder = path
    else:
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a directory; expected a file name")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (--force on the command line) to replace it")
        folder = path.parent
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot write {path}: {folder} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=folder):   # the only sure test (read-only mounts, ACLs, root)
            pass
    except OSError as e:
        raise PermissionError(f"cannot write {path}: {folder} is not writable ({e.strerror})") from None
    return path


def atomic_write(path: str | os.PathLike, write, *, overwrite: bool = False) -> Path:
    """Call ``write(tmp_path)`` then move the result to ``path``; refuse to replace an existing file."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--force on the command line) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically (see ``atomic_write``)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text), overwrite=overwrite)


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any], *,
                 overwrite: bool = False) -> Path:
    """Save ``tensors`` with the JSON document ``meta`` to a safetensors file at ``path``."""
    from safetensors.torch import save_file
    doc = json.dumps({"format": FORMAT, **meta})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"fastscore": doc}), overwrite=overwrite)


def load_tensors(path: str | os.PathLike, kind: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a file written by ``save_tensors``: ``(tensors, meta)``. ValueError on a corrupt or foreign file."""
    return _read(path, kind, tensors=True)


def read_meta(path: str | os.PathLike, kind: str | None = None) -> dict:
    """The JSON document of a file written by ``save_tensors``, without reading its tensors (a header
    read: milliseconds for any file size). The errors of ``load_tensors``."""
    return _read(path, kind, tensors=False)[1]


def _read(path: str | os.PathLike, kind: str | None, tensors: bool) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("fastscore")
            out = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}  # noqa: SIM118 (no __iter__)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
    if raw is None:
        raise ValueError(f"{path} is a safetensors file but not a fastscore file (no 'fastscore' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} has corrupt fastscore metadata ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} has corrupt fastscore metadata (not a JSON object)")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}; this fastscore reads format {FORMAT}")
    if kind is not None and meta.get("kind") != kind:
        raise ValueError(f"{path} holds a {meta.get('kind')!r}, expected a {kind!r}")
    return out, meta


def save_model(path: str | os.PathLike, model, *, data_config=None, train_config=None, extra: dict | None = None,
               overwrite: bool = False) -> Path:
    """Save a ``ScoreNet``'s weights and configs (and the data/training configs it was trained with)."""
    from .models import ScoreNet
    if not isinstance(model, ScoreNet):
        raise TypeError(f"model must be a ScoreNet, got {type(model).__name__}")
    meta = {"kind": "model", "model": model.config.to_dict(),
            "data": data_config.to_dict() if data_config is not None else None,
            "train": train_config.to_dict() if train_config is not None else None, "extra": extra or {}}
    return save_tensors(path, model.state_dict(), meta, overwrite=overwrite)


def load_model(path: str | os.PathLike, *, backend: str = "auto", device: str | torch.device = "cpu"):
    """``(model, meta)``: a ``ScoreNet`` in eval mode with the saved weights, and the saved document."""
    from .models import ModelConfig, build_model
    tensors, meta = load_tensors(path, "model")
    try:
        config = ModelConfig(**meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} has an invalid model config ({e})") from None
    model = build_model(config, backend=backend)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    bad = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or bad:
        raise ValueError(f"{path}: weights do not match the config (missing {missing}, unexpected {unexpected}, "
                         f"wrong shape {bad})")
    model.load_state_dict(tensors)
    return model.to(device).eval(), meta
