"""A quantized model's float head in the checkpoint's 16-bit precision (half_head.py)."""

import copy

import torch
from test_decode_step import tiny

from glmrepl.engine.models.quantize import quantize_model
from glmrepl.engine.quant.half_head import StoredPrecisionHead, WideningEmbedding, keep_head_stored

IDS = torch.tensor([[5, 17, 42, 99, 7, 3]])


def stored_in_bfloat16(model):
    """The model as loaded at float32 from a bfloat16 checkpoint: every value a bfloat16 one."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.bfloat16().float())
    return model


def test_the_head_and_its_tied_embeddings_keep_16_bits_and_the_same_logits(kernels):
    model = stored_in_bfloat16(tiny("qwen2"))
    quantize_model(model, 8, 32)
    reference = copy.deepcopy(model)
    assert keep_head_stored(model, "bfloat16")
    assert type(model.lm_head) is StoredPrecisionHead and model.lm_head.weight.dtype == torch.bfloat16
    assert type(model.model.embed_tokens) is WideningEmbedding
    assert model.model.embed_tokens.weight is model.lm_head.weight  # still one tensor
    with torch.inference_mode():
        assert model.model.embed_tokens(IDS).dtype == torch.float32
        prompt, theirs = model(input_ids=IDS).logits, reference(input_ids=IDS).logits  # many rows: widened
        step = model.lm_head(torch.randn(1, 1, 64))
    assert prompt.dtype == torch.float32 and torch.allclose(prompt, theirs, atol=1e-5)
    x = torch.randn(1, 1, 64)
    with torch.inference_mode():  # one row: the kernel reading bfloat16
        assert torch.allclose(model.lm_head(x), reference.lm_head(x), atol=1e-5)
    assert step.dtype == torch.float32


def test_a_head_with_more_than_16_bits_or_an_unquantized_model_stays_float32():
    model = tiny("llama")
    assert not keep_head_stored(model, "bfloat16")  # nothing quantized: the float model is as loaded
    quantize_model(model, 4, 32)
    assert not keep_head_stored(model, "bfloat16")  # its values are float32 ones: rounding would lose them
    assert not keep_head_stored(stored_in_bfloat16(model), "float32")
    assert model.lm_head.weight.dtype == torch.float32 and type(model.lm_head) is not StoredPrecisionHead
    assert keep_head_stored(model, "bfloat16")  # untied: the embeddings are left alone
    assert model.model.embed_tokens.weight.dtype == torch.float32
