"""`/device` switches without reading the disk, against a fresh load of the same checkpoint."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

# Where each mode switches to and back from: on a CPU-only machine the only
# in-memory switch is a change of precision; with a GPU it is CPU <-> GPU.
PARTNER = {
    ("cpu", "float32"): ("cpu", "bfloat16"),
    ("cpu", "bfloat16"): ("cpu", "float32"),
    ("gpu", "float16"): ("cpu", "float32"),
    ("gpu", "bfloat16"): ("cpu", "float32"),
}


def compare_switch(path: Path, mode: str, dtype: str, repeats: int) -> dict:
    from glmrepl.engine.models.manager import LoadRequest, ModelManager

    manager = ModelManager()
    fresh = []
    for _ in range(repeats):
        manager.unload()
        start = time.perf_counter()
        manager.load(LoadRequest(path=path, name=path.name, mode=mode, dtype=dtype))
        fresh.append(time.perf_counter() - start)
    other_mode, other_dtype = PARTNER[(mode, dtype)]
    switches = []
    for _ in range(repeats):
        for target in ((other_mode, other_dtype), (mode, dtype)):
            start = time.perf_counter()
            manager.move(*target)
            switches.append(time.perf_counter() - start)
    manager.unload()
    return {
        "fresh_load_s": statistics.median(fresh),
        "switch_s": statistics.median(switches),
        "switch_to": f"{other_mode} {other_dtype} and back",
        "fresh_runs": fresh,
        "switch_runs": switches,
    }
