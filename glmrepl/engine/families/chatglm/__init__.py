"""Native ChatGLM support: ChatGLM-6B, ChatGLM2, ChatGLM3 and GLM-4.

``detect.detect_chatglm`` tells the generation from a folder's files;
``load.load_chatglm`` builds the model, tokenizer and prompt format without
executing any of the checkpoint's Python code.
"""
