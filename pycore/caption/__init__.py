"""Structured captions: the schema, the OpenAI-compatible and open_clip backends, the durable
result store, Batch API files and the output writers behind `hw caption`.

Heavy imports (torch, open_clip, httpx) happen inside the modules that need them.
"""
