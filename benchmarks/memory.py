"""Resident memory after one load and after ten swaps, through glmrepl's ModelManager.

Run as a script in a fresh process (run.py does this), so nothing else the
benchmark has allocated is counted: ``python benchmarks/memory.py A B DTYPE [MODE]``
prints one JSON object (MODE: cpu, the default, or gpu).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SWAPS = 10


def measure(first: Path, second: Path, dtype: str, mode: str = "cpu", swaps: int = SWAPS) -> dict:

    from glmrepl.engine.devices.modes import resident_memory_bytes
    from glmrepl.engine.models.manager import LoadRequest, ModelManager

    manager = ModelManager()
    baseline = resident_memory_bytes()
    manager.load(LoadRequest(path=first, name=first.name, mode=mode, dtype=dtype))
    use(manager.current.model)
    after_one, gpu_after_one = resident_memory_bytes(), gpu_allocated()
    for index in range(swaps):  # first -> second -> first ..., as /model would
        path = second if index % 2 == 0 else first
        manager.load(LoadRequest(path=path, name=path.name, mode=mode, dtype=dtype))
    use(manager.current.model)
    after_swaps, gpu_after_swaps = resident_memory_bytes(), gpu_allocated()
    weights = sum(p.numel() * p.element_size() for p in manager.current.model.parameters())
    return {
        "baseline_bytes": baseline,
        "after_one_load_bytes": after_one,
        "after_swaps_bytes": after_swaps,
        "gpu_after_one_load_bytes": gpu_after_one,
        "gpu_after_swaps_bytes": gpu_after_swaps,
        "swaps": swaps,
        "weight_bytes": weights,
    }


def use(model) -> None:
    """One forward pass: memory-mapped weights are only resident once read."""
    import torch

    with torch.inference_mode():
        model(input_ids=torch.tensor([[3, 4, 5, 6]], device=model.device))


def gpu_allocated() -> int | None:
    import torch

    return torch.cuda.memory_allocated() if torch.cuda.is_available() else None


if __name__ == "__main__":
    mode = sys.argv[4] if len(sys.argv) > 4 else "cpu"
    print(json.dumps(measure(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], mode)))
