"""Layers that replace a model's own for speed: quantized linears, a 16-bit head, whole decoder layers fused in one call."""
