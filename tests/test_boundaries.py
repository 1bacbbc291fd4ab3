"""The two architectural boundaries, checked in fresh interpreters."""

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "accelerate", "fastapi", "uvicorn")


def imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(output.split())


@pytest.mark.parametrize(
    "module",
    [
        "glmrepl.main",
        "glmrepl.repl",
        "glmrepl.commands",
        "glmrepl.completer",
        "glmrepl.render",
        "glmrepl.toolbar",
        "glmrepl.server.cli",
    ],
)
def test_ui_modules_do_not_import_heavy_libraries(module):
    loaded = imported_after(f"import {module}")
    assert not loaded & set(HEAVY), f"{module} imports {loaded & set(HEAVY)} at module level"


def test_engine_never_imports_prompt_toolkit():
    statement = (
        "import glmrepl.engine.manager, glmrepl.engine.generate, glmrepl.engine.chat, "
        "glmrepl.engine.catalog, glmrepl.engine.checkpoint, glmrepl.engine.formats, "
        "glmrepl.engine.service, glmrepl.engine.backend, glmrepl.engine.perplexity"
    )
    assert not imported_after(statement) & {"prompt_toolkit", "fastapi", "starlette", "uvicorn"}
    # even once the heavy libraries are in
    assert "prompt_toolkit" not in imported_after(statement + "; import transformers, torch")


def test_the_remote_backend_needs_neither_torch_nor_a_terminal_library():
    loaded = imported_after("import glmrepl.engine.remote")
    assert not loaded & {*HEAVY, "prompt_toolkit", "openai"}  # the client library loads when first used
