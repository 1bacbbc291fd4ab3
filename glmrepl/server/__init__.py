"""``glmrepl serve``: the engine behind an HTTP API (OpenAI chat and completions, ChatGLM's api.py).

Needs the ``serve`` extra (FastAPI and uvicorn); nothing else in glmrepl imports this package.
"""
