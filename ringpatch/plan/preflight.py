"""Everything checked before a process group, a model or a download starts, and the run's plan.

A bad recipe, a world that does not fit its layout, a model or data path that does not exist
(or, offline, a hub id that is not cached), heads that tp does not divide, a DeepSpeed overlay
that retypes a recipe value, data that is empty, lacks its text field or holds too few tokens,
a tokenizer larger than the model's vocabulary, a plan that does not fit the device's memory:
each fails here, on every rank alike, with the values and the fix."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import time
from pathlib import Path

import torch

from ringpatch.data.assets import made_by
from ringpatch.data.prepare import unresolved_link
from ringpatch.errors import BadValue, Missing
from ringpatch.hf.architecture import check_architecture, check_model_type, head_counts
from ringpatch.hf.folder import check_model_folder
from ringpatch.parallel import launch_int
from ringpatch.plan import switches
from ringpatch.plan.budget import Plan
from ringpatch.plan.ds_config import deepspeed_config, load_overlay
from ringpatch.plan.recipe import Recipe, load_recipe
from ringpatch.schema import check_writable, looks_local


def is_local(name: str) -> bool:
    """A local path, as opposed to a hub id ("org/name" or "name"): it exists, has more than two
    parts, starts like a path, or its "org" is a folder here (data/smollm2-135m-instruct before
    `make real-model` wrote it is a missing folder, not a hub repository of a user "data")."""
    path = Path(name)
    return looks_local(name) or path.exists() or (len(path.parts) == 2 and path.parent.is_dir())


def offline() -> bool:
    return any(
        os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _cached_hub_file(name: str, filename: str) -> str | None:
    """The local copy of a hub repository's file, if the Hugging Face cache holds it."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, filename)
    return found if isinstance(found, str) else None


def _model_config(recipe: Recipe) -> dict | None:
    spec = recipe.model
    if spec.init == "scratch":
        return dict(spec.config)
    if not is_local(spec.name):
        cached = _cached_hub_file(spec.name, "config.json")
        if cached is None and offline():
            raise Missing(
                f"model.name {spec.name} is neither a local folder nor in the Hugging Face cache, and the hub is "
                "offline (HF_HUB_OFFLINE): download it where there is network (huggingface-cli download "
                f"{spec.name}) or give a local folder"
            )
        if cached is None:  # fetched when the model loads; the recipe's model.config (if any) meanwhile
            return dict(spec.config) if spec.config else None
        path = Path(cached)
    else:
        path = Path(spec.name).expanduser() / "config.json"
        if not path.is_file():
            raise Missing(
                f"model.name {spec.name} is a local path without config.json{made_by(spec.name)}; give a folder saved with "
                "save_pretrained, or a hub id such as meta-llama/Meta-Llama-3-8B"
            )
    if is_local(spec.name):
        check_model_folder(path.parent)  # config.json parses, the weights are whole
    saved = json.loads(path.read_text())
    check_model_config(spec.config or {}, saved, str(path))
    return saved


def check_model_config(expected: dict, actual: dict, where: str) -> None:
    """The recipe's model.config (if any) must describe the model that loads."""
    rope = actual.get("rope_parameters") or {}
    found = {k: actual.get(k, rope.get(k)) for k in expected}
    differ = {k: (v, found[k]) for k, v in expected.items() if found[k] != v}
    if differ:
        raise BadValue(f"model.config disagrees with {where} (recipe, model): {differ}; fix the recipe")


def _check_sources(recipe: Recipe) -> None:
    named = [(f"data.{key}", getattr(recipe.data, key)) for key in ("source", "eval_source")]
    named += [(f"data.sources[{i}].source", m.source) for i, m in enumerate(recipe.data.sources)]
    for key, source in named:
        if source is not None and Path(source).is_symlink() and not Path(source).exists():
            raise Missing(f"{key}: {unresolved_link(source)}")
        if source is not None and is_local(source) and not Path(source).exists():
            raise Missing(
                f"{key} {source} does not exist{made_by(source)}; give a local json/jsonl/parquet/txt file or folder, "
                "or a hub dataset name (prepared with `ringpatch prepare`)"
            )


def _file_digest(path: Path) -> tuple[int, str]:
    """(size, hash of its first and last 1 MiB): equal for a copy, whatever its name."""
    size = path.stat().st_size
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            digest.update(f.read())
    return size, digest.hexdigest()


def check_held_out(recipe: Recipe) -> None:
    """data.eval_source shares no document with what training reads: not the same hub split, no
    file in both (by path), no file with a copy's content in the other."""
    from ringpatch.data.prepare import SYNTHETIC, local_files

    spec = recipe.data
    if spec.eval_source is None:
        return
    train = [(spec.source, spec.split)] if spec.source else [(m.source, m.split or spec.split) for m in spec.sources]
    held = local_files(spec.eval_source)
    for source, split in train:
        if source == SYNTHETIC:
            continue
        files = local_files(source)
        if held is None or files is None:
            if source == spec.eval_source and split == spec.eval_split:
                raise BadValue(
                    f"data.eval_source {source} (split {split!r}) is also a training source: the held-out loss and "
                    "perplexity would score documents the model trained on; give held-out documents of their own"
                )
            continue
        both = sorted({f.resolve() for f in files[1]} & {f.resolve() for f in held[1]})
        copies = {_file_digest(f): f for f in files[1]}
        same = [(f, copies[_file_digest(f)]) for f in held[1] if _file_digest(f) in copies]
        if both or same:
            what = (
                f"both read {[str(f) for f in both[:3]]}" if both else f"{same[0][0]} has the content of {same[0][1]}"
            )
            raise BadValue(
                f"data.eval_source {spec.eval_source} and the training source {source} overlap ({what}): the held-out "
                "loss and perplexity would score documents the model trained on; give held-out documents of their own"
            )


def _tokenizer(recipe: Recipe):
    """The recipe's tokenizer when it loads without network ("bytes", a folder, the HF cache);
    None when it would have to be downloaded (then the trainer loads and checks it)."""
    from ringpatch.data.tokenizer import load_tokenizer

    name = recipe.model.tokenizer or recipe.model.name
    if name != "bytes" and not is_local(name) and _cached_hub_file(name, "tokenizer_config.json") is None:
        if offline():
            raise Missing(
                f"tokenizer {name} is neither a local folder nor in the Hugging Face cache, and the hub is offline "
                "(HF_HUB_OFFLINE): download it where there is network, or set model.tokenizer to a local folder"
            )
        return None
    try:
        return load_tokenizer(recipe.model.tokenizer, recipe.model.name)
    except (OSError, ValueError) as e:  # a folder without a tokenizer, a file that is not one
        key = "model.tokenizer" if recipe.model.tokenizer is not None else "model.name"
        raise BadValue(
            f"{key} {name} holds no tokenizer transformers can load ({' '.join(str(e).split())[:200]}); give a "
            'tokenizer folder or hub id, or "bytes"'
        ) from None


def check_data(recipe: Recipe, model_config: dict | None) -> None:
    """Tokenizer against the model, and every local source against the stages: readable, not
    empty, with its text field, and enough tokens for one sequence of the longest stage. Sources
    already prepared (their fingerprint's folder is complete) are not read again."""
    from ringpatch.data.prepare import (
        MARKER,
        SYNTHETIC,
        check_split,
        check_tokens,
        local_files,
        members,
        mixed,
        prepared_folder,
        synthetic_stream,
    )

    tokenizer = _tokenizer(recipe)
    if tokenizer is None:
        return
    vocab = (model_config or {}).get("vocab_size")
    if vocab is not None and len(tokenizer) > vocab:
        raise BadValue(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}: ids from {vocab} on "
            "would index past the embedding; use the model's own tokenizer or a model.config.vocab_size >= "
            f"{len(tokenizer)}"
        )
    spec = recipe.stage_data(len(recipe.stages) - 1)  # the longest stage's mixture (stages do not shorten)
    longest = recipe.stages[-1].seq_len
    sources = [(spec.source, spec.split, "train")]
    if spec.eval_source is not None:
        sources.append((spec.eval_source, spec.eval_split, "eval"))
    for index, stage in enumerate(recipe.stages):  # each generator at its stages' lengths (cheap: no reading)
        stage_spec = recipe.stage_data(index)
        for i, m in enumerate(stage_spec.sources):
            if m.source == SYNTHETIC:
                synthetic_stream(stage_spec, i, tokenizer, stage.seq_len)
    for source, split, kind in sources:
        if mixed(spec, kind):
            if all(local_files(m.source) is None for m, _ in members(spec)):  # hub datasets: checked when prepared
                continue
        else:
            check_split(source, split, "data.split" if kind == "train" else "data.eval_split")
            if local_files(source) is None:  # a hub dataset: read (and checked) when prepared
                continue
        if Path(prepared_folder(spec, source, split, tokenizer, longest, kind), MARKER).is_file():
            continue
        check_tokens(spec, source, split, tokenizer, longest, kind)


def check_batches(recipe: Recipe, dp: int) -> None:
    """data.max_sequences holds at least one optimizer step's batch of every stage."""
    limit = recipe.data.max_sequences
    if limit is None:
        return
    for i, s in enumerate(recipe.stages):
        batch = (s.micro_batch or recipe.micro_batch) * recipe.grad_accum * dp
        if limit < batch:
            raise BadValue(
                f"data.max_sequences {limit} is fewer than one step of stages[{i}] takes (micro_batch "
                f"{s.micro_batch or recipe.micro_batch} x grad_accum {recipe.grad_accum} x dp {dp} = {batch} sequences); "
                "raise max_sequences or remove it"
            )


OVERSUBSCRIBE = "RINGPATCH_OVERSUBSCRIBE"
LAUNCH_SET = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What every launcher sets for each rank; trusted only all together."""
AGENT_ONLY = ("TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS")
"""What only torchrun's elastic agent sets, beside TORCHELASTIC_RUN_ID."""


def check_launch(cuda: bool) -> None:
    """The process was started the way its environment says: WORLD_SIZE only under a launcher, and
    on a CPU host no more ranks than cores unless RINGPATCH_OVERSUBSCRIBE=1 asks for it (a GPU launch
    config run on a CPU host starts one rank per GPU it expected, which silently changes dp; the tests
    run 4 ranks on 2 cores on purpose)."""
    env = os.environ
    world = launch_int("WORLD_SIZE", 1, minimum=1)
    if world > 1 and not all(k in env for k in ("RANK", "MASTER_ADDR", "MASTER_PORT")):
        raise BadValue(
            f"WORLD_SIZE={world} is set but no launcher started this process (RANK, MASTER_ADDR or MASTER_PORT is "
            "unset): run it under torchrun, deepspeed or accelerate launch, or unset WORLD_SIZE for one process"
        )
    given = [k for k in LAUNCH_SET if k in env]
    if given and len(given) < len(LAUNCH_SET):  # every launcher sets all of them; a shell, some
        missing = [k for k in LAUNCH_SET if k not in env]
        raise BadValue(
            f"{', '.join(f'{k}={env[k]}' for k in given)} {'is' if len(given) == 1 else 'are'} set but {missing} "
            "not: every launcher (torchrun, deepspeed, accelerate launch) sets all of them, so these were left in the "
            f"shell: unset {' '.join(given)} for one process, or start the run under a launcher"
        )
    stale = [k for k in AGENT_ONLY if k in env]
    if stale and "TORCHELASTIC_RUN_ID" not in env:
        raise BadValue(
            f"{', '.join(f'{k}={env[k]}' for k in stale)} {'is' if len(stale) == 1 else 'are'} set but torchrun's agent "
            "did not start this process (no TORCHELASTIC_RUN_ID): left in the shell, it would make this run count "
            f"itself a restart and resume; unset {' '.join(stale)}"
        )
    local = launch_int("LOCAL_WORLD_SIZE", 1, minimum=1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    oversubscribe = env.get(OVERSUBSCRIBE, "") == "1"
    if not cuda and not oversubscribe and local > cores:
        raise BadValue(
            f"{local} ranks were launched on this host, which has no GPU and {cores} CPU core(s): launch at most "
            f"{cores} (a GPU launch config, e.g. launch/accelerate/1node-8gpu.yaml, starts one rank per GPU it "
            "expects; on CPU use launch/accelerate/cpu-2proc.yaml or torchrun --nproc_per_node 2), or set "
            f"{OVERSUBSCRIBE}=1 to share the cores on purpose"
        )


def check_host(cuda: bool) -> None:
    """What the run writes besides run_dir: the Hugging Face caches; and on CPU no build lock of a
    torch extension left by a killed run (torch waits on it forever, silently)."""
    env = os.environ
    cache = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    hf_home = env.get("HF_HOME") or os.path.join(cache, "huggingface")
    try:
        check_writable("the Hugging Face cache (HF_HOME)", hf_home)
    except ValueError as e:
        raise BadValue(f"{e}; set HF_HOME to a writable folder (HOME is {env.get('HOME')!r})") from None
    if not cuda:  # DeepSpeed builds its CPU ops there on first use
        check_writable("the torch extensions folder (TORCH_EXTENSIONS_DIR)", extensions_root())
        for lock in stale_extension_locks():
            age = time.time() - lock.stat().st_mtime
            raise BadValue(
                f"{lock} was left by a build of a torch extension that was killed (it is {age / 60:.0f} minutes old, "
                "no process is building in its folder, and torch would wait on it forever): if no other run is "
                "building it now, remove it"
            )


def extensions_root() -> str:
    return os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "torch_extensions")


def _building(folder: Path) -> bool | None:
    """Whether a live process works in `folder` (a torch extension build runs ninja there, and its
    compilers name it); None where /proc cannot tell."""
    target = str(folder.resolve())
    procs = list(Path("/proc").glob("[0-9]*"))
    if not procs:
        return None
    for proc in procs:
        try:
            if os.readlink(proc / "cwd").startswith(target) or target.encode() in (proc / "cmdline").read_bytes():
                return True
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return False


def stale_extension_locks(grace_s: float = 30.0, older_than_s: float = 600.0) -> list[Path]:
    """Build locks of torch extensions (DeepSpeed's JIT ops) that no build holds: older than
    `grace_s` with no process building in their folder (a build starts ninja there at once), or
    where processes cannot be seen, older than `older_than_s` (a build takes a minute)."""
    try:
        locks = list(Path(extensions_root()).glob("*/*/lock")) + list(Path(extensions_root()).glob("*/lock"))
    except OSError:
        return []
    stale = []
    for lock in locks:
        if not lock.is_file():
            continue
        age, building = time.time() - lock.stat().st_mtime, _building(lock.parent)
        if (building is False and age > grace_s) or (building is None and age > older_than_s):
            stale.append(lock)
    return stale


def wandb_key() -> bool:
    """Whether wandb can log in without asking: WANDB_API_KEY, or a ~/.netrc entry for its host."""
    if os.environ.get("WANDB_API_KEY", "").strip():
        return True
    netrc = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def preflight(
    recipe_path: str,
    run_dir: str | None = None,
    deepspeed_file: str | None = None,
    world: int | None = None,
    deep: bool = False,
) -> Plan:
    """Load and check the recipe against the launched world; no process group, no download.
    deep: also read the tokenizer and the local data (what `ringpatch train` does)."""
    recipe = load_recipe(recipe_path)
    if run_dir is not None:
        recipe = dataclasses.replace(recipe, run_dir=run_dir)
    if recipe.data is None:
        raise BadValue(f"{recipe_path} has no data section; training needs data.source (see recipes/tiny-cpu.yaml)")
    cuda = torch.cuda.is_available()
    if world is None:
        check_launch(cuda)
    world = world if world is not None else launch_int("WORLD_SIZE", 1, minimum=1)
    dims = recipe.parallel.dims(world)
    local = launch_int("LOCAL_WORLD_SIZE", 0, minimum=1)
    if local and world > local:  # several nodes: Ulysses groups stay inside one
        dims.check_node(local)
    _check_sources(recipe)
    check_held_out(recipe)
    model_config = _model_config(recipe)
    if model_config is not None and "model_type" in model_config:
        built = check_architecture(model_config, "model.config")
        dims.check_heads(*head_counts(built))
        # the whole architecture, the config class's defaults filled in, for the plan and the simulator
        model_config = {**built.to_dict(), **model_config}
    bf16 = recipe.model.dtype == "bfloat16" or (recipe.model.dtype == "auto" and cuda)
    overlay_file = deepspeed_file or recipe.deepspeed
    if recipe.engine == "fsdp2":
        if deepspeed_file:
            raise BadValue(f"--deepspeed {deepspeed_file} with engine: fsdp2, which reads no DeepSpeed config; drop it")
        ds_config = None
    else:
        ds_config = deepspeed_config(recipe, bf16, cuda, load_overlay(overlay_file), overlay_name=str(overlay_file))
    if model_config is not None:
        switches.check_model(recipe, model_config)
        if recipe.engine == "fsdp2" and "model_type" in model_config:
            check_model_type(model_config["model_type"])
    if recipe.wandb == "online" and not wandb_key():
        raise BadValue(
            f"wandb: online in {recipe_path}, but no wandb key is set (WANDB_API_KEY, or `wandb login`, which writes "
            "~/.netrc): log in, or set wandb: offline (logs kept in run_dir/wandb, synced later with `wandb sync`) or "
            "disabled"
        )
    if recipe.wandb != "disabled" and importlib.util.find_spec("wandb") is None:
        raise BadValue(
            f"wandb: {recipe.wandb} in {recipe_path}, but wandb is not installed: pip install wandb (it comes with "
            "'ringpatch[train]'), or set wandb: disabled"
        )
    check_batches(recipe, dims.dp)
    if deep:
        check_host(cuda)
        check_writable("run_dir", recipe.run_dir)
        check_writable("data.cache_dir", recipe.data.cache_dir)
        check_data(recipe, model_config)
    return Plan(recipe, dims, cuda, bf16, ds_config, model_config)
