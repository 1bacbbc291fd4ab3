"""The engine: checkpoints, models, devices, prompts and generation.

Nothing under this package imports prompt_toolkit; heavy libraries (torch,
transformers) are imported inside functions so that the UI starts at once.
"""

import os

# huggingface_hub and transformers read these once, when they are imported.
OFFLINE_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def stay_offline() -> None:
    """Offline, always: a hub lookup must fail at once, never hang or leak what is loaded.

    Called by each entry point before anything imports huggingface_hub; a value the
    user set is kept. ``glmrepl download`` lifts it for its own requests (download.py)."""
    for variable, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(variable, value)
