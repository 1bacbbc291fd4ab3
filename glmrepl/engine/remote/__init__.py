"""An OpenAI-compatible server as a backend: the same face as the local engine, over HTTP."""
