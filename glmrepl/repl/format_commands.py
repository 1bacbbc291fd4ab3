"""/format: the replies' text held to JSON (any object, or a JSON Schema from a file).

The model's tokens are masked while it writes (the engine's response formats), so a reply
that ends by itself parses. A remote backend sends the format as OpenAI's response_format.
"""

from __future__ import annotations

from ..engine import GlmreplError, OutputFormat, check_schema
from .app import App
from .results import Text


def cmd_format(app: App, args: str):
    """/format json, /format FILE.json (a JSON Schema, or OpenAI's {"name", "schema", "strict"}), /format off."""
    if not args:
        if app.output_format is None:
            return Text("replies are free text (/format json or /format FILE.json holds them to JSON)")
        return Text(f"replies are held to {app.output_format.describe()} (/format off frees them)")
    if args.lower() == "off":
        app.output_format = None
        return Text("format off: replies are free text again", "dim")
    if args.lower() == "json":
        app.output_format = OutputFormat(where="/format json")
        return Text("replies are held to a JSON object (/format off frees them)", "dim")
    app.output_format = read_format(args)
    return Text(f"replies are held to the JSON Schema in {args} (/format off frees them)", "dim")


def read_format(path: str) -> OutputFormat:
    """The format a file gives: a JSON Schema, or OpenAI's json_schema object around one."""
    from ..engine import read_json_file

    file, data = read_json_file(path)
    strict = False
    if isinstance(data, dict) and isinstance(data.get("schema"), dict) and "name" in data:
        strict, data = data.get("strict") is True, data["schema"]
    if not isinstance(data, dict):
        raise GlmreplError(f"{file}: a JSON Schema is a JSON object (/format json takes any object)")
    return OutputFormat(check_schema(data, file.name, strict), strict=strict, where=file.name)
