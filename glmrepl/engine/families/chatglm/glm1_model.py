"""ChatGLM-6B (the first generation) as a transformers model.

transformers has no class for it, so it is written here from the published
architecture, with module names equal to the checkpoint's weight names:

* positions are two-dimensional: the first row counts tokens up to the
  ``<sop>`` that opens the reply and then stays at the ``[gMASK]`` position;
  the second row is 0 over the prompt and counts 1, 2, … from ``<sop>``.
  Each row drives rotary embeddings on one half of every attention head.
* the prompt (everything before ``<sop>``) attends to itself in both
  directions; the reply is causal.
* each block adds its normalised input, scaled by ``(2 * 28) ** 0.5``, to the
  attention and MLP outputs; the MLP is a tanh-approximated GELU. (28 is the
  released model's depth: its blocks never received the configured number of
  layers and always used that default, so any depth scales by 56 ** 0.5.)

The cache is a transformers ``DynamicCache``, so ``generate()`` streams,
stops and samples as for any model, and ``_no_split_modules`` keeps a block on
one device under accelerate device maps.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .prefix import prepend_prefix

# The released generate() replaced NaN/inf scores by a certain win for this id.
INVALID_SCORE_TOKEN = 5
_MASKED_SCORE = -10000.0  # the released code's fill value for hidden positions
_RESIDUAL_ALPHA = (2 * 28) ** 0.5  # see the module docstring


class ChatGLM1Config(PreTrainedConfig):
    model_type = "chatglm"

    vocab_size: int = 130528
    hidden_size: int = 4096
    num_hidden_layers: int = 28
    num_attention_heads: int = 32
    inner_hidden_size: int = 16384
    layernorm_epsilon: float = 1e-5
    max_sequence_length: int = 2048
    bos_token_id: int | None = 130004  # <sop>
    eos_token_id: int | list[int] | None = 130005  # <eop>
    pad_token_id: int | None = 3
    mask_token_id: int = 130000
    gmask_token_id: int = 130001
    use_cache: bool = True
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02


def glm1_position_ids(input_ids: torch.Tensor, config: ChatGLM1Config) -> torch.Tensor:
    """[batch, 2, length] positions for a whole sequence (prompt plus reply so far).

    Without a ``<sop>`` the whole sequence is prompt; without ``[gMASK]`` or
    ``[MASK]`` the reply is placed after the last prompt token.
    """
    length = input_ids.shape[1]
    steps = torch.arange(length, device=input_ids.device)
    assert config.bos_token_id is not None  # every ChatGLM-6B config names <sop>
    context_length = _first_index(input_ids.eq(config.bos_token_id), default=length)
    gmask = _first_index(input_ids.eq(config.gmask_token_id), default=-1)
    mask = _first_index(input_ids.eq(config.mask_token_id), default=-1)
    mask_position = torch.where(gmask >= 0, gmask, torch.where(mask >= 0, mask, (context_length - 1).clamp(min=0)))
    in_reply = steps[None, :] >= context_length[:, None]
    positions = torch.where(in_reply, mask_position[:, None], steps[None, :])
    block_positions = torch.where(in_reply, steps[None, :] - context_length[:, None] + 1, 0)
    return torch.stack([positions, block_positions], dim=1)


def _first_index(hits: torch.Tensor, default: int) -> torch.Tensor:
    first = hits.int().argmax(dim=-1)
    return torch.where(hits.any(dim=-1), first, torch.full_like(first, default))


def glm1_attention_mask(position_ids: torch.Tensor, past_length: int, padding_mask: torch.Tensor | None):
    """[batch, 1, new, past + new] booleans, True where a query may look.

    Prompt tokens are exactly those with block position 0 and they form a
    prefix, so the prompt's length follows from the new tokens' positions.
    """
    new_length = position_ids.shape[-1]
    queries = torch.arange(new_length, device=position_ids.device) + past_length
    keys = torch.arange(past_length + new_length, device=position_ids.device)
    context_length = past_length + (position_ids[:, 1, :] == 0).sum(dim=-1)
    causal = keys[None, None, :] <= queries[None, :, None]
    in_prompt = keys[None, None, :] < context_length[:, None, None]
    visible = causal | in_prompt
    if padding_mask is not None:
        visible = visible & padding_mask[:, None, -keys.shape[0] :].to(device=visible.device, dtype=torch.bool)
    return visible[:, None]


class GLM1Rotary(nn.Module):
    """Rotary angles for half a head. The released model rounded its
    frequencies to float16, and computed the whole table in float16 when
    running in float16; both are kept so that logits match it."""

    inv_freq: torch.Tensor  # a buffer

    def __init__(self, rotary_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
        self.register_buffer("inv_freq", inv_freq.half().float(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        table_dtype = torch.float16 if dtype == torch.float16 else torch.float32
        angles = positions.to(table_dtype)[..., None] * self.inv_freq.to(device=positions.device, dtype=table_dtype)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [batch, length, heads, dim]; cos, sin: [batch, length, dim]
    return x * cos[:, :, None, :] + _rotate_half(x) * sin[:, :, None, :]


class GLM1Attention(nn.Module):
    def __init__(self, config: ChatGLM1Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states, rotary, visible, cache: Cache | None):
        batch, length, _ = hidden_states.shape
        fused = self.query_key_value(hidden_states).view(batch, length, self.num_heads, 3 * self.head_dim)
        query, key, value = fused.split(self.head_dim, dim=-1)  # per head: q, k, v
        query, key = self._rotate(query, rotary), self._rotate(key, rotary)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        if getattr(self, "prefix_key", None) is not None:  # a P-tuning v2 prefix, see ptuning.py
            key, value, visible = prepend_prefix(self, key, value, visible)
        context = self._attend(query, key, value, visible)
        return self.dense(context.transpose(1, 2).reshape(batch, length, -1))

    @staticmethod
    def _rotate(x, rotary):
        (cos, sin), (block_cos, block_sin) = rotary
        first, second = x.chunk(2, dim=-1)
        return torch.cat((_apply_rotary(first, cos, sin), _apply_rotary(second, block_cos, block_sin)), dim=-1)

    def _attend(self, query, key, value, visible):
        # The released code divides by layer_number before the matmul and
        # multiplies back in float32, which keeps float16 scores in range.
        coeff = float(self.layer_idx + 1)
        scores = torch.matmul(query / (math.sqrt(self.head_dim) * coeff), key.transpose(-1, -2))
        scores = scores.masked_fill(~visible, _MASKED_SCORE).float() * coeff
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        return torch.matmul(probs, value)


class GLM1MLP(nn.Module):
    def __init__(self, config: ChatGLM1Config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, hidden_states):
        return self.dense_4h_to_h(nn.functional.gelu(self.dense_h_to_4h(hidden_states), approximate="tanh"))


class GLM1Block(nn.Module):
    def __init__(self, config: ChatGLM1Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = GLM1Attention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = GLM1MLP(config)
        self.alpha = _RESIDUAL_ALPHA

    def forward(self, hidden_states, rotary, visible, cache: Cache | None = None):
        attention_input = self.input_layernorm(hidden_states)
        hidden_states = attention_input * self.alpha + self.attention(attention_input, rotary, visible, cache)
        mlp_input = self.post_attention_layernorm(hidden_states)
        return mlp_input * self.alpha + self.mlp(mlp_input)


class ChatGLM1PreTrainedModel(PreTrainedModel):
    config_class = ChatGLM1Config
    config: ChatGLM1Config
    base_model_prefix = "transformer"
    _no_split_modules = ["GLM1Block"]
    supports_gradient_checkpointing = False


class ChatGLM1Model(ChatGLM1PreTrainedModel):
    def __init__(self, config: ChatGLM1Config):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([GLM1Block(config, i) for i in range(config.num_hidden_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        head_dim = config.hidden_size // config.num_attention_heads
        self.rotary = GLM1Rotary(head_dim // 2)
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def forward(
        self, input_ids=None, position_ids=None, attention_mask=None, cache=None, inputs_embeds=None, use_cache=None
    ):
        """``position_ids`` [batch, 2, new]; when absent the input is taken to be a whole
        sequence from its start. ``attention_mask`` is the usual 2D padding mask."""
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_length = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if input_ids is None or past_length:
                raise ValueError("ChatGLM-6B needs its 2D position_ids when continuing a cache or from embeddings")
            position_ids = glm1_position_ids(input_ids, self.config)
        position_ids = position_ids.to(inputs_embeds.device)
        visible = glm1_attention_mask(position_ids, past_length, attention_mask)
        dtype = inputs_embeds.dtype
        rotary = (self.rotary(position_ids[:, 0], dtype), self.rotary(position_ids[:, 1], dtype))
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, rotary, visible, cache)
        return self.final_layernorm(hidden_states), cache


class ChatGLM1ForCausalLM(ChatGLM1PreTrainedModel, GenerationMixin):
    def __init__(self, config: ChatGLM1Config):
        super().__init__(config)
        self.transformer = ChatGLM1Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value):
        self.transformer.word_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        position_ids=None,
        attention_mask=None,
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        logits_to_keep: int = 0,
        return_dict=None,
        past_key_values=None,
        **_ignored,
    ):
        cache = cache if cache is not None else past_key_values
        hidden_states, cache = self.transformer(
            input_ids, position_ids, attention_mask, cache, inputs_embeds, use_cache
        )
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = _replace_invalid_scores(self.lm_head(hidden_states))
        return CausalLMOutputWithPast(logits=logits, cache=cache)

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, **kwargs):
        # generate() keeps 1D positions; ChatGLM-6B's are recomputed from the whole sequence each step.
        kwargs.pop("position_ids", None)
        inputs = super().prepare_inputs_for_generation(input_ids, next_sequence_length=next_sequence_length, **kwargs)
        new_tokens = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
        inputs["position_ids"] = glm1_position_ids(input_ids, self.config)[..., -new_tokens.shape[1] :]
        return inputs


def _replace_invalid_scores(logits: torch.Tensor) -> torch.Tensor:
    """Where a position's scores hold NaN or inf, make INVALID_SCORE_TOKEN the
    certain choice, as the released generate() did (without a device sync)."""
    invalid = ~torch.isfinite(logits).all(dim=-1, keepdim=True)
    fallback = torch.zeros_like(logits)
    fallback[..., INVALID_SCORE_TOKEN] = 5e4
    return torch.where(invalid, fallback, logits)
