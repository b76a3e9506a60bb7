"""Interop with the official PyTorch UniMedVL/BAGEL checkpoint layout (docs/model.md §2)."""
