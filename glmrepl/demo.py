"""`make demo`: build a tiny random checkpoint once and chat with it.

The weights are random, so the replies are gibberish; the point is to see
glmrepl itself working (streaming, commands, Ctrl-C) in seconds, offline.
"""

from __future__ import annotations

import os
import sys

from .config import xdg_dir


def main(argv: list[str] | None = None) -> int:
    folder = xdg_dir("XDG_CACHE_HOME", ".cache") / "demo-checkpoint"
    if not (folder / "config.json").exists():
        print(f"building a tiny random checkpoint in {folder} ...", flush=True)
        from .tiny import build_demo

        build_demo(folder)
    print("This demo model has RANDOM weights: it answers gibberish. It shows the program, not a model.",
          flush=True)
    from .main import main as glmrepl_main

    return glmrepl_main([str(folder), "--device", "cpu", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
