"""hw's Python library: manifests, curation, captions, SPO and LoRA tools."""
