"""Checkpoints of a DeepSpeed run: complete or ignored, verified before loading, resumed exactly,
refused when they belong to another run.

Each checkpoint is its own tag folder (step000000123) with the recipe (RECIPE_FILE) and a
MANIFEST of every file's size and sha256, written after every rank's shards and before `latest`
moves (both by atomic rename). Loading verifies the manifest and falls back to the newest intact
tag; `resume_changes` compares the run's recipe with the checkpoint's by key (FIXED, FIXED_STAGE).
The save order, the resume rules and the weights-only loading: docs/design.md, "Checkpoints and
resume"; what a user sees: docs/reliability.md.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ringpatch.errors import BadValue, Diverged
from ringpatch.plan.switches import fixed_keys

RECIPE_FILE = "ringpatch_recipe.json"
MANIFEST = "ringpatch_manifest.json"

# Recipe keys (dotted) that fix the run: a checkpoint resumes only under equal values.
FIXED = (
    "model.name",
    "model.init",
    "model.config",
    "model.tokenizer",
    "model.dtype",
    "parallel.sp",
    "parallel.tp",
    "parallel.layout",
    "engine",
    "zero.stage",
    "seed",
    "micro_batch",
    "grad_accum",
    "data.source",
    "data.sources",
    "data.split",
    "data.text_field",
    "data.min_doc_tokens",
    "data.max_sequences",
    "data.document_masking",
    *fixed_keys(),  # the memory switches that change what a step computes (plan/switches)
)
# Per stage already begun: what it trains on (its length, RoPE and batch); steps and lr may change.
FIXED_STAGE = ("seq_len", "rope_theta", "rope_scaling", "micro_batch", "source_weights")


def _flat(tree, prefix: str = "") -> dict:
    """{"optim.lr": 0.1, "stages": [...], ...}: nested dicts flattened, lists kept whole."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key != "config" and key != "rope_scaling":
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value
    return out


def recipe_record(recipe, world: int) -> dict:
    """The recipe as saved beside a checkpoint (JSON types), with the world size."""
    return json.loads(json.dumps(dict(dataclasses.asdict(recipe), world=world)))


def resume_changes(saved: dict, current: dict, stage: int, step: int) -> dict[str, tuple]:
    """{key: (checkpoint's value, recipe's value)} for what may change on resume and did; raises
    ValueError naming every difference in what may not. `stage`/`step`: where the checkpoint is."""
    old, new = {"engine": "deepspeed"} | _flat(saved), _flat(current)  # checkpoints from before engine: fsdp2
    refused = {k: (old.get(k), new.get(k)) for k in (*FIXED, "world") if old.get(k) != new.get(k)}
    old_stages, new_stages = saved["stages"], current["stages"]
    for i in range(stage + 1):
        for key in FIXED_STAGE:
            a = old_stages[i].get(key) if i < len(old_stages) else None
            b = new_stages[i].get(key) if i < len(new_stages) else None
            if a != b:
                refused[f"stages[{i}].{key}"] = (a, b)
    if not refused:
        begin = sum(s["steps"] for s in new_stages[:stage])
        end = begin + (new_stages[stage]["steps"] if stage < len(new_stages) else 0)
        if not begin <= step <= end:
            refused[f"stages[{stage}].steps"] = (
                f"checkpoint at step {step} of stage {stage}",
                f"stage {stage} now spans steps {begin}..{end}",
            )
    if refused:
        detail = "; ".join(f"{k}: checkpoint {a!r}, recipe {b!r}" for k, (a, b) in refused.items())
        raise BadValue(
            f"the recipe differs from its checkpoint's in what a resumed run cannot change ({detail}); restore "
            "those values, or start a new run_dir (a stage appended after the last one is fine)"
        )
    changed = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
    if old_stages != new_stages:
        for i in range(max(len(old_stages), len(new_stages))):
            a = old_stages[i] if i < len(old_stages) else None
            b = new_stages[i] if i < len(new_stages) else None
            if a != b:
                changed[f"stages[{i}]"] = (a, b)
        changed.pop("stages", None)
    return changed


# --- files ----------------------------------------------------------------------------------
def _tags(ckpt_dir: Path) -> list[str]:
    """Tag folders, newest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step")), reverse=True)


def latest_tag(ckpt_dir: str | Path) -> str | None:
    path = Path(ckpt_dir, "latest")
    return path.read_text().strip() if path.is_file() else None


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _share(items: list, rank: int, world: int) -> list:
    return items[rank::world]


def _gather(local) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, local)
    return out


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def manifest_problem(manifest, on_disk: list[str]) -> str | None:
    """Why a manifest cannot vouch for its checkpoint (None: it can): it must be an object with an
    integer step and a non-empty `files` mapping every file of the folder to its size and sha256."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("step"), int):
        return f"its {MANIFEST} has no integer step"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return f"its {MANIFEST} lists no files"
    for name, entry in files.items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("size"), int)
            and isinstance(entry.get("sha256"), str)
            and len(entry["sha256"]) == 64
        ):
            return f"its {MANIFEST} entry for {name!r} has no size and sha256"
    unlisted = sorted(set(on_disk) - set(files))
    if unlisted:
        return f"its {MANIFEST} does not list {unlisted[:3]}"
    return None


def verify(ckpt_dir: Path, tag: str) -> str | None:
    """None when the tag is intact; otherwise why not. Collective: the files are hashed shared
    out over the ranks, and every rank returns the same answer."""
    folder = ckpt_dir / tag
    problem, manifest = None, None
    if not folder.is_dir():
        problem = "its folder does not exist"
    elif not (folder / MANIFEST).is_file():
        problem = f"it has no {MANIFEST} (its save did not complete)"
    else:
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (ValueError, OSError) as e:
            problem = f"its {MANIFEST} could not be read ({type(e).__name__})"
        else:
            problem = manifest_problem(manifest, _files(folder))
    problems = _gather(problem)
    if any(problems):
        return next(p for p in problems if p)
    local = []
    for name in _share(sorted(manifest["files"]), dist.get_rank(), dist.get_world_size()):
        want, path = manifest["files"][name], folder / name
        if not path.is_file():
            local.append(f"{name} is missing")
        elif path.stat().st_size != want["size"]:
            local.append(f"{name} has {path.stat().st_size} bytes, {want['size']} were written")
        elif _sha256(path) != want["sha256"]:
            local.append(f"{name} differs from what was written (sha256)")
    found = [p for ps in _gather(local) for p in ps]
    return "; ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "") if found else None


def _disk_full(e: BaseException, folder: Path) -> bool:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    try:
        return shutil.disk_usage(folder).free < 64 * 2**20
    except OSError:
        return False


def _dir_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _check_room(ckpt_dir: Path, previous: str | None) -> None:
    """Every rank's disk has room for another checkpoint the size of the previous one."""
    try:
        need = _dir_size(ckpt_dir / previous) if previous and (ckpt_dir / previous).is_dir() else 0
        free = shutil.disk_usage(ckpt_dir).free
    except OSError:  # the save that follows names the cause
        need, free = 0, 1
    short = [(r, f, n) for r, (f, n) in enumerate(_gather((free, need))) if f < n]
    if short:
        rank, free, need = short[0]
        raise BadValue(
            f"not enough disk space for a checkpoint in {ckpt_dir} (rank {rank}): {free / 2**30:.2f} GiB free, "
            f"the last checkpoint took {need / 2**30:.2f} GiB; free space or lower keep_last, then run the same "
            f"command to resume from {previous}"
        )


# Classes DeepSpeed 0.16-0.19 pickles into ZeRO 0-3 checkpoints (found by loading every file
# that the trainer's tests write with weights_only=True).
SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _safe_globals() -> list:
    import importlib

    found = []
    for name in SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # another DeepSpeed release: not pickled there either
            continue
    return found


def load_weights_only(engine) -> None:
    """Make `engine` read its checkpoints with torch.load(weights_only=True)."""
    allowed = _safe_globals()

    def load(path: str, map_location=None):
        with torch.serialization.safe_globals(allowed):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as e:
                raise BadValue(
                    f"checkpoint file {path} could not be loaded safely (torch.load weights_only=True): "
                    f"{str(e).splitlines()[0]}"
                ) from None

    engine.checkpoint_engine.load = load


def parameter_norm(engine) -> float:
    """The global L2 norm of the weights (ZeRO-3 shards included), the same on every rank."""
    total = torch.zeros((), dtype=torch.float64, device=engine.device)
    for p in engine.module.parameters():
        local = getattr(p, "ds_tensor", p)  # ZeRO-3: this rank's partition
        local = local.to_local() if hasattr(local, "to_local") else local  # FSDP2: this rank's shard
        if local.numel():
            total += local.detach().double().pow(2).sum()
    dist.all_reduce(total)  # replicas are counted more than once: a health check, not a metric
    return total.sqrt().item()


def save(engine, ckpt_dir: str | Path, step: int, record: dict, client_state: dict, keep_last: int = 0) -> str:
    """Write checkpoint `step` on every rank; `latest` moves to it only once it is complete and
    verified by its manifest. Returns the tag."""
    ckpt_dir, tag = Path(ckpt_dir), f"step{step:09d}"
    previous = latest_tag(ckpt_dir)
    norm = parameter_norm(engine)
    if not torch.isfinite(torch.tensor(norm)):
        raise Diverged(
            f"the weights are not finite after step {step} (norm {norm}); no checkpoint was written, and "
            f"{previous or 'no checkpoint yet'} in {ckpt_dir} stays the last good one: lower the learning rate "
            "or check the data, then run the same command to resume from it"
        )
    keep = f"{previous or 'no checkpoint'} stays the latest"
    error = None
    if dist.get_rank() == 0:
        try:
            (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
            (ckpt_dir / tag / RECIPE_FILE).write_text(json.dumps(record, indent=1))
        except OSError as e:
            error = f"{type(e).__name__}: {e.strerror or e}"
    _agree(error, f"checkpoint folder {ckpt_dir / tag} could not be written", f"{keep}: make {ckpt_dir} writable")
    _check_room(ckpt_dir, previous)
    error = None
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=dict(client_state, step=step), save_latest=False)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        error = f"{'the disk is full' if _disk_full(e, ckpt_dir) else type(e).__name__}: {str(e).splitlines()[0]}"
    _agree(
        error,
        f"checkpoint {ckpt_dir / tag} could not be written",
        f"it was removed and {keep}: free disk space, then run the same command to resume",
        remove=ckpt_dir / tag,
    )
    error, mine = None, {}
    try:
        files = _files(ckpt_dir / tag)
        mine = {name: {"size": (ckpt_dir / tag / name).stat().st_size, "sha256": _sha256(ckpt_dir / tag / name)}
                for name in _share(files, dist.get_rank(), dist.get_world_size())}  # fmt: skip
    except OSError as e:
        error = f"{type(e).__name__}: {e}"
    hashed = {k: v for part in _gather(mine) for k, v in part.items()}
    _agree(error, f"checkpoint {ckpt_dir / tag} could not be read back", f"it was removed and {keep}", ckpt_dir / tag)
    error = None
    if dist.get_rank() == 0:
        try:
            manifest = {"step": step, "parameter_norm": norm, "files": hashed}
            atomic_write(ckpt_dir / tag / MANIFEST, json.dumps(manifest, indent=1))
            atomic_write(ckpt_dir / "latest", tag)
            if keep_last:  # tags newer than this one (left by a run that fell back) will be rewritten
                for old in [t for t in _tags(ckpt_dir) if t <= tag][keep_last:]:
                    shutil.rmtree(ckpt_dir / old, ignore_errors=True)
        except OSError as e:
            error = f"{type(e).__name__}: {e.strerror or e}"
    _agree(error, f"checkpoint {ckpt_dir / tag} could not be completed", f"{keep}: make {ckpt_dir} writable")
    return tag


def _agree(error: str | None, what: str, then: str, remove: Path | None = None) -> None:
    """Every rank learns every rank's failure (an all_gather, which also keeps them in step), and
    all raise the first: no rank is left in a collective that a failed rank never enters."""
    failed = [(r, e) for r, e in enumerate(_gather(error)) if e]
    if not failed:
        return
    if remove is not None and dist.get_rank() == 0:
        shutil.rmtree(remove, ignore_errors=True)
    rank, message = failed[0]
    raise BadValue(f"{what} (rank {rank}: {message}); {then}")


def _saved_record(folder: Path) -> dict | None:
    path = folder / RECIPE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def resume(engine, ckpt_dir: str | Path, record: dict, allowed: bool = True) -> tuple[dict, dict]:
    """(client state, changed settings) to start from: the newest intact checkpoint's, or
    ({"step": 0}, {}) when there is none. With allowed=False (--no-resume) an existing
    checkpoint is an error, not a silent restart."""
    ckpt_dir = Path(ckpt_dir)
    latest = latest_tag(ckpt_dir)
    tags = _tags(ckpt_dir)
    if latest is None and not tags:
        return {"step": 0}, {}
    if not allowed:
        raise BadValue(f"{ckpt_dir} holds checkpoints and --no-resume was given; choose another run_dir")
    candidates = ([latest] if latest else []) + [t for t in tags if t != latest and (latest is None or t < latest)]
    skipped = []
    for tag in candidates:
        problem = verify(ckpt_dir, tag)
        saved = _saved_record(ckpt_dir / tag) if problem is None else None
        if problem is None and saved is None:
            problem = f"it has no {RECIPE_FILE}: it was not written by this version of ringpatch"
        if problem is not None:
            skipped.append((tag, problem))
            continue
        step = json.loads((ckpt_dir / tag / MANIFEST).read_text())["step"]
        changed = resume_changes(saved, record, _stage_of(saved, step), step)
        if dist.get_rank() == 0:
            for bad, why in skipped:
                print(f"ringpatch: skipping checkpoint {ckpt_dir / bad}: {why}")
            if skipped:
                print(f"ringpatch: resuming from {ckpt_dir / tag}, the newest intact checkpoint")
        load_weights_only(engine)
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is None:
            raise BadValue(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
        if dist.get_rank() == 0 and skipped:
            atomic_write(ckpt_dir / "latest", tag)
        return client_state, changed
    detail = "; ".join(f"{t}: {why}" for t, why in skipped)
    raise BadValue(
        f"{ckpt_dir} holds no intact checkpoint ({detail}); move the folder away to start over, or restore it"
    )


def _stage_of(saved: dict, step: int) -> int:
    """The stage the checkpoint at `step` belongs to, under the recipe that wrote it (a
    stage-end checkpoint belongs to the stage it ends)."""
    end = 0
    for i, stage in enumerate(saved["stages"]):
        end += stage["steps"]
        if step <= end:
            return i
    return len(saved["stages"]) - 1
