"""Replies from the loaded model: runs, batching, prefix caches, sampling, the reply handle, perplexity."""
