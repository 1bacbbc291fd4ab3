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
        "glmrepl.cli.main",
        "glmrepl.repl.loop",
        "glmrepl.repl.commands",
        "glmrepl.repl.completer",
        "glmrepl.repl.render",
        "glmrepl.repl.toolbar",
        "glmrepl.cli.serve",
    ],
)
def test_ui_modules_do_not_import_heavy_libraries(module):
    loaded = imported_after(f"import {module}")
    assert not loaded & set(HEAVY), f"{module} imports {loaded & set(HEAVY)} at module level"


def test_engine_never_imports_prompt_toolkit():
    statement = (
        "import glmrepl.engine.models.manager, glmrepl.engine.generation.run, glmrepl.engine.conversation.chat, "
        "glmrepl.engine.models.catalog, glmrepl.engine.models.checkpoint, glmrepl.engine.conversation.formats, "
        "glmrepl.engine.generation.service, glmrepl.engine.backend, glmrepl.engine.generation.perplexity"
    )
    assert not imported_after(statement) & {"prompt_toolkit", "fastapi", "starlette", "uvicorn"}
    # even once the heavy libraries are in
    assert "prompt_toolkit" not in imported_after(statement + "; import transformers, torch")


def test_the_remote_backend_needs_neither_torch_nor_a_terminal_library():
    loaded = imported_after("import glmrepl.engine.remote.backend")
    assert not loaded & {*HEAVY, "prompt_toolkit", "openai"}  # the client library loads when first used
