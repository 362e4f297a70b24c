"""Export a trained DeepSpeed model as a plain Hugging Face folder.

Weights are gathered from ZeRO-3 partitions when needed; config.json carries the model's
current RoPE settings and max_position_embeddings and names a stock attention
implementation, so the folder loads with AutoModelForCausalLM.from_pretrained without
ringpatch. The folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed as dist


def _full_state_dict(module, zero_stage: int) -> dict | None:
    """CPU copies of every weight on rank 0 (None elsewhere)."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = (
                {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if dist.get_rank() == 0 else None
            )
        return state
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if dist.get_rank() == 0 else None


def export_hf(module, out_dir: str | Path, zero_stage: int, tp: int = 1) -> None:
    """Write `module` (the engine's model) to `out_dir` as a Hugging Face model folder."""
    if tp > 1:
        raise NotImplementedError(
            f"export with tensor parallelism (tp={tp}) needs the AutoTP shards merged; not supported yet: "
            "export from a tp=1 checkpoint"
        )
    state = _full_state_dict(module, zero_stage)
    if dist.get_rank() == 0:
        out_dir = Path(out_dir)
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
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    dist.barrier()
