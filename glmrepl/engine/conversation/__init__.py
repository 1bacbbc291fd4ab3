"""Conversations as the model sees them: messages, prompt formats, tool calls, stop strings, token labels."""
