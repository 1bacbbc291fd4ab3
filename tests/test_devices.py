"""Device modes without GPUs: planning sharded maps for fake GPUs, auto's choice, swaps and memory."""

import pytest
import torch
from support import loaded_app

from glmrepl.engine.devices import modes as devices
from glmrepl.engine.devices.placement import (
    block_names,
    outer_module_names,
    parse_gpu_memory,
    parse_memory,
    plan_shards,
    summarize,
)
from glmrepl.engine.errors import DeviceError

MiB = 2**20


def empty_model(kind="qwen2", layers=8):
    """A real architecture on the meta device: sizes are real, no memory is used."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, GPT2Config, Qwen2Config

    if kind == "qwen2":
        config = Qwen2Config(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
            tie_word_embeddings=False,
        )
    else:
        config = GPT2Config(n_embd=256, n_layer=layers, n_head=4, vocab_size=512)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # as loading does: GPT-2's head is its token embedding
    return model


def sizes_of(model):
    from accelerate.utils import compute_module_sizes

    return compute_module_sizes(model, dtype=torch.float16)


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
@pytest.mark.parametrize("gpu_count", [2, 3, 4])
def test_plan_spreads_whole_blocks_in_order_with_outer_parts_on_the_first_gpu(kind, gpu_count):
    model = empty_model(kind)
    sizes = sizes_of(model)
    blocks = block_names(model)
    outer = outer_module_names(model, blocks)
    total = sizes[""]
    budget = int(total / gpu_count * 1.3)  # tight enough that every GPU is needed
    budgets = {index: budget for index in range(gpu_count)}
    plan = plan_shards(model, budgets, torch.float16).device_map

    assert set(plan) == set(blocks) | set(outer)  # whole blocks only: nothing inside a block is mapped
    assert all(plan[name] == 0 for name in outer)  # embeddings, final norm, head, rotary: first GPU
    block_devices = [plan[b] for b in blocks]
    assert block_devices == sorted(block_devices) and set(block_devices) == set(range(gpu_count))
    for gpu, limit in budgets.items():
        assert sum(sizes[name] for name, device in plan.items() if device == gpu) <= limit


def test_uneven_budgets_and_the_summary_line():
    model = empty_model("qwen2", layers=8)
    sizes = sizes_of(model)
    blocks = block_names(model)
    outer_bytes = sum(sizes[n] for n in outer_module_names(model, blocks))  # nothing tied in this model
    one_block = sizes[blocks[0]]
    budgets = {0: outer_bytes + 2 * one_block, 1: 6 * one_block}
    plan = plan_shards(model, budgets, torch.float16).device_map
    assert [plan[b] for b in blocks] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert summarize(model, plan) == "cuda:0 layers 0-1 + embeddings + head, cuda:1 layers 2-7"


def test_too_small_budgets_fail_with_figures_unless_offload_is_allowed():
    model = empty_model("qwen2", layers=8)
    sizes = sizes_of(model)
    blocks = block_names(model)
    outer_bytes = sum(sizes[n] for n in outer_module_names(model, blocks))
    budgets = {0: outer_bytes + sizes[blocks[0]], 1: sizes[blocks[0]]}
    with pytest.raises(DeviceError, match=r"does not fit: it needs .* MiB and the GPU budgets are GPU 0 .*--offload"):
        plan_shards(model, budgets, torch.float16)
    plan = plan_shards(model, budgets, torch.float16, offload=True)
    assert plan.offloaded_blocks == 6 and [plan.device_map[b] for b in blocks][-6:] == ["cpu"] * 6
    assert "cpu layers 2-7" in summarize(model, plan.device_map)
    with pytest.raises(DeviceError, match="embeddings and output head alone"):
        plan_shards(model, {0: outer_bytes // 2}, torch.float16)


def test_a_tied_output_head_is_budgeted_once():
    model = empty_model("gpt2", layers=2)  # GPT-2 ties lm_head to the token embeddings
    sizes = sizes_of(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    blocks = block_names(model)
    exact = sizes[""] - sum(sizes[b] for b in blocks)  # accelerate counts the tied tensor once at the top
    plan = plan_shards(model, {0: exact + 2 * sizes[blocks[0]]}, torch.float16)
    assert set(plan.device_map.values()) == {0}


def test_memory_sizes_parse_and_bad_ones_are_refused():
    assert parse_memory("20GiB") == 20 * 2**30 and parse_memory("1.5GB") == 1_500_000_000
    assert parse_memory("512 MiB") == 512 * MiB and parse_memory("1024") == 1024
    assert parse_gpu_memory("0:20GiB,1:10GiB", [0, 1]) == {0: 20 * 2**30, 1: 10 * 2**30}
    assert parse_gpu_memory("8GiB", [0, 2]) == {0: 8 * 2**30, 2: 8 * 2**30}
    for bad in ("lots", "20 parsecs", "-1GiB"):
        with pytest.raises(ValueError, match="not a memory size"):
            parse_memory(bad)


@pytest.fixture
def fake_gpus(monkeypatch):
    """Pretend the machine has GPUs with the given free memory (bytes)."""

    def install(*free):
        monkeypatch.setattr(devices, "cuda_device_count", lambda: len(free))
        monkeypatch.setattr(devices, "_gpu_dtype", lambda dtype, stored: "float16" if dtype == "auto" else dtype)
        monkeypatch.setattr(
            devices, "gpu_budgets", lambda gpus, limit: {g: int(free[g] * devices.GPU_HEADROOM) for g in gpus}
        )

    return install


def test_auto_picks_gpu_then_sharded_then_cpu_and_says_why(fake_gpus):
    fake_gpus(10 * 2**30, 10 * 2**30)
    small = devices.plan_placement("auto", needed_bytes=4 * 2**30)
    assert small.mode == "gpu" and "fits on GPU 0" in small.reason
    large = devices.plan_placement("auto", needed_bytes=15 * 2**30)
    assert large.mode == "sharded" and "needs 2 GPUs together" in large.reason
    huge = devices.plan_placement("auto", needed_bytes=40 * 2**30)
    assert huge.mode == "cpu" and huge.dtype == "float32" and "does not fit the GPUs" in huge.reason


def test_gpu_mode_errors_name_the_figures_and_the_mode_that_fits(fake_gpus):
    fake_gpus(10 * 2**30, 10 * 2**30)
    from glmrepl.repl.hints import explain

    with pytest.raises(DeviceError) as fits_sharded:
        devices.plan_placement("gpu", needed_bytes=12 * 2**30)
    assert explain(fits_sharded.value).endswith(
        "needs 12.0 GiB but GPU 0 has 9.0 GiB usable: /device sharded across all GPUs would fit"
    )
    with pytest.raises(DeviceError) as fits_nowhere:
        devices.plan_placement("gpu", needed_bytes=30 * 2**30)
    assert explain(fits_nowhere.value).endswith("use /device cpu (or sharded with offload)")
    with pytest.raises(DeviceError, match=r"GPU 3 does not exist: this machine has 2 GPU\(s\)"):
        devices.plan_placement("sharded", gpus=[0, 3])
    with pytest.raises(DeviceError, match="GPU 2 does not exist"):
        devices.plan_placement("gpu", gpu=2)


def rss():
    return devices.resident_memory_bytes()


def test_ten_model_swaps_give_the_memory_back(qwen_checkpoint, gpt2_checkpoint):
    app = loaded_app(qwen_checkpoint)
    targets = [gpt2_checkpoint, qwen_checkpoint] * 6
    for target in targets[:2]:  # warm up allocator and import caches
        app.manager.load(app.load_request(str(target)))
    after_first = rss()
    for target in targets[2:]:
        app.manager.load(app.load_request(str(target)))
        app.session.add_user("hi")
        "".join(app.plan_reply())
        app.session.undo()
    growth = rss() - after_first
    assert growth < 40 * MiB, f"RSS grew by {growth / MiB:.1f} MiB over 10 swaps"


def test_swap_unloads_first_when_both_do_not_fit_and_reloads_after_a_failure(
    qwen_checkpoint, gpt2_checkpoint, copy_checkpoint, monkeypatch
):
    from glmrepl.engine.models import manager as manager_module

    app = loaded_app(qwen_checkpoint)
    monkeypatch.setattr(manager_module, "available_bytes", lambda placement: 0)  # no room for two
    broken = copy_checkpoint(gpt2_checkpoint)
    (broken / "pytorch_model.bin").write_bytes(b"PK\x03\x04 truncated zip")
    seen_stages = []
    job = app.start_load(str(gpt2_checkpoint))
    while not job.wait(0.001):
        seen_stages.append(job.stage)
    assert app.manager.current.info.path == gpt2_checkpoint and job.error is None
    first_model = app.manager.current

    monkeypatch.setattr(manager_module, "estimated_bytes", lambda request: 1)  # passes the header check
    monkeypatch.setattr(manager_module, "available_bytes", lambda placement: 0)
    job = app.start_load(str(broken))
    job.wait()
    assert job.error is not None
    assert app.manager.current is not None and app.manager.current is not first_model  # reloaded from disk
    assert app.manager.current.info.path == gpt2_checkpoint


def test_device_without_argument_shows_mode_memory_and_layout(qwen_checkpoint):
    from glmrepl.repl.commands import TABLE

    app = loaded_app(qwen_checkpoint)
    text = TABLE.dispatch(app, "/device").text
    assert text.startswith("cpu float32")
    assert "layers: cpu: all layers" in text and "resident" in text
    from glmrepl.common.units import human_bytes

    model = app.manager.current.model
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    assert f"cpu: weights {human_bytes(weights)}; the process " in text  # the model's share, then the whole


def test_no_cuda_is_mentioned_only_when_a_gpu_was_to_be_expected(monkeypatch):
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 0)
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU-only build of torch
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    assert devices.plan_placement("auto").reason == ""
    assert devices.plan_placement("cpu").reason == ""
    for asked in ({"gpus": [0, 1]}, {"max_gpu_memory": "8GiB"}, {"gpu": 1}):
        assert devices.plan_placement("auto", **asked).reason == "no CUDA device found", asked
    monkeypatch.setattr(torch.version, "cuda", "12.4")  # built for a GPU, and none found: worth saying
    placement = devices.plan_placement("auto")
    assert (placement.mode, placement.reason) == ("cpu", "no CUDA device found")


def test_auto_with_float16_on_a_machine_without_gpus_picks_a_cpu_dtype_and_says_so(fake_gpus):
    fake_gpus()
    placement = devices.plan_placement("auto", "float16")
    assert placement.describe() == "cpu float32"
    assert "float16 is GPU-only, so float32" in placement.reason
    with pytest.raises(DeviceError, match="float16 is not supported on CPU"):
        devices.plan_placement("cpu", "float16")  # asked for the CPU by name: say it cannot
