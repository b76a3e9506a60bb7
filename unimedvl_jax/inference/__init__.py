"""Inference: KV-cache context (§5.1) and text generation (§5.2, §5.4)."""
