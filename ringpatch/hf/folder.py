"""A model folder's files, checked before anything loads them (the trainer's preflight and
`ringpatch eval`): config.json parses, and every safetensors file is whole.

A copy cut short (a full disk, an interrupted rsync) or a hand-edited config otherwise fails deep
inside from_pretrained, after the process group started, as a traceback. A safetensors file is an
8-byte little-endian header length, a JSON header naming each tensor's byte range, then the data:
the header parses and the file is at least as long as the last range ends.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ringpatch.errors import BadValue

HEADER_LIMIT = 100 * 2**20
"""safetensors refuses headers over 100 MB; a larger length read from a file means it is no safetensors."""


def _damaged(path: Path, why: str) -> BadValue:
    return BadValue(f"{path} {why}: the model folder is damaged; copy or save it again")


def check_safetensors(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _damaged(path, f"has {size} bytes, fewer than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > HEADER_LIMIT or 8 + length > size:
            raise _damaged(path, f"has {size} bytes but announces a {length}-byte header")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise _damaged(path, "has a header that is not JSON") from None
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    needed = 8 + length + max(ends, default=0)
    if size < needed:
        raise _damaged(path, f"is cut short: {size} bytes of the {needed} its header describes")


def check_model_folder(folder) -> None:
    """config.json parses as a JSON object and every *.safetensors file is whole; a ValueError
    naming the file otherwise. Other weight formats are left to transformers."""
    folder = Path(folder)
    config = folder / "config.json"
    try:
        parsed = json.loads(config.read_text())
    except ValueError as e:
        raise BadValue(f"{config} is not valid JSON ({e}); fix or restore it") from None
    if not isinstance(parsed, dict):
        raise BadValue(f"{config} holds a {type(parsed).__name__}, not the JSON object of a model config")
    for weights in sorted(folder.glob("*.safetensors")):
        check_safetensors(weights)
