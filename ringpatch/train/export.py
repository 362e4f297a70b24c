"""Export a trained model as a plain Hugging Face folder.

Weights are gathered from ZeRO-3 partitions and AutoTP shards by DeepSpeed's own
consolidation (one layer at a time, onto rank 0), as its save_16bit_model does, or from FSDP2's
shards as a full state dict on rank 0's CPU in the model's dtype; config.json
carries the model's current RoPE settings and max_position_embeddings and names a stock
attention implementation, so the folder loads with AutoModelForCausalLM.from_pretrained
without ringpatch. The folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed as dist

from ringpatch.errors import BadValue


def _full_state_dict(engine, module) -> dict | None:
    """CPU copies of every weight of `module` (a submodule of the engine's) on rank 0, None elsewhere."""
    prefix = next(name for name, m in engine.module.named_modules() if m is module)
    prefix = prefix + "." if prefix else ""
    if hasattr(engine, "full_state_dict"):  # FSDP2 (train/fsdp2.py): every rank takes part
        state = engine.full_state_dict()
    elif engine.zero_optimization_stage() == 3 or engine.autotp_size() > 1:
        state = engine._consolidated_16bit_state_dict()  # every rank takes part
    else:
        state = engine.module.state_dict() if dist.get_rank() == 0 else None
    if state is None:
        return None
    return {k[len(prefix) :]: v.detach().cpu().clone() for k, v in state.items() if k.startswith(prefix)}


def export_hf(engine, out_dir: str | Path, module=None, tokenizer=None) -> None:
    """Write `module` (the Hugging Face model inside `engine`; default engine.module) to `out_dir`
    as a Hugging Face model folder, with the tokenizer when given. Every rank must call it."""
    module = engine.module if module is None else module
    state = _full_state_dict(engine, module)
    error = None
    if dist.get_rank() == 0:
        try:
            _write(module, state, Path(out_dir), tokenizer)
        except OSError as e:
            error = f"{type(e).__name__}: {e.strerror or e}"
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)  # every rank learns whether rank 0 wrote it
    if errors[0]:
        raise BadValue(
            f"the model could not be exported to {out_dir} (rank 0: {errors[0]}); the checkpoints are kept: make the "
            "folder writable (or free space), then run the same command, which resumes and exports again"
        )


def _untied(module, state: dict) -> dict:
    """`state` without the output embedding's copy when the model ties it to the input embedding:
    the consolidated copies no longer share storage, so save_pretrained would write the weight twice;
    loading ties it back (tie_word_embeddings stays in config.json)."""
    out, inp = module.get_output_embeddings(), module.get_input_embeddings()
    if out is None or inp is None or out.weight is not inp.weight:
        return state
    names = [n for n, p in module.named_parameters(remove_duplicate=False) if p is out.weight]
    kept = next(n for n, p in module.named_parameters() if p is out.weight)  # the first name, the input's
    return {k: v for k, v in state.items() if k == kept or k not in names}


def _write(module, state: dict, out_dir: Path, tokenizer) -> None:
    state = _untied(module, state)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    settings = getattr(module, "_ringpatch", None)
    saved_impl = module.config._attn_implementation
    if settings is not None:  # a stock implementation in config.json: ringpatch is not needed to load it
        module.config._attn_implementation = settings.previous_implementation or "sdpa"
    try:
        module.save_pretrained(tmp, state_dict=state)
    finally:
        module.config._attn_implementation = saved_impl
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
