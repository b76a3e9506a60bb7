"""Inference: KV-cache context (docs/inference.md §5.1) and text generation (docs/inference.md §5.2,
docs/inference.md §5.4)."""
