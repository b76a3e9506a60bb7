"""Modality-stratified train/val/test assignment of whole source scans.

Within each group (a modality), the scans are ordered by the salted hash of data_pipelines/splits.py
(`scan_fraction`); the first `test` of them go to test, the next `val` to val and the rest to train, with

    n >= 5:  test = max(2, round(f_test * n)),  val = max(1, round(f_val * n))
    n == 4:  test = 1, val = 1
    n == 3:  test = 1, val = 0
    n <= 2:  all train

so every modality with five or more scans has at least two test scans and one val scan, at least two scans stay
in train, and a scan (all slices of a volume, all frames of a cine) is never cut. The result depends only on the
scan keys, their groups, the salt and the fractions.
"""

from __future__ import annotations

import collections

from data_pipelines.splits import scan_fraction

MIN_TEST, MIN_VAL = 2, 1          # per group, once it has at least STRATIFY_FROM scans
STRATIFY_FROM = MIN_TEST + MIN_VAL + 2


def split_counts(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """(train, val, test) scan counts for a group of n scans."""
    if n < 0:
        raise ValueError(f"a group cannot have {n} scans")
    _, f_val, f_test = fractions
    if n >= STRATIFY_FROM:
        test, val = max(MIN_TEST, round(f_test * n)), max(MIN_VAL, round(f_val * n))
        if n - test - val < 2:
            raise ValueError(f"fractions {fractions} leave fewer than 2 of {n} scans in train")
    else:
        test, val = (1, 1) if n == 4 else (1, 0) if n == 3 else (0, 0)
    return n - val - test, val, test


def stratified_splits(groups: dict[str, str], *, salt: str, fractions: tuple[float, float, float]) -> dict[str, str]:
    """{scan key: 'train' / 'val' / 'test'} for {scan key: group}; see the module docstring for the rule."""
    if any(not key for key in groups):
        raise ValueError("stratified_splits needs non-empty scan keys")
    members = collections.defaultdict(list)
    for key, group in groups.items():
        members[group].append(key)
    out = {}
    for keys in members.values():
        _, val, test = split_counts(len(keys), fractions)
        ordered = sorted(keys, key=lambda k: (scan_fraction(k, salt), k))
        for i, key in enumerate(ordered):
            out[key] = "test" if i < test else "val" if i < test + val else "train"
    return out
