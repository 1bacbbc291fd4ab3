"""The outermost layer: no exception leaves the application.

Starlette answers an unexpected error with the app's 500 handler and then
raises it again, so that the server logs it: uvicorn would print a whole
traceback on the operator's terminal, for a request any client can send.
Here it ends as one line; a response not yet started gets a JSON 500.
"""

from __future__ import annotations

import sys
from typing import TextIO

from ..engine.errors import first_line
from .middleware import send_error


class NoTracebacks:
    def __init__(self, app, stream: TextIO | None = None):
        self.app = app
        self.stream = stream

    async def __call__(self, scope, receive, send):
        started = False

        async def noted_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, noted_send)
        except Exception as error:
            where = f"{scope.get('method', '')} {scope.get('path', '')}".strip()
            line = f"error: {where} failed: {type(error).__name__}: {first_line(error)}"
            print(_printable(line), file=self.stream or sys.stderr, flush=True)
            if scope["type"] == "http" and not started:
                await send_error(send, 500, f"internal error: {type(error).__name__}", "internal_error")


def _printable(text: str) -> str:
    """Control characters (and whatever else does not print) escaped: a log line stays one line."""
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)
