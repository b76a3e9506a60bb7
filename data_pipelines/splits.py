"""Deterministic train/val/test assignment by source scan (never by slice or frame)."""

from __future__ import annotations

import hashlib

DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)  # train, val, test


def scan_fraction(source_scan: str, salt: str) -> float:
    """Stable number in [0, 1) for a scan: the first 8 bytes of sha256(salt + '|' + scan)."""
    digest = hashlib.sha256(f"{salt}|{source_scan}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_for_scan(source_scan: str, *, salt: str = "unimedvl", fractions=DEFAULT_FRACTIONS) -> str:
    """'train' / 'val' / 'test' for a source scan; every slice/frame of a scan lands in the same split."""
    if not source_scan:
        raise ValueError("split_for_scan needs a non-empty source_scan")
    train, val, _ = fractions
    u = scan_fraction(source_scan, salt)
    return "train" if u < train else "val" if u < train + val else "test"
