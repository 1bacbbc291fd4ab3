"""Adapters on a loaded model: PEFT LoRA (any model), ChatGLM remote-layout LoRA, P-tuning v2.

The ChatGLM fixtures (tests/data/chatglm/chatglm2-{lora,ptuning,ptuning-projection}-tiny and
chatglm1-ptuning-tiny) were built and answered by the released ChatGLM2 / ChatGLM-6B code (with
peft for the LoRA); the Qwen2 LoRA is trained here with peft, and compared with peft's own PeftModel.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from chatglm_reference import DATA, as_messages, expected, load_reference, reference_logits
from rounding import INTEGER_KERNEL_ATOL

from glmrepl.engine.models.adapters import AdapterError, attach_adapter, inspect_adapter, looks_like_adapter

CHATGLM_ADAPTERS = (
    ("chatglm2", "chatglm2-lora"),
    ("chatglm2", "chatglm2-ptuning"),
    ("chatglm2", "chatglm2-ptuning-projection"),
    ("chatglm1", "chatglm1-ptuning"),
)


def adapter_dir(name: str) -> Path:
    return DATA / f"{name}-tiny"


def forward(model, input_ids) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=input_ids).logits


@pytest.fixture(scope="module")
def qwen_lora(qwen_checkpoint, tmp_path_factory) -> Path:
    """A LoRA trained for a few steps with peft on the tiny Qwen2 checkpoint."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(qwen_checkpoint, dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
    text = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 31, 64, 12]])
    for _ in range(6):
        peft_model(input_ids=text, labels=text).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = tmp_path_factory.mktemp("adapters") / "qwen-lora"
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture
def qwen_model(qwen_checkpoint):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(qwen_checkpoint, dtype=torch.float32).eval()


INPUT = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 31]])


def test_qwen_lora_equals_peft_and_comes_off(qwen_checkpoint, qwen_lora, qwen_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = forward(qwen_model, INPUT)
    adapter = attach_adapter(qwen_model, qwen_lora)
    with_adapter = forward(qwen_model, INPUT)
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(qwen_checkpoint, dtype=torch.float32), qwen_lora
    ).eval()
    assert torch.allclose(with_adapter, forward(reference, INPUT), atol=1e-6, rtol=0)
    assert (with_adapter - base).abs().max() > 1e-2
    adapter.detach()
    assert torch.equal(forward(qwen_model, INPUT), base)
    assert not any("lora" in name for name, _ in qwen_model.named_modules())


def test_merged_lora_matches_unmerged_and_cannot_come_off(qwen_lora, qwen_model):
    unmerged = attach_adapter(qwen_model, qwen_lora)
    expected_logits = forward(qwen_model, INPUT)
    unmerged.detach()
    merged = attach_adapter(qwen_model, qwen_lora, merge=True)
    assert merged.merged and not any("lora" in name for name, _ in qwen_model.named_modules())
    assert torch.allclose(forward(qwen_model, INPUT), expected_logits, atol=1e-5, rtol=0)
    with pytest.raises(AdapterError, match="merged"):
        merged.detach()


@pytest.fixture(scope="module")
def bases():
    return {family: load_reference(family) for family in ("chatglm1", "chatglm2")}


@pytest.fixture(scope="module")
def chatglm2(bases):
    return bases["chatglm2"]


@pytest.mark.parametrize("base,name", CHATGLM_ADAPTERS)
def test_chatglm_adapter_matches_reference(bases, base, name):
    """Logits within 1e-4, and the prompt and greedy ids of each case exactly; off again, the base."""
    parts = bases[base]
    adapter = attach_adapter(parts.model, adapter_dir(name))
    try:
        reference = reference_logits(name)
        assert torch.allclose(forward(parts.model, reference["input_ids"]), reference["logits"], atol=1e-4, rtol=0)
        for case in expected(name)["cases"]:
            prompt = parts.prompt_format.build(as_messages(case))
            assert prompt == case["prompt_ids"]
            with torch.inference_mode():
                output = parts.model.generate(
                    torch.tensor([prompt]),
                    do_sample=False,
                    max_new_tokens=24,
                    eos_token_id=parts.prompt_format.stop_token_ids,
                )
            assert output[0, len(prompt) :].tolist() == case["greedy_ids"]
    finally:
        adapter.detach()
    base_logits = reference_logits(base)
    assert torch.allclose(forward(parts.model, base_logits["input_ids"]), base_logits["logits"], atol=1e-4, rtol=0)


def test_remote_layout_lora_is_split_onto_q_k_v(chatglm2):
    adapter = attach_adapter(chatglm2.model, adapter_dir("chatglm2-lora"))
    try:
        attention = chatglm2.model.model.layers[0].self_attn
        wrapped = {
            name for name in ("q_proj", "k_proj", "v_proj", "o_proj") if hasattr(getattr(attention, name), "lora_A")
        }
        assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj"}
        assert torch.equal(attention.q_proj.lora_A["default"].weight, attention.v_proj.lora_A["default"].weight)
    finally:
        adapter.detach()


def dequantized_copy(quantized_model):
    """The same model with every quantized linear replaced by a float one of its dequantized weight."""
    import copy

    from glmrepl.engine.quant.layers import QuantizedLinear

    model = copy.deepcopy(quantized_model)
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.data = module.dequantized(torch.float32)
            if module.bias is not None:
                linear.bias.data = module.bias.data.float()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model


@pytest.mark.parametrize("name", ["chatglm2-lora", "chatglm2-ptuning"])
def test_adapters_on_int4_layers(name):
    """LoRA stays unmerged beside the int4 layers; both kinds give what the same adapter gives on the
    dequantized float model."""
    from glmrepl.engine.quant.layers import QuantizedLinear

    quantized = load_reference("chatglm2-int4").model
    float_twin = dequantized_copy(quantized)
    input_ids = reference_logits("chatglm2")["input_ids"]
    attach_adapter(quantized, adapter_dir(name))
    attach_adapter(float_twin, adapter_dir(name))
    if name.endswith("lora"):
        assert isinstance(quantized.model.layers[0].self_attn.q_proj.base_layer, QuantizedLinear)
    expected = forward(float_twin, input_ids)
    assert torch.allclose(forward(quantized, input_ids), expected, atol=INTEGER_KERNEL_ATOL, rtol=0)


def test_merge_refused_on_quantized_layers():
    model = load_reference("chatglm2-int4").model
    with pytest.raises(AdapterError, match="--merge-adapter needs float layers"):
        attach_adapter(model, adapter_dir("chatglm2-lora"), merge=True)
    assert not any("lora" in name for name, _ in model.named_modules())


def test_inspect_names_kind_and_base(qwen_lora):
    lora = inspect_adapter(adapter_dir("chatglm2-lora"))
    assert (lora.kind, lora.base) == ("lora", "THUDM/chatglm2-6b")
    assert "r=4" in lora.detail and "query_key_value" in lora.detail
    prefix = inspect_adapter(adapter_dir("chatglm2-ptuning-projection"))
    assert (prefix.kind, prefix.base) == ("ptuning", "THUDM/chatglm2-6b")
    assert prefix.detail == "P-tuning v2, 3 prefix tokens, with projection"
    assert looks_like_adapter(qwen_lora) and looks_like_adapter(adapter_dir("chatglm2-ptuning"))
    assert not looks_like_adapter(DATA / "chatglm2-tiny")


# -- bad input: one line, and the model as it was ---------------------------------------


def broken_copy(tmp_path, name: str, change) -> Path:
    folder = Path(shutil.copytree(adapter_dir(name), tmp_path / name))
    change(folder)
    return folder


def edit_json(file: Path, **changes) -> None:
    file.write_text(json.dumps({**json.loads(file.read_text(encoding="utf-8")), **changes}), encoding="utf-8")


BAD_ADAPTERS = {
    "missing weights": ("chatglm2-lora", lambda f: (f / "adapter_model.bin").unlink(), "adapter weights missing"),
    "corrupt weights": (
        "chatglm2-lora",
        lambda f: (f / "adapter_model.bin").write_bytes(b"\x80\x02not a pickle"),
        "adapter_model.bin cannot be read",
    ),
    "corrupt config": (
        "chatglm2-lora",
        lambda f: (f / "adapter_config.json").write_text('{"r": 4,'),
        "adapter_config.json is not valid JSON",
    ),
    "other peft type": (
        "chatglm2-lora",
        lambda f: edit_json(f / "adapter_config.json", peft_type="PREFIX_TUNING"),
        "LoRA adapters only",
    ),
    "ptuning of another generation": (
        "chatglm2-ptuning",
        lambda f: edit_json(f / "config.json", position_encoding_2d=True),
        "a ChatGLM-6B P-tuning prefix; the loaded model is GlmForCausalLM",
    ),
    "ptuning for a bigger model": (
        "chatglm2-ptuning",
        lambda f: edit_json(f / "config.json", num_layers=28),
        "another model size: layers 28 .loaded model: 2.",
    ),
}


@pytest.mark.parametrize("case", BAD_ADAPTERS)
def test_bad_adapter_is_one_line_and_changes_nothing(chatglm2, tmp_path, case):
    name, change, message = BAD_ADAPTERS[case]
    folder = broken_copy(tmp_path, name, change)
    base = reference_logits("chatglm2")
    with pytest.raises(AdapterError, match=message) as error:
        attach_adapter(chatglm2.model, folder)
    assert "\n" not in str(error.value)
    assert chatglm2.model.config._attn_implementation == "sdpa"
    assert torch.allclose(forward(chatglm2.model, base["input_ids"]), base["logits"], atol=1e-4, rtol=0)


def test_lora_for_another_architecture(chatglm2, qwen_lora, qwen_model):
    with pytest.raises(AdapterError, match="model.layers.0.mlp.gate_proj, which the loaded GlmForCausalLM"):
        attach_adapter(chatglm2.model, qwen_lora)
    with pytest.raises(AdapterError, match="trained on ChatGLM2/3 or GLM-4 .* the loaded model is Qwen2ForCausalLM"):
        attach_adapter(qwen_model, adapter_dir("chatglm2-lora"))
    with pytest.raises(AdapterError, match="P-tuning prefix; the loaded model is Qwen2ForCausalLM"):
        attach_adapter(qwen_model, adapter_dir("chatglm2-ptuning"))
    assert not any("lora" in name for name, _ in chatglm2.model.named_modules())
    assert not any("lora" in name for name, _ in qwen_model.named_modules())


def test_lora_for_another_model_size(chatglm2, tmp_path):
    """A remote-layout LoRA whose fused query_key_value is wider than the loaded model's."""
    from safetensors.torch import save_file

    from glmrepl.engine.models.adapters import read_adapter_tensors

    folder = Path(shutil.copytree(adapter_dir("chatglm2-lora"), tmp_path / "wider"))
    state = read_adapter_tensors(folder / "adapter_model.bin")
    key = "base_model.model.transformer.encoder.layers.0.self_attention.query_key_value.lora_B.weight"
    state[key] = torch.zeros(state[key].shape[0] + 32, state[key].shape[1])
    (folder / "adapter_model.bin").unlink()
    save_file(state, folder / "adapter_model.safetensors")
    with pytest.raises(
        AdapterError, match="query_key_value.lora_B.weight has 160 rows, the loaded model's query_key_value 128"
    ):
        attach_adapter(chatglm2.model, folder)


def test_prefix_of_the_other_generation(bases):
    with pytest.raises(AdapterError, match="a ChatGLM2/3 P-tuning prefix; the loaded model is ChatGLM1ForCausalLM"):
        attach_adapter(bases["chatglm1"].model, adapter_dir("chatglm2-ptuning"))
    with pytest.raises(AdapterError, match="a ChatGLM-6B P-tuning prefix; the loaded model is GlmForCausalLM"):
        attach_adapter(bases["chatglm2"].model, adapter_dir("chatglm1-ptuning"))


def test_prefix_cannot_be_merged(chatglm2):
    with pytest.raises(AdapterError, match="no weights to merge"):
        attach_adapter(chatglm2.model, adapter_dir("chatglm2-ptuning"), merge=True)


def test_not_an_adapter_folder():
    with pytest.raises(AdapterError, match="is not an adapter folder"):
        inspect_adapter(DATA / "chatglm2-tiny")


# -- remote-layout LoRA on GLM-4 and ChatGLM-6B, against the adapter merged by hand ----------

REMOTE_LINEARS = {
    "glm4": (
        "transformer.encoder.layers.{}.self_attention.query_key_value",
        "transformer.encoder.layers.{}.mlp.dense_4h_to_h",
    ),
    "chatglm1": ("transformer.layers.{}.attention.query_key_value", "transformer.layers.{}.mlp.dense_h_to_4h"),
}


def write_remote_lora_and_merged_twin(family: str, tmp_path: Path) -> tuple[Path, Path]:
    """A random LoRA on the remote-code layout (peft's file format), and a copy of the checkpoint
    with ``W + alpha/r * B @ A`` written into its weights: loading the copy is the expected result,
    computed without glmrepl's adapter code."""
    from safetensors.torch import load_file, save_file

    source = DATA / f"{family}-tiny"
    twin = Path(shutil.copytree(source, tmp_path / f"{family}-merged"))
    weights_file = next(f for f in ("model.safetensors", "pytorch_model.bin") if (source / f).is_file())
    weights = (
        load_file(source / weights_file)
        if weights_file.endswith("safetensors")
        else torch.load(source / weights_file, weights_only=True)
    )
    r, alpha, generator, lora = 2, 4, torch.Generator().manual_seed(7), {}
    for layer in range(2):
        for pattern in REMOTE_LINEARS[family]:
            name = pattern.format(layer)
            out_features, in_features = weights[f"{name}.weight"].shape
            a = torch.randn(r, in_features, generator=generator) * 0.3
            b = torch.randn(out_features, r, generator=generator) * 0.3
            lora[f"base_model.model.{name}.lora_A.weight"], lora[f"base_model.model.{name}.lora_B.weight"] = a, b
            weights[f"{name}.weight"] = weights[f"{name}.weight"] + alpha / r * b @ a
    if weights_file.endswith("safetensors"):
        save_file(weights, twin / weights_file)
    else:
        torch.save(weights, twin / weights_file)
    adapter = tmp_path / f"{family}-lora"
    adapter.mkdir()
    save_file(lora, adapter / "adapter_model.safetensors")
    targets = sorted({pattern.rsplit(".", 1)[-1] for pattern in REMOTE_LINEARS[family]})
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": r,
                "lora_alpha": alpha,
                "lora_dropout": 0.0,
                "target_modules": targets,
                "base_model_name_or_path": f"THUDM/{family}",
            }
        ),
        encoding="utf-8",
    )
    return adapter, twin


@pytest.mark.parametrize("family", ["glm4", "chatglm1"])
def test_remote_layout_lora_equals_merged_weights(tmp_path, family):
    adapter, twin = write_remote_lora_and_merged_twin(family, tmp_path)
    input_ids = reference_logits(family)["input_ids"]
    model = load_reference(family).model
    base = forward(model, input_ids)
    attach_adapter(model, adapter)
    with_adapter = forward(model, input_ids)
    assert (with_adapter - base).abs().max() > 1e-2
    assert torch.allclose(with_adapter, forward(load_reference(twin).model, input_ids), atol=1e-4, rtol=0)
