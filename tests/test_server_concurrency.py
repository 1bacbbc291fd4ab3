"""Many clients on one model: each gets its own reply, and a move waits for them; the app's own
OpenAPI document, fuzzed by schemathesis with every check, says what the server does."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from serving import InProcessServer, ServerProcess, openai_client

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

CLIENTS = 8
DATA = Path(__file__).parent / "data" / "chatglm"


def test_eight_clients_get_their_own_replies_and_a_move_waits_for_them(qwen_checkpoint):
    from glmrepl.engine.backend import LocalBackend
    from glmrepl.engine.models.loading import LoadOptions
    from glmrepl.server.app import create_app
    from glmrepl.server.state import ServerState

    backend = LocalBackend()
    backend.load_and_wait(LoadOptions(mode="cpu").for_model(qwen_checkpoint, "tiny-qwen"))
    with InProcessServer(create_app(ServerState(backend))) as server:
        client = openai_client(server)

        def ask(i: int) -> str:
            messages = [{"role": "user", "content": f"Question number {i}: what is {i * 7} plus {i}?"}]
            stream = client.chat.completions.create(
                model="tiny-qwen", messages=messages, max_tokens=24, temperature=0, stream=True
            )
            return "".join(chunk.choices[0].delta.content or "" for chunk in stream)

        alone = [ask(i) for i in range(CLIENTS)]  # one at a time: what each conversation gets on its own
        assert len(set(alone)) > 1

        together: dict[int, str] = {}
        clients = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(i))) for i in range(CLIENTS)]
        for thread in clients:
            thread.start()
        deadline = time.monotonic() + 60
        while backend.scheduler.admitted < CLIENTS:  # every request is in before the move is asked for
            assert time.monotonic() < deadline, f"only {backend.scheduler.admitted} requests arrived"
            time.sleep(0.005)
        said, after_move = [], {}

        def move() -> None:
            backend.move("cpu", "bfloat16", on_wait=said.append)
            after_move["admitted"] = backend.scheduler.admitted

        mover = threading.Thread(target=move)
        mover.start()
        for thread in clients:
            thread.join(120)
        mover.join(120)
        assert together == dict(enumerate(alone))  # nobody got another's text, none was disturbed by the move
        assert said and said[0] >= 1 and after_move == {"admitted": 0}  # it waited, and ran once they were done
        assert backend.status().placement.describe() == "cpu bfloat16"
        assert ask(0)  # and the server goes on, on the moved model


SCHEMATHESIS = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
SCHEMATHESIS_CONFIG = Path(__file__).parent / "schemathesis.toml"


@pytest.mark.skipif(SCHEMATHESIS is None, reason="needs schemathesis (dev extra)")
def test_the_openapi_document_says_what_the_server_does(gpt2_checkpoint, tmp_path):
    server = ServerProcess(
        [str(gpt2_checkpoint), "--device", "cpu", "--api-key", "k", "--max-new-tokens", "8"], tmp_path / "server.log"
    )
    try:
        server.wait_ready()
        # Every check in every phase (schemathesis's defaults), but those schemathesis.toml leaves
        # out where they cannot hold; a bounded number of examples, to keep it under a minute.
        command = [
            SCHEMATHESIS,
            "--config-file",
            str(SCHEMATHESIS_CONFIG),
            "run",
            server.base_url + "/openapi.json",
            "--header",
            "Authorization: Bearer k",
            "--max-examples",
            "15",
            "--seed",
            "1",
            "--no-shrink",
            "--workers",
            "1",
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
        assert "Traceback" not in server.output()
    finally:
        server.stop()


@pytest.mark.parametrize("family", ["chatglm1", "chatglm3"])
def test_chatglm_families_serve_with_their_own_format_and_stop_ids(family):
    from glmrepl.engine.backend import LocalBackend
    from glmrepl.engine.generation.service import conversation_from_messages
    from glmrepl.engine.models.loading import LoadOptions
    from glmrepl.engine.request import API_FIT, GenerateRequest
    from glmrepl.server.app import create_app
    from glmrepl.server.state import ServerState

    backend = LocalBackend()
    backend.load_and_wait(LoadOptions(mode="cpu").for_model(DATA / f"{family}-tiny", family))
    assert backend.status().family == family
    state = ServerState(backend)
    messages = [{"role": "user", "content": "你好"}]
    conversation = conversation_from_messages(messages)
    sampling = state.sampling_for(backend.status(), max_tokens=6, temperature=0)
    with backend.generate(GenerateRequest(conversation, sampling, fit=API_FIT)) as reply:
        expected = "".join(reply)
        expected_text = reply.text
    with InProcessServer(create_app(state)) as server:
        client = openai_client(server)
        answer = client.chat.completions.create(model=family, messages=messages, max_tokens=6, temperature=0)
        assert answer.choices[0].message.content == expected_text
        assert answer.usage.prompt_tokens == backend.context_usage(conversation)[0]  # the family's own prompt
        stream = client.chat.completions.create(
            model=family, messages=messages, max_tokens=6, temperature=0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream) == expected
