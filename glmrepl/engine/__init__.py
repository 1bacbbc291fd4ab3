"""The engine: checkpoints, models, devices, prompts and generation.

Nothing under this package imports prompt_toolkit; heavy libraries (torch,
transformers) are imported inside functions so that the UI starts at once.
"""
