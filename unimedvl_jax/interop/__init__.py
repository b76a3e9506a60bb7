"""Interop with the official PyTorch UniMedVL/BAGEL checkpoint layout (spec §2)."""
