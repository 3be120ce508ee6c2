"""Checkpoint I/O: safetensors folders (lazy, sharded), expert key naming, writers and metadata."""
