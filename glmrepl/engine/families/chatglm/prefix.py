"""A P-tuning v2 prefix in front of one attention's keys and values (see ptuning.py).

Its own module: ChatGLM-6B's attention (glm1_model.py) and the SDPA hook for the
later generations (ptuning.py) both call it, and ptuning.py needs glm1_model.py.
"""

from __future__ import annotations

import torch


def prepend_prefix(module, key, value, mask):
    """Keys and values [batch, heads, length, size] with the module's prefix in front, and the
    mask (bool: True attends; float: 0 attends) widened so that every query sees the prefix."""
    batch, length = key.shape[0], module.prefix_key.shape[1]
    key = torch.cat([module.prefix_key.to(key.device, key.dtype).expand(batch, -1, -1, -1), key], dim=2)
    value = torch.cat([module.prefix_value.to(value.device, value.dtype).expand(batch, -1, -1, -1), value], dim=2)
    seen = torch.ones(*mask.shape[:-1], length, dtype=mask.dtype, device=mask.device)
    return key, value, torch.cat([seen if mask.dtype == torch.bool else seen.zero_(), mask], dim=-1)
