"""`make demo`: build a tiny random checkpoint once and chat with it.

The weights are random, so the replies are gibberish; the point is to see
glmrepl itself working (streaming, commands, Ctrl-C) in seconds, offline.
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from pathlib import Path

from ..common.paths import xdg_dir
from ..engine import stay_offline, use_one_heap

# The demo model's context is 512 tokens: replies of at most 128 leave room for a few turns
# (the usual 512 would leave out the whole history at every turn). Flags given after win.
DEMO_FLAGS = ["--device", "cpu", "--max-new-tokens", "128"]


def main(argv: list[str] | None = None) -> int:
    stay_offline()  # before the demo checkpoint is built with transformers
    use_one_heap()  # before any compute thread starts
    folder = xdg_dir("XDG_CACHE_HOME", ".cache") / "demo-checkpoint"
    if not (folder / "config.json").exists():
        print(f"building a tiny random checkpoint in {folder} ...", flush=True)
        from ..tiny import build_demo

        try:
            build_demo(folder)
        except OSError as error:  # a read-only or full cache: a folder that lasts for this run will do
            folder = Path(tempfile.mkdtemp(prefix="glmrepl-demo-")) / "demo-checkpoint"
            atexit.register(shutil.rmtree, folder.parent, ignore_errors=True)
            print(
                f"warning: cannot write the cache ({error.strerror or error}); "
                f"building the demo in {folder} for this run",
                file=sys.stderr,
                flush=True,
            )
            build_demo(folder)
    print("This demo model has RANDOM weights: it answers gibberish. It shows the program, not a model.", flush=True)
    from .main import main as glmrepl_main

    return glmrepl_main([str(folder), *DEMO_FLAGS, *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
