"""Evaluation: VQA scoring."""
