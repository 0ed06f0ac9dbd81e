"""Checkpoints: safetensors for tensors, JSON for everything else, never pickle.

Every file is written to a temporary name and moved into place with
``os.replace`` (atomic on POSIX), and a training state is valid only once its
``state.json`` (written last, with the SHA-256 of each tensor file) is there:
a crash mid-save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

import torch
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """A checkpoint that is missing, of the wrong kind, or corrupt."""


def _atomic(path: str, write) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)          # mkstemp creates 0600; checkpoints are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj: Any) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
    _atomic(path, w)


def read_json(path: str) -> Any:
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint: {path} is missing")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint: {path} is not valid JSON ({e})") from None


def write_tensors(path: str, tensors: dict[str, torch.Tensor]) -> str:
    """Save tensors (contiguous, CPU) atomically; returns the file's SHA-256."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(path, lambda tmp: save_file(flat, tmp))
    return sha256(path)


def read_tensors(path: str, expect_sha: str | None = None) -> dict[str, torch.Tensor]:
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint: {path} is missing")
    if expect_sha is not None and sha256(path) != expect_sha:
        raise CheckpointError(f"checkpoint: {path} is corrupt (checksum mismatch)")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise CheckpointError(f"checkpoint: {path} cannot be read ({e})") from None


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- optimizer state <-> (tensors, json) --------------------------------------------------

def optimizer_to_flat(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        meta["state"][str(pid)] = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}.{pid}.{k}"] = v
                meta["state"][str(pid)][k] = "__tensor__"
            else:
                meta["state"][str(pid)][k] = v
    return tensors, meta


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict, meta: dict, prefix: str) -> None:
    state = {}
    for pid, st in meta["state"].items():
        state[int(pid)] = {k: (tensors[f"{prefix}.{pid}.{k}"] if v == "__tensor__" else v)
                           for k, v in st.items()}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> dict:
    return {"torch": torch.get_rng_state()}


def set_rng_state(t: dict) -> None:
    torch.set_rng_state(t["torch"])


def portable_path(path: str | None, start: str) -> str | None:
    """``path`` as a JSON file meant to be shipped records it: never an absolute path
    of the machine it was made on. Inside the repository: relative to its root, as
    the README's commands name checkpoints (``checkpoints/mnist-teacher``); elsewhere:
    relative to ``start``, the directory the JSON file is written in."""
    if not path:
        return path
    root = os.path.abspath(os.environ.get("FLASHCORE_HOME", os.path.dirname(os.path.dirname(__file__))))
    full = os.path.abspath(path)
    if os.path.commonpath([full, root]) == root:
        return os.path.relpath(full, root)
    return os.path.relpath(full, os.path.abspath(start))
