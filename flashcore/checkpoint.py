"""Checkpoints: safetensors for tensors, JSON for everything else, never pickle.

Two atomic writes, one mechanism (the layout is in docs/checkpoints.md):

* a file (``atomic_write``): written under a unique temporary name in its folder,
  fsynced, moved into place with ``os.replace``, the folder fsynced. Writers of
  the same path never share a temporary file; readers see the old file or the
  new one, whole.
* a directory (``write_dir``): built whole under a temporary name, fsynced,
  then swapped in: ``path`` -> ``.<name>.prev``, temporary -> ``path``, the
  parent fsynced, ``.<name>.prev`` removed. At every instant one of ``path``
  and ``.<name>.prev`` is complete, and ``current_dir`` finds it, so a crash
  (kill -9, power loss) at any point of a save leaves the new checkpoint or
  the previous one loadable.

Loading checks what it reads (``check_json``, ``config_from_json``,
``tensor_problem``): a wrong checkpoint is one ``CheckpointError`` line that
names the file and the field or tensor, never a half-loaded model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import typing
from typing import Any

import torch
from safetensors.torch import load_file, save_file

TMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A checkpoint that is missing, of the wrong kind, or corrupt."""


# ---- atomic files and directories -----------------------------------------------------------

def _fsync(path: str) -> None:
    """Flush a file's or a directory's contents and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write) -> None:
    """``write(tmp)`` a complete file, then move it to ``path`` in one step."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    # the suffix keeps the extension: writers that pick the format from the name (PIL) still can
    fd, tmp = tempfile.mkstemp(dir=d, prefix=TMP_PREFIX, suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)          # mkstemp creates 0600; checkpoints are meant to be shared
        _fsync(tmp)                   # the data is on disk before the name points at it
        os.replace(tmp, path)
        _fsync(d)                     # and the new name survives a power loss
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def prev_dir(path: str) -> str:
    """Where ``write_dir`` keeps the previous version of ``path`` while it swaps."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.prev")


def current_dir(path: str) -> str:
    """``path``, or its previous version when a crash came between the two renames of a swap."""
    if not os.path.isdir(path) and os.path.isdir(prev_dir(path)):
        return prev_dir(path)
    return path


def write_dir(path: str, write) -> None:
    """Replace the directory ``path`` as a whole by what ``write(tmp)`` puts in ``tmp``.

    ``path`` is complete (old or new) at every instant except between the two
    renames, when ``prev_dir(path)`` is; ``current_dir`` resolves both.
    """
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f"{TMP_PREFIX}{name}-")
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        for root, dirs, files in os.walk(tmp, topdown=False):
            for f in files:
                _fsync(os.path.join(root, f))
            _fsync(root)
        prev = prev_dir(path)
        if os.path.isdir(path):
            if os.path.lexists(prev):      # left by a crash after a swap: ``path`` is the complete one
                _remove(prev)
            os.rename(path, prev)
        # (``path`` missing and ``prev`` there: a crash between the renames; ``prev`` stays until now)
        os.rename(tmp, path)
        _fsync(parent)
        if os.path.lexists(prev):
            _remove(prev)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _remove(p: str) -> None:
    """Remove a file, a symbolic link (not its target) or a directory tree."""
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p)
    else:
        os.remove(p)


def remove_stale_temps(directory: str) -> None:
    """Remove the temporary files and directories a killed writer left in ``directory``.
    Only for a directory this process holds exclusively (a locked run folder)."""
    if not os.path.isdir(directory):
        return
    for e in os.listdir(directory):
        if e.startswith(TMP_PREFIX):
            try:
                _remove(os.path.join(directory, e))
            except FileNotFoundError:
                pass


# ---- JSON ------------------------------------------------------------------------------------

def write_json(path: str, obj: Any) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
    atomic_write(path, w)


def read_json(path: str) -> Any:
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint: {path} is missing")
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, RecursionError) as e:     # JSONDecodeError, UnicodeDecodeError, too deep
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint: {path} is not valid JSON ({msg})") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint: {path} cannot be read ({e.strerror})") from None


def _is(v: Any, kind: str) -> bool:
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind == "numbers":
        return isinstance(v, list) and all(_is(x, "number") for x in v)
    return {"str": str, "bool": bool, "dict": dict, "list": list, "null": type(None)}[kind] is type(v)


_DESCRIBE = {"int": "an integer", "number": "a number", "numbers": "a list of numbers", "str": "a string",
             "bool": "true or false", "dict": "an object", "list": "a list", "null": "null"}


def check_json(obj: Any, schema: dict[str, str], path: str, where: str = "") -> None:
    """CheckpointError unless ``obj`` is an object whose fields have the kinds ``schema``
    gives: ``"int"``, ``"number|null"``, ...; a trailing ``?`` marks a field that may be absent.
    ``where`` prefixes field names in messages (``"model."``)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint: {path}: {where.rstrip('.') or 'the file'} must be a JSON object, "
                              f"got {type(obj).__name__}")
    for key, spec in schema.items():
        kinds = spec.rstrip("?")
        if key not in obj:
            if spec.endswith("?"):
                continue
            raise CheckpointError(f"checkpoint: {path}: field {where + key!r} is missing")
        if not any(_is(obj[key], k) for k in kinds.split("|")):
            want = " or ".join(_DESCRIBE[k] for k in kinds.split("|"))
            raise CheckpointError(f"checkpoint: {path}: field {where + key!r} must be {want}, "
                                  f"got {json.dumps(obj[key])[:40]}")


def _kind_of(hint) -> str | None:
    """The JSON kind of a config field's type (None: a nested dataclass)."""
    args = typing.get_args(hint)
    if args and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return f"{_kind_of(inner[0])}|null" if len(inner) == 1 else None
    return {str: "str", int: "int", float: "number", bool: "bool", tuple: "numbers", list: "list",
            dict: "dict"}.get(typing.get_origin(hint) or hint)


def config_from_json(cls, obj: Any, path: str, where: str = "", required: tuple[str, ...] = ()):
    """``cls(**obj)`` for a config dataclass, nested dataclass fields included, after
    checking each field's JSON kind; absent fields take their defaults unless in ``required``.
    Every problem is a CheckpointError naming ``path`` and the field."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if isinstance(obj, dict):
        unknown = sorted(set(obj) - set(fields))
        if unknown:
            raise CheckpointError(f"checkpoint: {path}: field {where + unknown[0]!r} is not a "
                                  f"{cls.__name__} field")
    schema = {}
    for name in fields:
        if dataclasses.is_dataclass(hints[name]):
            schema[name] = "dict?"
        else:
            kind = _kind_of(hints[name])
            if kind is None:
                continue
            schema[name] = kind + ("" if name in required else "?")
    check_json(obj, schema, path, where)
    kw = {}
    for name, v in obj.items():
        if dataclasses.is_dataclass(hints[name]):
            v = config_from_json(hints[name], v, path, f"{where}{name}.")
        elif schema.get(name, "").startswith("numbers"):
            v = tuple(v)
        kw[name] = v
    try:
        return cls(**kw)
    except (ValueError, TypeError) as e:            # the config's own checks
        field = f"field {where.rstrip('.')!r}: " if where else ""
        raise CheckpointError(f"checkpoint: {path}: {field}{str(e).splitlines()[0]}") from None


# ---- tensors ---------------------------------------------------------------------------------

def write_tensors(path: str, tensors: dict[str, torch.Tensor]) -> str:
    """Save tensors (contiguous, CPU) atomically; returns the file's SHA-256."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp))
    return sha256(path)


def read_tensors(path: str, expect_sha: str | None = None) -> dict[str, torch.Tensor]:
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint: {path} is missing")
    if expect_sha is not None and sha256(path) != expect_sha:
        raise CheckpointError(f"checkpoint: {path} is corrupt (checksum mismatch)")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise CheckpointError(f"checkpoint: cannot load {path} ({str(e).splitlines()[0] if str(e) else e!r})") from None


def tensor_problem(saved: dict[str, torch.Tensor],
                   expected: dict[str, torch.Tensor]) -> tuple[str, str, bool] | None:
    """What is wrong with ``saved`` as a replacement for ``expected`` (a state dict), or None:
    (tensor name, ``"is missing"``-style problem, whether it is a name/shape mismatch rather
    than bad values). Floating-point tensors must be floating point (any width) and finite."""
    def dt(t):
        return str(t.dtype).replace("torch.", "")
    for k, ref in expected.items():
        if k not in saved:
            return k, "is missing", True
        v = saved[k]
        if tuple(v.shape) != tuple(ref.shape):
            return k, f"has shape {tuple(v.shape)}, the model needs {tuple(ref.shape)}", True
        if ref.is_floating_point():
            if not v.is_floating_point():
                return k, f"is {dt(v)}, not floating point", False
            if not bool(torch.isfinite(v).all()):
                return k, "holds NaN or infinite values", False
        elif v.dtype != ref.dtype:
            return k, f"is {dt(v)}, the model needs {dt(ref)}", False
    extra = sorted(set(saved) - set(expected))
    if extra:
        return extra[0], f"is not in the model ({len(extra)} unexpected tensors)", True
    return None


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


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict, meta: dict, prefix: str,
                        path: str = "the checkpoint") -> None:
    """Restore ``opt`` from ``optimizer_to_flat``'s output; a missing, misshapen or
    non-finite state tensor, or groups that do not fit ``opt``, is a CheckpointError."""
    params = [p for g in opt.param_groups for p in g["params"]]
    try:
        order = [i for g in meta["param_groups"] for i in g["params"]]
        state = {}
        for pid, st in meta["state"].items():
            p = params[order.index(int(pid))]
            state[int(pid)] = {}
            for k, v in st.items():
                if v == "__tensor__":
                    name = f"{prefix}.{pid}.{k}"
                    if name not in tensors:
                        raise CheckpointError(f"checkpoint: {path}: tensor {name!r} is missing")
                    v = tensors[name]
                    if v.dim() and v.shape != p.shape:
                        raise CheckpointError(f"checkpoint: {path}: tensor {name!r} has shape {tuple(v.shape)}, "
                                              f"the parameter has {tuple(p.shape)}")
                    if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                        raise CheckpointError(f"checkpoint: {path}: tensor {name!r} holds NaN or infinite values")
                state[int(pid)][k] = v
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except CheckpointError:
        raise
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"checkpoint: {path}: the {prefix!r} optimizer state does not fit the optimizer "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


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
