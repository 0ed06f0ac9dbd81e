"""Allowed values of configuration fields, checked in one place for both ways
a value arrives: a config dataclass built in code or loaded from a JSON file
(``check_fields`` in its ``__post_init__``), and a command-line flag
(``Range.parse`` as the argparse ``type``, so a bad value is a usage error
that names the flag before anything runs).

No torch here: the command line imports this to build its parser.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

SEED_MAX = 2 ** 32 - 1     # numpy's limit; torch's generators take any of these


def _int(v) -> str:
    v = int(v)
    return f"10^{len(str(v)) - 1}" if v >= 10 ** 6 and str(v).strip("0") == "1" else str(v)


@dataclass(frozen=True)
class Range:
    """An int or float field's allowed values: finite, between ``lo`` and ``hi``
    (closed ends unless ``lo_open`` / ``hi_open``); ``optional``: None allowed."""
    kind: type = float
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    optional: bool = False

    def describe(self) -> str:
        if self.kind is int:
            if self.lo is not None and self.hi is not None:
                return f"an integer in {_int(self.lo)}..{_int(self.hi)}"
            if self.lo is not None:
                return f"an integer >= {_int(self.lo)}"
            return "an integer"
        if self.lo is not None and self.hi is not None:
            return (f"a number in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}"
                    f"{')' if self.hi_open else ']'}")
        if self.lo is not None:
            return f"a number {'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"a number {'<' if self.hi_open else '<='} {self.hi:g}"
        return "a finite number"

    def ok(self, v) -> bool:
        if v is None:
            return self.optional
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False                 # JSON "3" or true where a number belongs
        if self.kind is int and not isinstance(v, int):
            return False
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
            return False
        return True

    def check(self, name: str, v) -> None:
        if not self.ok(v):
            raise ValueError(f"{name} must be {self.describe()}{' or null' if self.optional else ''}, got {v!r}")

    def parse(self, text: str):
        """argparse ``type``: the value, or ArgumentTypeError (exit 2, naming the flag)."""
        try:
            v = float(text)
            if self.kind is int:
                # "1e4" is a common way to write an iteration count; "2.5" is not a count
                if not v.is_integer():
                    raise ValueError
                v = int(text) if text.strip().lstrip("+-").isdigit() else int(v)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}") from None
        if not self.ok(v):
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}")
        return v


def check_fields(obj, ranges: dict[str, Range], who: str) -> None:
    """Raise ValueError naming the first field of ``obj`` outside its range."""
    for name, r in ranges.items():
        r.check(f"{who}: {name}", getattr(obj, name))


def check_choice(who: str, name: str, v, choices) -> None:
    if v not in choices:
        raise ValueError(f"{who}: {name} must be one of {', '.join(map(str, choices))}; got {v!r}")


def check_str(who: str, name: str, v) -> None:
    if not isinstance(v, str) or not v:
        raise ValueError(f"{who}: {name} must be a non-empty string, got {v!r}")


def check_bool(who: str, obj, names) -> None:
    for name in names:
        v = getattr(obj, name)
        if not isinstance(v, bool):
            raise ValueError(f"{who}: {name} must be true or false, got {v!r}")


# Shared bounds. A learning rate above 1 or a timestep count above 10^4 is a typo, not an experiment.
SEED = Range(int, 0, SEED_MAX)
COUNT = Range(int, 1, 10 ** 9)                 # steps, iterations, batch sizes, intervals
LR = Range(float, 0, 1, lo_open=True)
DECAY = Range(float, 0, 1, hi_open=True)       # EMA decay: 1 would never move the average
PROBABILITY = Range(float, 0, 1)
GUIDANCE = Range(float, 0, 100)
NONNEGATIVE = Range(float, 0)
MAX_TIMESTEPS = 10_000


def memory_limit() -> int:
    """Bytes this process may hold at most: physical memory, or the container's
    cgroup limit when lower. Sizes estimated above this cannot run here."""
    import os
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                v = f.read().strip()
        except OSError:
            continue
        if v.isdigit():
            total = min(total, int(v))
    return total


def gib(n: float) -> str:
    """A byte count for people: 3.2 GiB, 12.0 MiB."""
    for unit, scale in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{int(n)} bytes"


def option(default, flag: str | None = None, help: str = "", switch: str | None = None):
    """A config dataclass field that carries its command-line flag and one
    sentence of help, so the CLI derives its flags from the config (one source):
    ``flag`` takes a value; ``switch`` is a store-true flag that turns a True
    default off (``--no-srl``)."""
    import dataclasses
    kw = {"default_factory": default} if callable(default) else {"default": default}
    return dataclasses.field(metadata={"flag": flag, "help": help, "switch": switch}, **kw)


def sampling_clip(meta: dict | None, clip_flag: float | None) -> float:
    """The x0 threshold for sampling: the flag if given, else the checkpoint's own (a DDIL
    student distilled with reflection carries ``clip`` in its config.json), else 0 (off)."""
    if clip_flag is not None:
        return clip_flag
    v = (meta or {}).get("clip", 0.0)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 100 else 0.0


def command_flags(cfg, always: tuple[str, ...] = ()) -> list[str]:
    """The flags that rebuild ``cfg``: the fields in ``always``, and every other one off its default."""
    import dataclasses
    default = type(cfg)(**{n: getattr(cfg, n) for n in always})
    out = []
    for f in dataclasses.fields(cfg):
        v, md = getattr(cfg, f.name), f.metadata
        if md.get("flag") and (f.name in always or v != getattr(default, f.name)):
            out += [md["flag"], str(v)]
        elif md.get("switch") and v is False:
            out.append(md["switch"])
    return out
