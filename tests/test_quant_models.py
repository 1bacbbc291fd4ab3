"""int4 / int8 for any decoder model: the group-wise layout against plain torch, the fused
kernels against dequantized matmuls, quantized tiny Qwen2 / Llama / GPT-2 models, and the
quantized checkpoint folders ``glmrepl quantize`` writes."""

from __future__ import annotations

import json

import pytest
from rounding import activation_block, rounding_bound

# -- the group-wise layout ---------------------------------------------------------


def reference_dequantize(values, scale, group):
    """value[r, c] * scale[r, c // group], one element at a time."""
    import torch

    rows, columns = values.shape
    out = torch.empty(rows, columns)
    for r in range(rows):
        for c in range(columns):
            out[r, c] = float(values[r, c]) * float(scale[r, c // group])
    return out


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group, columns", [(32, 64), (32, 80), (64, 128), (128, 96)])  # 80, 96: a short last group
def test_group_dequantize_matches_plain_torch(bits, group, columns):
    import torch

    from glmrepl.engine.quant.layers import dequantize, quantize_weight, unpacked_values

    torch.manual_seed(group + columns)
    weight = torch.randn(5, columns)
    packed, scale = quantize_weight(weight, bits, group)
    assert scale.shape == (5, -(-columns // group)) and scale.dtype == torch.float16
    values = unpacked_values(packed, bits)
    assert values.shape == (5, columns)
    limit = 2 ** (bits - 1)
    assert int(values.min()) >= -limit and int(values.max()) <= limit - 1
    expected = reference_dequantize(values, scale.float(), group)
    assert torch.allclose(dequantize(packed, scale, bits, torch.float32, group), expected, atol=0, rtol=0)
    # Each group's step is its own: the rounding error stays within half a step of that group
    # (a whole one for int4 values clamped at +7, opposite the extreme that took -8).
    step = scale.float().abs().repeat_interleave(group, dim=1)[:, :columns]
    assert bool(((expected - weight).abs() <= step * (1.0 if bits == 4 else 0.5) + 1e-6).all())


def test_int4_group_takes_the_largest_magnitude_to_minus_eight():
    import torch

    from glmrepl.engine.quant.layers import quantize_weight, unpacked_values

    weight = torch.zeros(1, 32)
    weight[0, 3], weight[0, 7] = 0.8, -0.4  # the extreme is positive: the scale is negative
    packed, scale = quantize_weight(weight, 4, 32)
    values = unpacked_values(packed, 4)
    assert float(scale[0, 0]) == pytest.approx(-0.1, rel=1e-3)
    assert int(values[0, 3]) == -8 and int(values[0, 7]) == 4 and int(values[0, 0]) == 0


def test_int4_groups_beat_per_row_on_a_weight_with_outliers():
    import torch

    from glmrepl.engine.quant.layers import dequantize, quantize_weight

    torch.manual_seed(0)
    weight = torch.randn(256, 512) * 0.02
    weight[torch.arange(256), torch.randint(0, 512, (256,))] = 0.6  # one outlier a row
    x = torch.randn(16, 512)
    errors = {}
    for group in (0, 32, 128):
        packed, scale = quantize_weight(weight, 4, group)
        found = x @ dequantize(packed, scale, 4, torch.float32, group).T
        errors[group] = float((found - x @ weight.T).norm() / (x @ weight.T).norm())
    assert errors[32] < errors[128] < errors[0]
    assert errors[32] < errors[0] / 3


# -- the kernels -------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("shape", [(300, 4096), (33, 896), (7, 80)])  # fixed-size loops, a short last group
def test_group_kernels_match_dequantized_matmul(kernels, bits, group, shape):
    import torch
    from torch.nn import functional as F

    from glmrepl.engine.cpu import kernels as cpu_kernels
    from glmrepl.engine.quant.layers import QuantizedLinear

    torch.manual_seed(bits + group)
    layer = QuantizedLinear.from_linear(torch.nn.Linear(shape[1], shape[0], bias=True), bits, group)
    weight = layer.dequantized(torch.float32)
    for x in (torch.randn(1, 1, shape[1]), torch.randn(3, 4, shape[1])):  # one token: the kernel; more: torch
        reference = F.linear(x, weight, layer.bias)
        output = layer(x)
        assert output.shape == reference.shape and output.dtype == torch.float32
        # One token runs in the kernel, whose activations are rounded to 16 bits a group.
        bound = rounding_bound(x, weight, activation_block(group, shape[1]))
        assert ((output - reference).abs() <= bound + 1e-5 * reference.abs() + 2e-5).all()
    half = layer(torch.randn(1, 1, shape[1]).bfloat16())
    assert half.dtype == torch.bfloat16
    assert cpu_kernels.status() == "fused kernels (compiled)"  # nothing failed and fell back


def test_group_kernel_reads_the_layout_not_torchs_answer(kernels):
    """The kernel on hand-made bytes and scales (guards against both sides sharing a bug)."""
    import torch

    from glmrepl.engine.cpu import kernels as cpu_kernels

    values = torch.arange(64, dtype=torch.int8).remainder(16).sub(8).view(1, 64)  # -8..7, four times
    scale = torch.tensor([[0.5, 2.0]], dtype=torch.float16)  # columns 0-31, then 32-63
    x = torch.ones(64)
    expected = sum(float(v) * (0.5 if c < 32 else 2.0) for c, v in enumerate(values[0].tolist()))
    packed4 = (values[:, 0::2] << 4) | (values[:, 1::2] & 0x0F)
    assert float(cpu_kernels.int8_gemv(kernels, values, x, scale, 32, 1)[0]) == expected
    assert float(cpu_kernels.int4_gemv(kernels, packed4.contiguous(), x, scale, 32, 1)[0]) == expected


# -- tiny models ---------------------------------------------------------------------


def tiny_model(kind: str):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    small = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    configs = {
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **small)),
        "llama": (LlamaForCausalLM, LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **small)),
        "gpt2": (GPT2LMHeadModel, GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=128)),
    }
    model_class, config = configs[kind]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_class(config)
    return model.float().eval()


def greedy(model, steps: int = 12) -> list[int]:
    import torch

    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=steps)
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("kind", ["qwen2", "llama", "gpt2"])
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_tiny_models_generate_alike_through_kernels_and_torch(kernels, monkeypatch, kind, bits):
    import torch

    from glmrepl.engine.cpu import kernels as cpu_kernels
    from glmrepl.engine.models.quantize import quantize_model
    from glmrepl.engine.quant.layers import QuantizedLinear

    model = tiny_model(kind)
    layout = quantize_model(model, bits)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == len(layout.modules) == {"qwen2": 14, "llama": 14, "gpt2": 8}[kind]
    assert all(m.group_size == {4: 32, 8: 64}[bits] for m in layers)
    calls = {"n": 0}
    real = cpu_kernels.int4_gemv if bits == 4 else cpu_kernels.int8_gemv

    def counted(*args):
        calls["n"] += 1
        return real(*args)

    monkeypatch.setattr(cpu_kernels, f"int{bits}_gemv", counted)
    fused = greedy(model)
    assert calls["n"] > 0  # the decoding steps went through the kernel
    monkeypatch.setattr(cpu_kernels, "library", lambda: None)
    assert greedy(model) == fused
    assert torch.get_num_threads() >= 1


@pytest.mark.parametrize("kind", ["qwen2", "llama", "gpt2"])
def test_int8_stays_close_to_float_and_int4_further(kind):
    import torch

    from glmrepl.engine.models.quantize import quantize_model

    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    with torch.no_grad():
        reference = tiny_model(kind)(ids).logits
        found = {}
        for bits in (8, 4):
            model = tiny_model(kind)
            quantize_model(model, bits)
            found[bits] = float((model(ids).logits - reference).abs().max())
    spread = float(reference.abs().max())
    assert found[8] < 0.02 * spread
    assert found[8] < found[4] < 0.5 * spread


def test_embeddings_norms_and_the_head_stay_float_unless_asked():
    import torch

    from glmrepl.engine.models.quantize import quantize_model
    from glmrepl.engine.quant.layers import QuantizedLinear

    model = tiny_model("qwen2")  # a tied head
    quantize_model(model, 4)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.dtype == torch.float32
    assert not isinstance(model.lm_head, QuantizedLinear)
    assert model.model.norm.weight.dtype == torch.float32
    headed = tiny_model("qwen2")
    layout = quantize_model(headed, 4, include_head=True)
    assert layout.head and isinstance(headed.lm_head, QuantizedLinear) and "lm_head" in layout.modules
    assert headed.model.embed_tokens.weight.dtype == torch.float32 and not headed.config.tie_word_embeddings
    headed.tie_weights()  # nothing ties the float embeddings back over the quantized head
    assert headed.lm_head.weight.dtype == torch.int8


def test_quantize_refuses_bad_bits_and_other_bits_than_the_models():
    from glmrepl.engine.models.quantize import quantize_model
    from glmrepl.engine.quant.layers import QuantizeError

    model = tiny_model("llama")
    with pytest.raises(QuantizeError, match="choose 4 or 8"):
        quantize_model(model, 3)
    quantize_model(model, 8)
    with pytest.raises(QuantizeError, match="already quantized to int8"):
        quantize_model(model, 4)
    with pytest.raises(QuantizeError, match="group size 48"):
        quantize_model(tiny_model("llama"), 4, 48)


def test_manager_quantizes_a_qwen2_model_in_place(qwen_checkpoint):
    from glmrepl.engine.models.manager import LoadRequest, ModelManager

    manager = ModelManager()
    manager.load(LoadRequest(path=qwen_checkpoint, name="tiny-qwen2", mode="cpu"))
    assert manager.quantize(4).describe() == "cpu float32 int4"
    manager.load(LoadRequest(path=qwen_checkpoint, name="tiny-qwen2", mode="cpu", quantize=8))
    assert manager.current.info.placement.describe() == "cpu float32 int8"


# -- quantized checkpoint folders -------------------------------------------------------


def quantize_cli(*args: str) -> tuple[int, str, str]:
    import io

    from glmrepl.cli import tools

    out, err = io.StringIO(), io.StringIO()
    parsed = tools.build_parser().parse_args(["quantize", *args])
    code = tools.run_quantize(parsed, out, err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("source", ["qwen_checkpoint", "gpt2_checkpoint"])
def test_quantized_folder_loads_as_it_was_quantized(request, tmp_path, source):
    import torch

    from glmrepl.engine.models.loading import LoadRequest, load_model
    from glmrepl.engine.quant.layers import QuantizedLinear

    folder = request.getfixturevalue(source)
    dest = tmp_path / "int4"
    code, out, err = quantize_cli(str(folder), str(dest), "--bits", "4")
    assert code == 0 and err == "" and out.startswith(f"wrote {dest}: ") and "groups of 32 columns" in out
    config = json.loads((dest / "config.json").read_text())
    assert config["glmrepl_quantization"]["bits"] == 4 and config["glmrepl_quantization"]["group_size"] == 32
    assert (dest / "model.safetensors").exists() and not list(dest.glob("*.bin"))
    assert not list(tmp_path.glob(".int4.*"))  # the scratch folder was renamed, not left beside
    from glmrepl.cli.tools import folder_problems
    from glmrepl.engine.models.catalog import listing_dtype

    assert folder_problems(dest) == [] and listing_dtype(config, "float32") == "int4"
    saved = load_model(LoadRequest(path=dest, name="int4", mode="cpu"))
    on_load = load_model(LoadRequest(path=folder, name="float", mode="cpu", quantize=4))
    assert saved.info.placement.describe() == "cpu float32 int4"
    layers = [m for m in saved.model.modules() if isinstance(m, QuantizedLinear) and m is not saved.model.lm_head]
    assert layers and all(m.weight.dtype == torch.int8 and m.bits == 4 for m in layers)
    assert isinstance(saved.model.lm_head, QuantizedLinear) and saved.model.lm_head.bits == 8  # int8 on the CPU
    tied = source == "gpt2_checkpoint"  # its head is quantized from the stored table, read a block at a time
    assert (type(saved.model.get_input_embeddings()).__name__ == "Int8Embedding") == tied
    packed = sum(p.numel() * p.element_size() for m in layers for p in m.parameters())
    floats = sum(m.in_features * m.out_features * 4 for m in layers)
    assert packed < floats / 6  # stored packed, no float copy beside it
    ids = torch.tensor([[3, 10, 20, 30, 40]])
    with torch.no_grad():
        assert torch.equal(saved.model(ids).logits, on_load.model(ids).logits)
    assert saved.tokenizer.encode("hello there") == on_load.tokenizer.encode("hello there")


def test_quantized_folder_with_its_head_and_int8(qwen_checkpoint, tmp_path):
    import torch

    from glmrepl.engine.models.loading import LoadRequest, load_model
    from glmrepl.engine.quant.layers import QuantizedLinear, QuantizeError

    dest = tmp_path / "int8"
    code, out, _ = quantize_cli(str(qwen_checkpoint), str(dest), "--bits", "8", "--group-size", "32", "--head")
    assert code == 0 and "the head too" in out
    loaded = load_model(LoadRequest(path=dest, name="int8", mode="cpu"))
    assert isinstance(loaded.model.lm_head, QuantizedLinear) and loaded.model.lm_head.group_size == 32
    assert loaded.model.get_input_embeddings().weight.dtype == torch.float32
    with pytest.raises(QuantizeError, match="already quantized to int8: --quantize 4 needs the float"):
        load_model(LoadRequest(path=dest, name="int8", mode="cpu", quantize=4))


def test_quantize_refuses_an_existing_folder_unless_forced(qwen_checkpoint, tmp_path):
    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    code, _, err = quantize_cli(str(qwen_checkpoint), str(dest), "--bits", "8")
    assert code == 1 and err.count("\n") == 1 and "already exists" in err and "--force" in err
    assert (dest / "keep.txt").exists()
    code, _, err = quantize_cli(str(qwen_checkpoint), str(dest), "--bits", "8", "--force")
    assert code == 0 and not (dest / "keep.txt").exists() and (dest / "model.safetensors").exists()


def test_a_quantized_folder_can_be_read_by_others_as_the_umask_allows(qwen_checkpoint, tmp_path):
    import os

    old = os.umask(0o022)
    try:
        code, _, _ = quantize_cli(str(qwen_checkpoint), str(tmp_path / "shared"), "--bits", "8")
    finally:
        os.umask(old)
    assert code == 0
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o755
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "shared").iterdir()}
    assert modes and all(mode & 0o044 == 0o044 for mode in modes.values()), modes


def test_quantize_reports_an_unwritable_destination_in_one_line(qwen_checkpoint, unwritable_dir):
    code, out, err = quantize_cli(str(qwen_checkpoint), str(unwritable_dir / "int4"), "--bits", "4")
    assert code == 1 and out == "" and err.startswith("error: cannot write ") and err.count("\n") == 1


def test_quantize_reports_a_broken_source_in_one_line(qwen_checkpoint, copy_checkpoint, tmp_path):
    broken = copy_checkpoint(qwen_checkpoint, "broken")
    (broken / "config.json").unlink()
    code, _, err = quantize_cli(str(broken), str(tmp_path / "out"), "--bits", "4")
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and "config.json" in err
    assert not (tmp_path / "out").exists()
    code, _, err = quantize_cli(str(tmp_path / "missing"), str(tmp_path / "out"), "--bits", "4")
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1


def test_a_quantized_folder_missing_tensors_is_a_one_line_error(qwen_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    from glmrepl.engine.errors import CheckpointError
    from glmrepl.engine.models.loading import LoadRequest, load_model

    dest = tmp_path / "int4"
    assert quantize_cli(str(qwen_checkpoint), str(dest), "--bits", "4")[0] == 0
    state = load_file(str(dest / "model.safetensors"))
    state.pop("model.layers.1.mlp.down_proj.weight_scale")
    save_file(state, str(dest / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lack model.layers.1.mlp.down_proj.weight_scale"):
        load_model(LoadRequest(path=dest, name="int4", mode="cpu"))


def test_glmrepl_quantize_runs_from_the_command_line(qwen_checkpoint, tmp_path, capsys):
    from glmrepl.cli.main import main

    assert main(["quantize", str(qwen_checkpoint), str(tmp_path / "int8"), "--bits", "8"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'int8'}: 14 linears at int8, groups of 64")
    with pytest.raises(SystemExit):
        main(["quantize", str(qwen_checkpoint), str(tmp_path / "x"), "--bits", "3"])
    assert "invalid choice" in capsys.readouterr().err


def test_group_size_flag_goes_with_quantize():
    from glmrepl.cli.main import build_parser, load_options
    from glmrepl.repl.config import load_config

    config = load_config()
    options = load_options(build_parser().parse_args(["m", "--quantize", "4", "--group-size", "128"]), config)
    assert options.quantize == 4 and options.group_size == 128
    with pytest.raises(ValueError, match="--group-size goes with --quantize"):
        load_options(build_parser().parse_args(["m", "--group-size", "64"]), config)
