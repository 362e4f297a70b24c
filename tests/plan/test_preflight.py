"""Bad recipes and launches are refused before any process group or download, with the values."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from ringpatch.plan.preflight import preflight
from tests.helpers import HANG_S
from tests.helpers.trainrun import ROOT, recipe

pytestmark = pytest.mark.unit


@pytest.fixture
def data(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "eval.jsonl").write_text('{"text": "held out"}\n')
    return tmp_path


def _check(tmp_path, data, error, match, world=2, **changes):
    with pytest.raises(error, match=match):
        preflight(str(recipe(tmp_path, data, **changes)), world=world)


def test_a_good_recipe_gives_its_plan(tmp_path, data):
    plan = preflight(str(recipe(tmp_path, data, parallel__sp=2)), world=4)
    assert (plan.dims.dp, plan.dims.sp, plan.dims.tp) == (2, 2, 1) and not plan.bf16
    assert plan.ds_config["optimizer"]["params"]["lr"] == 0.003 and plan.ds_config["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize(
    "error, match, world, changes",
    [
        (ValueError, r"recipe-0.yaml: unknown keys \['batch'\]; valid keys are \[.*'micro_batch'", 2, {"batch": 4}),
        (TypeError, r"recipe-0.yaml.micro_batch must be int, got str 'two'", 2, {"micro_batch": "two"}),
        (ValueError, r"world size 3 is not divisible by sp\*tp = 2\*1 = 2", 3, {"parallel__sp": 2}),
        (ValueError, r"attention heads 4 are not divisible by tp=3; choose tp among \[1, 2\]", 3, {"parallel__tp": 3}),
        (ValueError, r"stages\[1\].seq_len 130 is not divisible by the zigzag layout's 4 chunks \(sp=2\); use 132", 2,
         {"parallel__sp": 2, "parallel__layout": "zigzag", "stages__1__seq_len": 130}),
        (ValueError, r"AutoTP training does not combine with ZeRO-3", 2, {"parallel__tp": 2, "zero__stage": 3}),
        (FileNotFoundError, r"model.name /\S+/no/such/model is a local path without config.json", 2,
         {"model": {"name": "./no/such/model"}}),
        (FileNotFoundError, r"data.source /no/such/train.jsonl does not exist", 2, {"data__source": "/no/such/train.jsonl"}),
        (ValueError, r"data: unknown keys \['positions'\]; valid keys are .*'document_masking'", 2,
         {"data__positions": "documents"}),
        (ValueError, r"eval.passkey_depths must be one or more fractions in \[0, 1\], got \[0.5, 1.5\]", 2, {"eval__passkey_depths": [0.5, 1.5]}),
        (ValueError, r"model.init: scratch needs model.config with a model_type", 2, {"model__config": None}),
    ],
)  # fmt: skip
def test_bad_recipes(tmp_path, data, error, match, world, changes):
    _check(tmp_path, data, error, match, world, **changes)


def test_model_config_must_match_a_local_model(tmp_path, data):
    folder = tmp_path / "model"
    folder.mkdir()
    config = yaml.safe_load(recipe(tmp_path, data).read_text())["model"]["config"]
    (folder / "config.json").write_text(json.dumps(dict(config, num_attention_heads=8)))
    _check(
        tmp_path,
        data,
        ValueError,
        r"model.config disagrees with .*config.json \(recipe, model\): "
        r"\{'num_attention_heads': \(4, 8\)\}; fix the recipe",
        model__name=str(folder),
        model__init="pretrained",
    )


@pytest.mark.parametrize(
    "overlay, match",
    [
        ({"gradient_accumulation_steps": 8}, r'gradient_accumulation_steps = 8 in .*, but the recipe owns it \(it gives 1\); write "auto"'),
        ({"zero_optimization": {"stage3_prefetch_bucket_size": 1}}, r"tunes ZeRO-3 \(\['stage3_prefetch_bucket_size'\]\) but the recipe says zero.stage 2"),
        ({"zero_optimization": {"offload_optimizer": {"device": "auto"}}}, r'zero_optimization.offload_optimizer is "auto" in .* but the recipe sets no value'),
    ],
)  # fmt: skip
def test_deepspeed_overlay_never_retypes_a_recipe_value(tmp_path, data, overlay, match):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(overlay))
    _check(tmp_path, data, ValueError, match, deepspeed=str(path))


def test_shipped_overlays_merge_with_their_stage(tmp_path, data):
    for name, stage, offload in [
        ("zero1", 1, "none"),
        ("zero2", 2, "none"),
        ("zero3", 3, "none"),
        ("zero3-offload", 3, "cpu"),
    ]:
        path = ROOT / "launch" / "deepspeed" / f"{name}.json"
        plan = preflight(
            str(recipe(tmp_path, data, zero={"stage": stage, "offload": offload}, deepspeed=str(path))), world=2
        )
        zero = plan.ds_config["zero_optimization"]
        assert zero["stage"] == stage and plan.ds_config["train_micro_batch_size_per_gpu"] == 2
        assert ("offload_optimizer" in zero) == (offload == "cpu")
        assert "auto" not in json.dumps(plan.ds_config)


@pytest.mark.e2e
def test_the_command_line_reports_without_a_traceback(tmp_path, data):
    path = recipe(tmp_path, data, parallel__sp=2)
    proc = subprocess.run(
        [sys.executable, "-m", "ringpatch.train", "--recipe", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=HANG_S,
        env={
            "WORLD_SIZE": "3",
            "RANK": "0",
            "LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500",
            "PATH": "/usr/bin:/bin",
        },
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "ringpatch train: world size 3 is not divisible by sp*tp = 2*1 = 2" in proc.stderr


def test_shipped_recipes_validate_and_plan(tmp_path):
    """The cluster recipes load, fit the cluster their comments name (the step's tensors, DeepSpeed's
    buffers and the reserve, at most 68 of 80 GiB per GPU), and their RoPE bases follow the NTK rule."""
    from ringpatch.hf.rope import ntk_rope_theta
    from ringpatch.plan.budget import describe, on_device, stage_budget

    for name, world in [
        ("llama3-8b-1m", 32),
        ("mistral-7b-512k", 16),
        ("llama3-8b-256k-1node", 8),
        ("llama3-8b-1m-1node", 8),
        ("llama3-8b-1m-1node-fsdp2", 8),
        ("llama3-8b-4m", 32),
    ]:
        path = ROOT / "recipes" / f"{name}.yaml"
        plan = on_device(preflight(str(path), world=world), "cuda")
        r, cfg = plan.recipe, plan.model_config
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        base, trained = cfg["rope_theta"], cfg["max_position_embeddings"]
        for i, stage in enumerate(r.stages):
            assert stage.rope_theta == pytest.approx(ntk_rope_theta(base, trained, stage.seq_len, head_dim), rel=1e-4)
            found = stage_budget(plan, i)
            assert found.total <= 68.0, (name, stage.seq_len, found.total)
            assert found.host * 8 <= 300, (name, stage.seq_len, found.host)  # offloaded activations per node
        assert "tokens/GPU" in describe(plan)
    tiny = yaml.safe_load((ROOT / "recipes" / "tiny-cpu.yaml").read_text())
    assert tiny["parallel"]["sp"] == 2


def test_the_planner_finds_1m_on_one_node_and_4m_on_four():
    """--max-context: the longest sequence whose planned tensors and reserve fit 68 of 80 GiB per
    GPU, with the offloaded activations within 1536 GiB of host memory per node."""
    from ringpatch.plan.budget import budget, max_context, on_device

    for name, world, at_least in [("llama3-8b-1m-1node", 8, 2**20), ("llama3-8b-4m", 32, 4 * 2**20)]:
        plan = on_device(preflight(str(ROOT / "recipes" / f"{name}.yaml"), world=world), "cuda")
        seq_len, found = max_context(plan, 68.0, 1536 / 8)
        assert seq_len >= at_least and found.total <= 68.0, (name, seq_len)
        assert seq_len % plan.dims.seq_len_divisor == 0
        longer = budget(plan, seq_len + plan.dims.seq_len_divisor, 1)
        assert longer.total > 68.0 or longer.host > 1536 / 8  # the next length does not fit
    # without offload and tiles, one node stops short of 1M (the reason for the switches)
    import dataclasses

    plan = on_device(preflight(str(ROOT / "recipes" / "llama3-8b-1m-1node.yaml"), world=8), "cuda")
    bare = dataclasses.replace(plan, recipe=dataclasses.replace(plan.recipe, activation_offload=False, mlp_tiles=1))
    assert max_context(bare, 68.0)[0] < 2**20


def test_plan_for_cpu_processes(capsys, demo_corpus):
    """`ringpatch plan --device cpu` plans what the trainer checks on a CPU run: dtype auto is
    float32 there, the CPU kernel, each process's runtime as its reserve, and the gradient buffers
    as the layers' backward writes them (after the loss chunk's backward, the peak of a CPU step);
    --simulate runs the CPU kernel's calls."""
    from ringpatch.cli import main
    from ringpatch.plan.budget import on_device, stage_budget
    from ringpatch.plan.items import Item
    from ringpatch.plan.reserve import CPU_RUNTIME_GIB

    recipe = str(ROOT / "recipes" / "tiny-cpu.yaml")
    assert main(["plan", "--recipe", recipe, "--nodes", "1", "--gpus-per-node", "2", "--device", "cpu",
                 "--simulate"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    plan = on_device(preflight(recipe, world=2), "cpu")
    found = stage_budget(plan, 0)
    assert not plan.cuda and not plan.bf16
    assert found.reserve == {"process runtime (CPU)": CPU_RUNTIME_GIB}
    assert Item.GRADIENTS_AS_MADE in found.items and Item.ZERO_BUCKETS_AS_FILLED in found.items
    assert Item.GRADIENTS not in found.items and Item.ZERO_BUCKETS not in found.items
    assert "GiB/process planned + reserve" in out and f"= {found.total:.1f}" in out and "fp32" in out
    assert "the CPU kernel's calls on fake tensors" in out and "sequence-parallel traffic" not in out
    gpu = stage_budget(on_device(preflight(recipe, world=2), "cuda"), 0)
    assert Item.GRADIENTS in gpu.items and "CUDA context and workspaces" in gpu.reserve


def test_max_context_names_what_stops_the_next_length():
    """--max-context says whether the GPU's memory or the host's (offloaded activations) stops the
    first length past the longest that fits, with the figures; and the largest attention kernel
    call against the 2^31-element index edge (one head group's queries: Ulysses alone reaches the
    edge, bench/alst.py). The offloaded inputs take exactly their bytes of host memory, so one node
    of 79 GiB GPUs reaches past 5M tokens (the GPU binds there, not the host)."""
    from ringpatch.plan.budget import describe_max_context, max_context, on_device

    plan = on_device(preflight(str(ROOT / "recipes" / "llama3-8b-1m-1node.yaml"), world=8), "cuda")
    host_bound = describe_max_context(plan, 79.0, 8, 768.0)
    assert "3,145,728 tokens" in host_bound  # 96 GiB / (32 layers x 4096 hidden x 2 bytes) per GPU, x 8
    assert (
        "the next length is stopped by host memory for offloaded activations (96.002 GiB per GPU, of the 96.000"
        in host_bound
    )
    # 393,216 tokens a rank x 4 query heads of 128 for each of the 8 K/V heads, one head group a call
    assert "the largest attention kernel call takes 201,326,592 elements, under the 2^31" in host_bound
    gpu_bound = describe_max_context(plan, 40.0, 8, 1536.0)
    assert "the next length is stopped by GPU memory (" in gpu_bound and "of 40)" in gpu_bound
    seq_len, found = max_context(plan, 79.0, 1536 / 8)
    assert seq_len >= 5 * 10**6 and found.host * 8 <= 1536
    longest = describe_max_context(plan, 79.0, 8, 1536.0)
    assert "elements, under the 2^31" in longest and "index edge" not in longest


def test_a_stage_past_the_index_edge_is_refused_before_launch(tmp_path, capsys):
    """On GPUs, a stage whose attention kernel calls would reach 2^31 elements is refused before
    anything starts, with the longest length under the edge and the fix (Ulysses 8 alone: a rank
    holds the whole sequence with 4 of Llama-3-8B's 32 heads); its own ring is far from it; CPU
    processes index in 64 bits."""
    import yaml

    from ringpatch.plan.budget import on_device
    from ringpatch.plan.check import check_index_edge

    recipe = yaml.safe_load((ROOT / "recipes" / "llama3-8b-1m-1node.yaml").read_text())
    recipe["parallel"] = {"sp": 8, "ulysses": 8, "layout": "contiguous"}
    recipe.pop("deepspeed")
    for seq_len, refused in ((4_194_296, False), (4_194_304, True)):
        recipe["stages"] = [{"seq_len": 65536, "steps": 1}, {"seq_len": seq_len, "steps": 1}]
        path = tmp_path / "ulysses.yaml"
        path.write_text(yaml.safe_dump(recipe))
        plan = on_device(preflight(str(path), world=8), "cuda")
        check_index_edge(on_device(plan, "cpu"))
        if not refused:
            check_index_edge(plan)
            continue
        with pytest.raises(ValueError, match=r"^stages\[1\] \(seq_len 4,194,304, micro_batch 1\) under parallel.sp 8 "
                                             r"\(ulysses 8\): one attention kernel call would take 2,147,483,648 elements, "
                                             r".* at most 4,194,296 tokens fit under it: raise parallel.sp"):  # fmt: skip
            check_index_edge(plan)
        from ringpatch.cli import main

        assert main(["plan", "--recipe", str(path), "--nodes", "1", "--gpu-memory", "1000"]) == 2  # not memory
        assert "ringpatch plan: stages[1] (seq_len 4,194,304, micro_batch 1)" in capsys.readouterr().err
    shipped = on_device(preflight(str(ROOT / "recipes" / "llama3-8b-4m.yaml"), world=32), "cuda")
    check_index_edge(shipped)
