"""/format in the REPL: replies held to JSON locally and, with --connect, by the server."""

from __future__ import annotations

import json

import jsonschema_rs
import pytest
from support import drive_repl, loaded_app

from glmrepl.engine.settings import Settings
from glmrepl.repl.app import App

ENTER = "\r"
SCHEMA = {
    "type": "object",
    "properties": {"kind": {"enum": ["cat", "dog"]}, "legs": {"type": "integer", "minimum": 0, "maximum": 8}},
    "required": ["kind", "legs"],
}


@pytest.fixture
def schema_file(tmp_path):
    path = tmp_path / "pet.json"
    path.write_text(json.dumps({"name": "pet", "schema": SCHEMA, "strict": True}), encoding="utf-8")
    return path


def _replies(app: App) -> list[str]:
    return [m.content for m in app.session.messages if m.role == "assistant"]


def test_format_holds_the_replies_and_off_frees_them(qwen_checkpoint, schema_file):
    app = loaded_app(qwen_checkpoint, max_new_tokens=60)
    out = drive_repl(app, f"/format {schema_file}" + ENTER + "a pet?" + ENTER + "/format" + ENTER)
    assert f"replies are held to the JSON Schema in {schema_file}" in out
    assert "replies are held to JSON under a schema (/format off frees them)" in out
    assert jsonschema_rs.validator_for(SCHEMA).is_valid(json.loads(_replies(app)[-1]))
    drive_repl(app, "/format json" + ENTER + "another?" + ENTER)
    assert _replies(app)[-1].startswith("{")  # an object, unbounded: a random model's may run to the length
    if app.last_stats is not None and app.last_stats.stop_reason == "end":
        assert isinstance(json.loads(_replies(app)[-1]), dict)
    out = drive_repl(app, "/format off" + ENTER + "free?" + ENTER)
    with pytest.raises(ValueError):
        json.loads(_replies(app)[-1])  # free again: the random model's text
    assert "format off: replies are free text again" in out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "pet.json: no such file"),
        ("[1, 2]", "a JSON Schema is a JSON object"),
        ('{"properties": {"a": {"not": {}}}}', "'pet.json.properties.a.not' is not supported"),
        ('{"type": "strin"}', "'pet.json' cannot be used: Unsupported type \"strin\""),
        ("{oops", "pet.json"),
    ],
)
def test_bad_format_files_get_one_line_errors_and_keep_the_format(qwen_checkpoint, tmp_path, content, message):
    path = tmp_path / "pet.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    app = loaded_app(qwen_checkpoint)
    out = drive_repl(app, "/format json" + ENTER + f"/format {path}" + ENTER)
    errors = [line for line in out.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and message in errors[0], out
    assert "Traceback" not in out
    assert app.output_format is not None and app.output_format.schema is None  # /format json stays


def test_format_goes_to_the_server_with_connect(qwen_checkpoint, schema_file, tmp_path):
    from serving import started_server

    from glmrepl.engine.remote.backend import RemoteBackend

    server = started_server([str(qwen_checkpoint), "--device", "cpu"], tmp_path / "serve.log")
    try:
        app = App(RemoteBackend(server.base_url), Settings({"max_new_tokens": 60, "temperature": 0}))
        app.start_load(None).wait(30)
        drive_repl(app, f"/format {schema_file}" + ENTER + "a pet?" + ENTER)
    finally:
        server.stop()
    assert jsonschema_rs.validator_for(SCHEMA).is_valid(json.loads(_replies(app)[-1]))
