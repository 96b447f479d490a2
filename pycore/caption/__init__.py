"""Structured captions: the schema, the OpenAI-compatible and open_clip backends, the durable
result store, Batch API files and the output writers behind `hw caption`.

The entry point is :func:`pycore.caption.run.caption_manifest` (a
:class:`pycore.caption.request.CaptionRequest` in, a :class:`pycore.caption.run.CaptionResult` out).
Heavy imports (torch, open_clip, httpx) happen inside the modules that need them.
"""
