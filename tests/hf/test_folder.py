"""A model folder's files are checked before anything loads them (hf/folder.py)."""

from __future__ import annotations

import pytest

from ringpatch.hf.folder import check_model_folder
from tests.helpers.models import build

pytestmark = pytest.mark.unit


def test_a_whole_folder_passes_and_each_damage_is_named(tmp_path):
    build("llama").save_pretrained(tmp_path)
    check_model_folder(tmp_path)
    weights = tmp_path / "model.safetensors"
    whole = weights.read_bytes()
    header = int.from_bytes(whole[:8], "little")
    for cut, words in ((4, "fewer than a safetensors header"), (100, f"announces a {header}-byte header"),
                       (8 + header + 10, f"is cut short: {8 + header + 10} bytes of the {len(whole)}")):  # fmt: skip
        weights.write_bytes(whole[:cut])
        with pytest.raises(ValueError, match=f"{weights} .*{words}"):
            check_model_folder(tmp_path)
    weights.write_bytes(whole)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a list, not the JSON object of a model config"):
        check_model_folder(tmp_path)
