"""Argument checks of the ``flashcore`` command line that need more than a
flag's own text: output paths against the file system, sizes against this
machine's memory, the values a checkpoint's config.json allows (its
schedule's length, its distilled step count), and what a ``--resume`` may
change. Each runs before any model is built, so a wrong argument costs a
usage message, not a long run; everything here raises ``UsageError`` (exit
2) or ``ValueError`` (exit 1), never anything else.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .validation import command_flags, gib, memory_limit, sampling_clip  # noqa: F401 (command_flags, sampling_clip: re-exported for the entry layer)


class UsageError(Exception):
    """An argument found wrong after parsing: ``main`` prints the command's usage and exits 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default after its help, except where the help already says
    it in words (a default of None means "taken from somewhere", said there)
    or there is none to show (a switch that is off, a required argument)."""

    def _get_help_string(self, action):
        h = action.help or ""
        src = getattr(action, "config_default", None)
        if src is not None:
            # the config dataclass's default and range, looked up only when help is shown (the import is slow)
            module, cls, table, field = src
            import importlib
            allowed = getattr(importlib.import_module(f"flashcore.train.{module}"), table)[field].describe()
            if "default" not in h.lower():
                h = f"{h} (default: {config_default(module, cls, field)}; {allowed})"
            else:
                h = f"{h[:-1]}; {allowed})" if h.endswith(")") else f"{h} ({allowed})"
            return h.replace("%", "%%")
        if ("default" in h.lower() or any(action.default is v for v in (None, False, argparse.SUPPRESS))
                or action.required or not action.option_strings):
            return h
        return super()._get_help_string(action)


def config_default(module: str, cls: str, field: str):
    import dataclasses
    import importlib
    c = getattr(importlib.import_module(f"flashcore.train.{module}"), cls)
    f = {f.name: f for f in dataclasses.fields(c)}[field]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def field_type(module: str, table: str, field: str):
    """argparse ``type`` that checks a flag against its config field's range
    (``flashcore.train.<module>.<table>[field]``), imported only when the flag is given."""
    def parse(text: str):
        import importlib
        return getattr(importlib.import_module(f"flashcore.train.{module}"), table)[field].parse(text)
    parse.__name__ = field
    return parse


# ---- paths ----------------------------------------------------------------------------------

def _writable_parent(path: str) -> str | None:
    """Why nothing can be written at ``path`` (None: it can)."""
    d = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(d):
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        return f"{d!r} is a file, so nothing can be created under it"
    if not os.access(d, os.W_OK | os.X_OK) and not os.path.exists(path):
        return f"no permission to write in {d!r}"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f"no permission to write {path!r}"
    return None


def out_file(path: str) -> str:
    """argparse ``type`` of a flag naming a file to write (a picture, a JSON)."""
    if not path:
        raise argparse.ArgumentTypeError("expected a file name, got ''")
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path!r} is a directory; give the name of a file to write")
    why = _writable_parent(path)
    if why:
        raise argparse.ArgumentTypeError(f"cannot write {path!r}: {why}")
    return path


def out_dir(path: str) -> str:
    """argparse ``type`` of a flag naming a directory to write into (a run, an export)."""
    if not path:
        raise argparse.ArgumentTypeError("expected a directory name, got ''")
    if os.path.exists(path) and not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path!r} is a file, not a directory")
    why = _writable_parent(os.path.join(path, "x"))
    if why:
        raise argparse.ArgumentTypeError(f"cannot write into {path!r}: {why}")
    return path


def data_name(name: str) -> str:
    """argparse ``type`` of ``--data``: the form only; the loader says what is wrong with a folder."""
    if name.startswith("folder:") and not name[len("folder:"):]:
        raise argparse.ArgumentTypeError("folder: needs a path, e.g. folder:/data/pets")
    return name


# ---- a checkpoint's config.json, read before the model ---------------------------------------

def peek_meta(model_dir: str) -> dict | None:
    """The checkpoint's config.json if it is readable JSON with the fields used
    here, else None: the loader then reports what is wrong, in its own words."""
    try:
        name = "config.json"
        if not os.path.exists(os.path.join(model_dir, name)):
            name = "flashcore.json"          # a student distilled from a diffusers model (flashcore.foreign)
        with open(os.path.join(model_dir, name)) as f:
            meta = json.load(f)
        m = meta["model"]
        int(m.get("sample_size", 28)), int(m.get("channels", 1)), int(m.get("num_classes", 10))
        dict(meta.get("schedule") or {})
        return meta
    except Exception:       # anything wrong: leave it to the loader, which names the problem
        return None


def image_shape(meta: dict) -> tuple[int, int, int, int]:
    """(classes, channels, height, width) of a checkpoint's images."""
    m = meta["model"]
    s = int(m.get("sample_size", 28))
    return int(m.get("num_classes", 10)), int(m.get("channels", 1)), s, s


def timesteps(meta: dict) -> int:
    return int((meta.get("schedule") or {}).get("num_train_timesteps", 1000))


def check_steps(flag: str, steps: int, meta: dict | None) -> None:
    """A sampler cannot take more steps than its schedule has timesteps."""
    if meta is None:
        return
    n = timesteps(meta)
    if steps > n:
        raise UsageError(f"argument {flag}: {steps} steps, but the model's schedule has {n} timesteps; "
                         f"at most {n}")


def check_memory(flag: str, value: int, need: float, what: str) -> None:
    """Refuse a size whose (under-)estimated bytes exceed this machine's memory."""
    have = memory_limit()
    if need > have:
        raise UsageError(f"argument {flag}: {value} gives {what}: about {gib(need)} at least, more than this "
                         f"machine's {gib(have)} of memory")


def sample_bytes(n: int, meta: dict) -> float:
    """At least what ``n`` sampled images hold: the float32 batches and their concatenation,
    the uint8 grid and its 2x-scaled copy."""
    _, c, h, w = image_shape(meta)
    return n * c * h * w * (4 * 2 + 5)


def train_bytes(batch: int, channels: int, size: int, width: float) -> float:
    """A floor on a training step's memory: four float32 activation maps of the
    first level's width per sample kept for the backward pass, and the batch tensors."""
    return batch * size * size * (4 * 4 * width + 4 * 6 * channels)


def model_width(model: dict) -> float:
    """Activation values per pixel of the network's widest-resolution level."""
    if model.get("arch", "unet") == "unet":
        return int((model.get("block_out_channels") or (32,))[0])
    return int(model.get("num_heads", 4)) * int(model.get("head_dim", 32)) / int(model.get("patch_size", 2)) ** 2


def warn(msg: str) -> None:
    print(f"flashcore: warning: {msg}", file=sys.stderr)


# ---- resume ---------------------------------------------------------------------------------

def same_path(a: str, b: str) -> bool:
    return a == b or os.path.realpath(a) == os.path.realpath(b)


def check_resume(run: str, saved: dict, given: dict[str, tuple[str, object]], what: str) -> None:
    """``given``: field -> (flag, value) for the flags passed with --resume. A resumed
    run keeps its saved settings, so a flag that asks for another value is an error,
    not something silently ignored."""
    for field, (flag, value) in given.items():
        if field not in saved:
            continue
        old = saved[field]
        same = same_path(str(value), str(old)) if isinstance(value, str) else value == old
        if not same:
            raise ValueError(f"{what}: {run!r} was started with {flag} {old!r}; a resumed run keeps its "
                             f"settings, so {flag} {value!r} cannot apply (drop the flag, or start a new --out)")


# ---- flags that set a config field; what sampling a checkpoint takes from it -----------------

def config_flag(p, flag: str, module: str, cls: str, table: str, field: str, help: str, dest: str | None = None):
    """A flag that sets a config dataclass field: parsed with the field's range,
    None when not given (the config's default, shown in --help, applies)."""
    kw = {"dest": dest} if dest else {}
    act = p.add_argument(flag, type=field_type(module, table, field), default=None, help=help, **kw)
    act.config_default = (module, cls, table, field)
    return act


def build_config(build):
    """Build a config dataclass; its validation's ValueError is a usage error here."""
    try:
        return build()
    except ValueError as e:
        raise UsageError(str(e)) from None


def sampling_setup(model: str, steps: int | None, nc_flag: bool | None, default_steps: int | None = None):
    """(steps, noise correction) for sampling ``model``, from the flags or else the
    checkpoint's config: a student's distilled step count and noise correction. Raises
    UsageError for more steps than the schedule has; warns on a student sampled at
    another step count than it was distilled for."""
    meta = peek_meta(model)
    student_steps = None
    if meta is not None and meta.get("kind") == "student" and isinstance(meta.get("steps"), int):
        student_steps = meta["steps"]
    if steps is None:
        steps = student_steps or default_steps
    check_steps("--steps", steps, meta)
    if student_steps and steps != student_steps:
        warn(f"{model!r} was distilled for {student_steps} step{'s' if student_steps > 1 else ''}; "
             f"sampling it at {steps} steps gives other images than it was trained for")
    nc = nc_flag if nc_flag is not None else bool((meta or {}).get("noise_correction", True))
    if meta is not None and isinstance(meta.get("grid"), list) and len(meta["grid"]) == steps:
        from flashcore.schedule import trailing_grid
        if [int(t) for t in meta["grid"]] != trailing_grid(steps, timesteps(meta)):
            raise ValueError(f"{model!r} was distilled on the grid {meta['grid']}, not the trailing grid "
                             f"{trailing_grid(steps, timesteps(meta))} flashcore samples on")
    return steps, nc, meta


# ---- results and messages -------------------------------------------------------------------

def save_result(path: str, r: dict, what: str) -> None:
    """Write ``r`` to ``path``; if that fails, to a fallback file, and say where
    (the result was printed already: it is never lost with the write)."""
    import tempfile

    from flashcore.checkpoint import write_json
    try:
        write_json(path, r)
        return
    except OSError as e:
        why = f"{type(e).__name__}: {e.strerror or e}"
    try:
        fd, fallback = tempfile.mkstemp(prefix=f"flashcore-{what}-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(r, f, indent=2, sort_keys=True)
        where = f"the result is saved to {fallback} instead"
    except OSError as e:
        where = f"nor to a fallback file ({e.strerror or e}): only the printout above is left"
    raise ValueError(f"{what}: could not write --json {path!r} ({why}); {where}")


def distill_memory(cfg, val_samples: int | None) -> None:
    """Refuse a distillation batch or validation sample count this machine cannot hold."""
    meta = peek_meta(cfg.teacher)
    if meta is None:
        return
    _, c, s, _ = image_shape(meta)
    check_memory("--batch-size", cfg.batch_size, train_bytes(cfg.batch_size, c, s, model_width(meta["model"])),
                 f"{cfg.batch_size} training images of {c}x{s}x{s} an iteration")
    if val_samples:
        check_memory("--val-samples", val_samples, sample_bytes(val_samples, meta), f"{val_samples} images")


def one_line(e: BaseException) -> str:
    """An exception's message on one line (torch's span several), at most 2000 characters."""
    msg = " ".join(str(e).split())
    return msg if len(msg) <= 2000 else msg[:2000] + " ..."


# ---- flags derived from a config dataclass (validation.option metadata) ------------------------

def config_flags(p, cls, module: str, table: str, skip: tuple[str, ...] = ()) -> None:
    """One flag per ``option`` field of ``cls`` (value flags typed by the field's range in
    ``flashcore.train.<module>.<table>`` where it has one; switches as store-true), each
    with ``dest`` = the field's name and default None (= not given)."""
    import dataclasses
    import importlib
    ranges = getattr(importlib.import_module(f"flashcore.train.{module}"), table)
    for f in dataclasses.fields(cls):
        md = f.metadata
        if f.name in skip or not (md.get("flag") or md.get("switch")):
            continue
        if md.get("switch"):
            p.add_argument(md["switch"], dest=f.name, action="store_const", const=False, default=None,
                           help=md["help"])
        elif f.name in ranges:
            config_flag(p, md["flag"], module, cls.__name__, table, f.name, md["help"], dest=f.name)
        else:
            p.add_argument(md["flag"], dest=f.name, default=None,
                           type=int if f.type in (int, "int") else None,
                           help=f"{md['help']} (default: {f.default})")


def given_config(a, cls) -> dict[str, tuple[str, object]]:
    """field -> (flag, value) for every ``option`` flag of ``cls`` given on the command line."""
    import dataclasses
    out = {}
    for f in dataclasses.fields(cls):
        flag = f.metadata.get("switch") or f.metadata.get("flag")
        if flag and getattr(a, f.name, None) is not None:
            out[f.name] = (flag, getattr(a, f.name))
    return out


def read_config_file(path: str, cls) -> dict:
    """The fields of ``cls`` that a JSON or YAML file sets (``--config``); a usage error names
    the file and anything that is not a field."""
    import dataclasses
    import json
    try:
        with open(path) as fh:
            text = fh.read()
    except OSError as e:
        raise UsageError(f"--config {path}: {e.strerror or e}") from None
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml
            obj = yaml.safe_load(text)
        else:
            obj = json.loads(text)
    except Exception as e:       # yaml.YAMLError, json.JSONDecodeError
        raise UsageError(f"--config {path}: not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'}: "
                         f"{str(e).splitlines()[0]}") from None
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise UsageError(f"--config {path}: expected a mapping of {cls.__name__} fields, got {type(obj).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(obj) - names)
    if unknown:
        raise UsageError(f"--config {path}: {unknown[0]!r} is not a {cls.__name__} field "
                         f"(fields: {', '.join(sorted(names))})")
    return obj


# ---- shared by the command modules (cli.py, cli_distill.py) -----------------------------------

ROOT = os.environ.get("FLASHCORE_HOME", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_TEACHER = os.path.join(ROOT, "checkpoints", "mnist-teacher")
DEFAULT_CLASSIFIER = os.path.join(ROOT, "checkpoints", "mnist-classifier")


def _samples(text: str) -> int:
    from .validation import COUNT, Range
    return Range(int, 2, COUNT.hi).parse(text)      # an FD needs a covariance: two samples at least


SAMPLES = _samples


def command(sub, name: str, what: str):
    """A sub-command's parser: ``what`` is its one-line help and its description."""
    return sub.add_parser(name, help=what, description=what)


def add_device_flag(p):
    p.add_argument("--device", default="auto",
                   help="cpu, cuda or cuda:N; auto: cuda when a GPU is visible, else cpu")


def device_of(a):
    """The torch.device ``--device`` names; one that is not there is a usage error."""
    from flashcore.devices import resolve_device
    try:
        return resolve_device(a.device)
    except ValueError as e:
        raise UsageError(f"--device: {e}") from None
