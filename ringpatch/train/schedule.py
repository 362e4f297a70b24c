"""The learning-rate schedule of a recipe: per stage, linear warm-up then cosine decay."""

from __future__ import annotations

import math


def schedule(recipe):
    """lr(step) / optim.lr for every optimizer step: per stage, linear warm-up then cosine
    decay to min_lr_ratio of the stage's peak."""
    bounds, start = [], 0
    for stage in recipe.stages:
        bounds.append((start, start + stage.steps, (stage.lr or recipe.optim.lr) / recipe.optim.lr))
        start += stage.steps

    def factor(step: int) -> float:
        first, end, peak = next((b for b in bounds if step < b[1]), bounds[-1])
        warm = recipe.optim.warmup_steps
        t = step - first
        if t < warm:
            return peak * (t + 1) / warm
        progress = min(1.0, (t - warm) / max(1, end - first - warm))
        floor = recipe.optim.min_lr_ratio
        return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))

    return factor
