"""The engine's face: everything a front end (the REPL, the server, the command line) may use.

Front ends import from here only, never from a subpackage. Inside, each subpackage has
one concern (see its own docstring), layered from the bottom up:

    conversation  messages, prompt formats, tool calls, stop strings
    cpu           compute threads, the C++ kernels and their float linears
    quant, devices  quantized and fused layers; device modes and placement
    families      checkpoints transformers has no class for (ChatGLM)
    models        checkpoint folders, the catalog, loading, the model manager, adapters
    generation    the scheduler that owns the model, runs, batching, prefix caches, perplexity
    contract      what a front end may ask of a backend (Backend, ReplyHandle, abilities)
    backend, remote  the engine in this process, and an OpenAI-compatible server as one

A reply is asked for with a GenerateRequest (the conversation, SamplingParams, stop strings,
a FitPolicy...) and comes back as a ReplyHandle.

Nothing under this package imports prompt_toolkit or the web framework; torch and
transformers are imported inside functions, so that a front end starts at once.
"""

import os

from .backend import LocalBackend, default_kv_budget_mb
from .contract import ABILITIES, Backend, BackgroundTask, LoadProgress, ReplyHandle, record_reply
from .conversation.chat import ChatSession, read_conversation, read_json_file, save_conversation
from .conversation.tool_calls import MAX_TOOLS, TOOL_NAME_PATTERN, ToolCall, load_arguments, normalize_tools
from .cpu.machine import request_threads, threads_line, use_one_heap
from .devices.modes import DTYPES, MODES
from .devices.placement import parse_gpu_memory
from .errors import (
    ContextLengthExceeded,
    EmptyPrompt,
    GlmreplError,
    Hint,
    InvalidOutputFormat,
    InvalidTools,
    LoadCancelled,
    MaxLengthExceeded,
    NoModelLoaded,
    QueueFull,
    ToolsUnsupported,
    first_line,
)
from .families import ignored_family_override
from .generation.grammar import check_schema
from .generation.logprobs import MAX_TOP_LOGPROBS
from .generation.perplexity import read_text
from .generation.service import Reply, conversation_from_messages
from .models.catalog import LISTING_COLUMNS, default_models_dir, find_checkpoints, listing_cells, resolve_model
from .models.checkpoint import find_problems
from .models.download import download_checkpoint, manifest_problems
from .models.loading import LoadJob
from .remote.backend import RemoteBackend, ServerJob
from .request import API_FIT, REPL_FIT, FitPolicy, GenerateRequest, LoadOptions, OutputFormat, SamplingParams, Variant
from .settings import SETTINGS, Settings
from .status import GenerationStats, ModelStatus, Placement, TokenLogprob

__all__ = [
    "ABILITIES",
    "API_FIT",
    "DTYPES",
    "LISTING_COLUMNS",
    "MAX_TOOLS",
    "MAX_TOP_LOGPROBS",
    "MODES",
    "SETTINGS",
    "Backend",
    "BackgroundTask",
    "ChatSession",
    "ContextLengthExceeded",
    "EmptyPrompt",
    "FitPolicy",
    "GenerateRequest",
    "GenerationStats",
    "GlmreplError",
    "Hint",
    "InvalidOutputFormat",
    "InvalidTools",
    "LoadCancelled",
    "LoadJob",
    "LoadOptions",
    "LoadProgress",
    "LocalBackend",
    "MaxLengthExceeded",
    "ModelStatus",
    "NoModelLoaded",
    "OutputFormat",
    "Placement",
    "QueueFull",
    "REPL_FIT",
    "RemoteBackend",
    "Reply",
    "ReplyHandle",
    "SamplingParams",
    "ServerJob",
    "Settings",
    "Variant",
    "TOOL_NAME_PATTERN",
    "TokenLogprob",
    "ToolCall",
    "ToolsUnsupported",
    "conversation_from_messages",
    "default_kv_budget_mb",
    "default_models_dir",
    "download_checkpoint",
    "find_checkpoints",
    "find_problems",
    "check_schema",
    "first_line",
    "ignored_family_override",
    "listing_cells",
    "manifest_problems",
    "load_arguments",
    "normalize_tools",
    "parse_gpu_memory",
    "quantize_checkpoint",
    "read_conversation",
    "read_json_file",
    "read_text",
    "record_reply",
    "request_threads",
    "resolve_model",
    "save_conversation",
    "stay_offline",
    "threads_line",
    "use_one_heap",
]

# huggingface_hub and transformers read these once, when they are imported.
OFFLINE_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def stay_offline() -> None:
    """Offline, always: a hub lookup must fail at once, never hang or leak what is loaded.

    Called by each entry point before anything imports huggingface_hub; a value the
    user set is kept. ``glmrepl download`` lifts it for its own requests (models/download.py)."""
    for variable, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(variable, value)


def quantize_checkpoint(*args, **kwargs):
    """Write a quantized copy of a checkpoint folder (models/quantized_folder.py); torch loads here."""
    from .models.quantized_folder import quantize_checkpoint as write_quantized

    return write_quantized(*args, **kwargs)
