"""glmrepl: terminal chat for local Hugging Face checkpoints."""

__version__ = "0.1.0"
