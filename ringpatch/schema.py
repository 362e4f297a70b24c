"""The recipe schema's building blocks: each key's type, range and path kind, declared once on the
field (typing.Annotated), checked by one function, and printed by `ringpatch recipe --schema`.

    micro_batch: Annotated[int, Range(1)] = 1
    \"\"\"Samples per dp rank per micro-step.\"\"\"

Every message names the dotted key, the value and the rule; the field's description follows as
the fix's context.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import os
import textwrap
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from ringpatch.errors import BadValue, Missing


@dataclass(frozen=True)
class Range:
    """low <= value <= high (None: unbounded); low_open excludes low. Integers print as "> 0" and
    ">= 0", other numbers as "a finite number in [low, high]"."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def check(self, where: str, value) -> None:
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or value <= self.high
        if isinstance(value, int) and low_ok and high_ok:
            return
        if isinstance(value, float) and math.isfinite(value) and low_ok and high_ok:
            return
        raise BadValue(f"{where} must be {self.rule(value)}, got {value!r}")

    def rule(self, value=0) -> str:
        if isinstance(value, int) and not isinstance(value, bool) and self.low is not None:
            if self.high is not None:
                return f"an integer in [{int(self.low)}, {int(self.high)}]"
            return f"> {self.low:g}" if self.low_open else f">= {self.low:g}"
        low = "-inf" if self.low is None else float(self.low)
        high = "inf" if self.high is None else float(self.high)
        opening = "(" if self.low_open or self.low is None else "["
        closing = ")" if self.high is None else "]"
        return f"a finite number in {opening}{low}, {high}{closing}"


POSITIVE = Range(0, low_open=True)
NONNEGATIVE = Range(0)


@dataclass(frozen=True)
class PathKind:
    """A path a key names. kind: "file" (must exist), "dir" (a folder, or one ringpatch creates: not
    an existing file), "source" (a local file or folder, or a hub id: checked where it is read)."""

    kind: Literal["file", "dir", "source"]

    def resolve(self, where: str, value, folder: Path | None):
        """`value` as read from a recipe in `folder`: a relative "file" or "source" path names what is
        beside the recipe (folder/value); where nothing is there but the current folder has it, that
        (so a path written relative to where commands run still works); where both exist and differ,
        BadValue. A "source" found in neither place stays as written when it reads as a hub id (see
        looks_local). A "dir" is where ringpatch writes: relative to the current folder, untouched."""
        if folder is None or self.kind == "dir" or not isinstance(value, str) or not value.strip():
            return value
        path = Path(value).expanduser()
        check_name_lengths(where, path)
        if path.is_absolute():
            return str(path)
        beside, here = folder / path, path
        check_name_lengths(where, beside)
        if beside.exists():
            if here.exists() and not os.path.samefile(beside, here):
                raise BadValue(
                    f"{where} {value} names two different things: {tidy(beside)} beside the recipe and {tidy(here)} "
                    "in the current folder; a relative path is read beside the recipe first, so write the one you "
                    "mean as an absolute path"
                )
            return tidy(beside)
        if here.exists():
            return value
        if self.kind == "file":
            raise Missing(
                f"{where} {value} does not exist: not beside the recipe ({tidy(beside)}) nor in the current folder "
                f"({tidy(here)})"
            )
        if not looks_local(value) and not (len(path.parts) == 2 and beside.parent.is_dir()):
            return value  # a hub id, or a path the current folder will hold (see preflight.is_local)
        return tidy(beside)

    def check(self, where: str, value) -> None:
        if value is None:
            return
        if not isinstance(value, str) or not value.strip():
            raise BadValue(f"{where} must be a non-empty path, got {value!r}: an empty path means this folder")
        path = Path(value).expanduser()
        check_name_lengths(where, path)
        if self.kind == "file" and path.is_dir():
            raise BadValue(f"{where} {value} is a folder; give a file")
        if self.kind == "file" and not path.exists():
            raise Missing(f"{where} {value} does not exist")
        if self.kind == "dir" and path.exists() and not path.is_dir():
            raise BadValue(f"{where} {value} is a file; give a folder (it is created if missing)")


def looks_local(name: str) -> bool:
    """A "source" value that reads as a path rather than a hub id ("org/name" or "name"): it starts
    like a path or has more than two parts."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def tidy(path: Path) -> str:
    """`path` normalised: relative to the current folder when it lies inside it, else absolute."""
    full = Path(os.path.normpath(Path(path).expanduser().absolute()))
    try:
        return str(full.relative_to(Path.cwd()))
    except ValueError:
        return str(full)


NAME_MAX = 255
"""Bytes of one path component on Linux's file systems (ext4, xfs, btrfs); a longer one fails every
open with ENAMETOOLONG."""


PATH_MAX = 4096
"""Bytes of a whole path Linux takes, with its terminating NUL; a longer one fails with ENAMETOOLONG."""


def check_name_lengths(where: str, path: Path) -> None:
    """Neither `path` nor a component of it is longer than the file system takes."""
    size = len(os.fsencode(str(path)))
    if size >= PATH_MAX:
        raise BadValue(f"{where}: the path is {size} bytes, over the {PATH_MAX - 1} a path may take; use a shorter one")
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            raise BadValue(
                f"{where}: the path component {part[:40]}... is {size} bytes, over the {NAME_MAX} a file name may "
                "take; use a shorter name"
            )


def check_writable(where: str, value: str) -> None:
    """The folder `value` can be created and written: its nearest existing ancestor is a writable folder."""
    path = Path(value).expanduser().absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise BadValue(f"{where} {value}: {probe} is a file, so the folder cannot be created; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BadValue(f"{where} {value} cannot be written ({probe} is not writable); choose a writable folder")


def markers(hint) -> tuple:
    """The Range / PathKind markers of an Annotated type hint (through Optional)."""
    if typing.get_origin(hint) is Annotated:
        return tuple(m for m in hint.__metadata__ if isinstance(m, (Range, PathKind)))
    for arg in typing.get_args(hint):
        if typing.get_origin(arg) is Annotated:
            return markers(arg)
    return ()


def check_fields(obj, prefix: str) -> None:
    """Every field of dataclass `obj` against its markers; nested spec dataclasses check themselves."""
    hints = typing.get_type_hints(type(obj), include_extras=True)
    for f in dataclasses.fields(obj):
        where = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(obj, f.name)
        for marker in markers(hints[f.name]):
            if isinstance(value, tuple):
                for i, item in enumerate(value):
                    marker.check(f"{where}[{i}]", item)
            else:
                marker.check(where, value)


@dataclass(frozen=True)
class Key:
    """A recipe key declared by the module that owns it (a memory switch, an evaluation task) rather
    than in its section's class body; with_keys adds it there."""

    name: str
    annotation: object
    """Its type, with its markers (Range, PathKind)."""
    default: object
    doc: str


def with_keys(keys, after: str | None = None):
    """Class decorator (under @dataclass): `keys` become fields of the class, with their types,
    defaults and descriptions, after the field `after` (None: at the end)."""

    def add(cls):
        own = dict(cls.__dict__.get("__annotations__", {}))
        assert after is None or after in own, f"{cls.__name__} has no field {after}"
        fields = {}
        for name, hint in own.items():
            fields[name] = hint
            if name == after:
                fields |= {k.name: k.annotation for k in keys}
        if after is None:
            fields |= {k.name: k.annotation for k in keys}
        cls.__annotations__ = fields
        for k in keys:
            setattr(cls, k.name, k.default)
        cls.__field_docs__ = {**cls.__dict__.get("__field_docs__", {}), **{k.name: k.doc for k in keys}}
        return cls

    return add


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass (the line after `name: type = default`), and
    those of fields a decorator added (`__field_docs__`)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = dict(cls.__dict__.get("__field_docs__", {}))
    for node, after in zip(body, body[1:] + [None], strict=True):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if (
                isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def type_name(hint) -> str:
    """A short readable name of a field's type."""
    if typing.get_origin(hint) is Annotated:
        return type_name(hint.__origin__)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(type_name(a) for a in args)
    if origin is tuple:
        return f"list of {type_name(args[0])}" if args and args[-1] is Ellipsis else f"list of {len(args)}"
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def schema_rows(cls, prefix: str = "") -> list[tuple[str, str, str, str, str]]:
    """(key, type, default, range or path kind, description) of every key of `cls`, nested
    sections flattened with dotted keys."""
    hints = typing.get_type_hints(cls, include_extras=True)
    docs = field_docs(cls)
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        hint = hints[f.name]
        inner = [a for a in (hint, *typing.get_args(hint)) if isinstance(a, type) and dataclasses.is_dataclass(a)]
        if inner:
            listed = typing.get_origin(hint) is tuple
            rows.append((key, "list of sections" if listed else "section", "", "", docs.get(f.name, "")))
            rows += schema_rows(inner[0], f"{key}[]." if listed else f"{key}.")
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "required"
        sample = 0.0 if "float" in str(hint) else 0  # the rule of the key's number type (a list's items too)
        rule = "; ".join(m.rule(sample) if isinstance(m, Range) else f"path: {m.kind}" for m in markers(hint))
        rows.append((key, type_name(hint), default, rule, docs.get(f.name, "")))
    return rows
