"""Held-out sequences for evaluation: the recipe's (or --data's) held-out documents, packed."""

from __future__ import annotations

from ringpatch.data.prepare import prepare_shared


def held_out(data_spec, tokenizer, length: int, count: int, device):
    """(input_ids, document positions or None), each (count, length): held-out packed sequences,
    with their documents kept apart when the data is trained with document masking."""
    source = data_spec.eval_source or data_spec.source
    split = data_spec.eval_split if data_spec.eval_source else data_spec.split
    data = prepare_shared(data_spec, source, split, tokenizer, length, "eval")
    rows = data[: min(count, len(data))]
    positions = rows["doc_position_ids"].to(device) if data_spec.document_masking else None
    return rows["input_ids"].to(device), positions
