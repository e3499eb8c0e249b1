"""How a head declares the checkpoints of its reference (released) training code.

A head file whose reference code released checkpoints declares, at module level,

    REFERENCE_CHECKPOINT = ReferenceFormat(title=..., method=..., rules=..., signature=..., ...)

(as timm keeps each model's `checkpoint_filter_fn` in the model's file): the reference key -> our key
table, the keys that identify the format, and what to drop or reshape. The registry in
models/heads/__init__.py finds these declarations (`reference_formats()`); the generic detection,
renaming, strict loading and error messages are in models/engine/reference_checkpoints.py.
"""
from __future__ import annotations

from dataclasses import dataclass


def rename(key: str, pairs) -> str | None:
    """The first (source, target) pair that names `key`: a source ending in "." is a prefix whose
    remainder is kept, any other an exact name. None when no pair does."""
    for source, target in pairs:
        if source.endswith("."):
            if key.startswith(source):
                return target + key[len(source):]
        elif key == source:
            return target
    return None


@dataclass(frozen=True)
class ReferenceFormat:
    """How one reference codebase names its tensors.

    title: the reference code, for messages; method: our method whose model these checkpoints fit.
    rules: (reference key, our key) pairs; a reference key ending in "." is a prefix whose
    remainder is kept, any other is an exact name. signature: keys that only this format has (a
    file holding any of them is of this format; see `detect_format`). dead: reference keys dropped
    by name. reshape: our keys whose tensor may be reshaped to our shape (same number of elements).
    """
    title: str
    method: str
    rules: tuple[tuple[str, str], ...]
    signature: frozenset[str]
    dead: frozenset[str] = frozenset()
    reshape: frozenset[str] = frozenset()

    def our_key(self, key: str) -> str | None:
        return rename(key, self.rules)

    def reference_key(self, ours_key: str) -> str | None:
        return rename(ours_key, ((ours, ref) for ref, ours in self.rules))
