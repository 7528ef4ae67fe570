"""Integrations with other libraries (transformers, open_clip)."""
