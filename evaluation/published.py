"""The published Dice of every method, to print beside ours (`collect_results --published`).

The numbers live in published_results.csv next to this file, one row per (method, dataset, setting,
entry, organ), with the source and the status the reference notes give them
(../shared/reference/published_results.md: V confirmed by two sources, T one transcription,
X inconsistent, U recalled, "mean only"). An entry is one published table row: the method's own
paper ("paper"), another paper's listing, a re-run (DSPNet re-ran its baselines) or a user's
reproduction; each (method, dataset, setting) has at most one `primary` entry, the one shown beside
our numbers. Organs are keyed by this project's label ids, so a dataset's label names (SABS calls
the left kidney KID_l) never have to match the papers'.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from data.core.errors import DataError

PUBLISHED_CSV = Path(__file__).with_name("published_results.csv")
COLUMNS = ("method", "dataset", "setting", "entry", "primary", "label", "organ", "dice", "source", "status")
MEAN = "mean"


@dataclass
class PublishedEntry:
    """One published table row: Dice in % per label id, and the row's mean as the paper printed it."""
    method: str
    dataset: str
    setting: int
    entry: str
    primary: bool
    source: str
    status: str
    dice: dict[int, float] = field(default_factory=dict)     # label id -> Dice (%)
    mean: float | None = None


def _rows(path: Path):
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
    reader = csv.DictReader(lines)
    if tuple(reader.fieldnames or ()) != COLUMNS:
        raise DataError(f"{path}: the header must be {','.join(COLUMNS)}, got {','.join(reader.fieldnames or [])}")
    for number, row in enumerate(reader, start=2):
        yield number, row


def load_published(path: Path | str = PUBLISHED_CSV) -> list[PublishedEntry]:
    """Read the table; a malformed row is a DataError naming the file, the row and the field."""
    path = Path(path)
    entries: dict[tuple, PublishedEntry] = {}
    for number, row in _rows(path):
        where = f"{path}, row {number}"
        try:
            setting, dice = int(row["setting"]), float(row["dice"])
        except (TypeError, ValueError):
            raise DataError(f"{where}: setting must be a whole number and dice a number, got "
                            f"setting={row['setting']!r} dice={row['dice']!r}") from None
        if not 0.0 <= dice <= 100.0:
            raise DataError(f"{where}: dice is in percent, 0 to 100; got {dice}")
        if row["primary"] not in ("yes", "no"):
            raise DataError(f"{where}: primary must be yes or no, got {row['primary']!r}")
        key = (row["method"], row["dataset"].upper(), setting, row["entry"])
        entry = entries.setdefault(key, PublishedEntry(key[0], key[1], setting, key[3], row["primary"] == "yes",
                                                       row["source"], row["status"]))
        if (entry.primary, entry.source, entry.status) != (row["primary"] == "yes", row["source"], row["status"]):
            raise DataError(f"{where}: primary, source and status must be the same on every row of entry "
                            f"{key[3]!r} of {key[0]} {key[1]} setting {setting}")
        label = row["label"]
        if label == MEAN:
            entry.mean = dice
        elif label.isdigit():
            if int(label) in entry.dice:
                raise DataError(f"{where}: label {label} appears twice in entry {key[3]!r} of {key[0]} {key[1]}")
            entry.dice[int(label)] = dice
        else:
            raise DataError(f"{where}: label must be a label id or '{MEAN}', got {label!r}")
    primaries: dict[tuple, str] = {}
    for e in entries.values():
        if e.primary and primaries.setdefault((e.method, e.dataset, e.setting), e.entry) != e.entry:
            raise DataError(f"{path}: {e.method} {e.dataset} setting {e.setting} has two primary entries "
                            f"({primaries[(e.method, e.dataset, e.setting)]!r} and {e.entry!r}); keep one")
    return list(entries.values())


def published_for(dataset: str, setting: int, path: Path | str = PUBLISHED_CSV) -> list[PublishedEntry]:
    """The entries of one dataset and setting, primary entries first, then by method."""
    found = [e for e in load_published(path) if e.dataset == dataset.upper() and e.setting == int(setting)]
    return sorted(found, key=lambda e: (not e.primary, e.method, e.entry))
