"""Serving captions over HTTP: `vision-gpt serve`, an OpenAI-compatible API on Ray Serve.

`protocol` is OpenAI's request and reply shapes, `engine` turns requests into batched `generate` calls (no HTTP, no
Ray), and `server` is the Ray Serve deployment with its routes. Only `server` imports Ray.
"""
