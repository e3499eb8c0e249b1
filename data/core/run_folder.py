"""A run folder: the one place that knows how a training or evaluation run is laid out on disk.

    <log_dir>/<train|test>/<exp_name>/<run id>/
        config.json, run.json, cout.txt, metrics.json   Sacred's records (its FileStorageObserver)
        provenance.json                                 git commit, packages, device, seed, the fingerprint
        train.lock                                      held while a process trains into the folder
        snapshots/<episodes>.pth, snapshots/last.pth    evaluable snapshots and the resume point
        results.json, results.csv, predictions/, overlays/, curves.png

Every other module asks a `RunFolder` for these paths; none spells a file name itself. The
fingerprint (`config_fingerprint`) says which configuration produced the run: the sweep counts a cell
done only when it matches, validation evaluates only a training of its own configuration, and the
results table keeps one configuration per cell (the newest, with a warning naming the others).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import time
from pathlib import Path

from data.core.checkpoint_files import load_checkpoint_file
from data.core.errors import UserError
from data.core.io import atomic_path, write_json

TRAIN, TEST = "train", "test"
_SNAPSHOT_RE = re.compile(r"^(\d+)\.pth$")
_held_locks: dict[Path, list[tuple[int, bool]]] = {}     # folder -> (descriptor, is the lock file)


# Keys that decide no number of a run: where things are, how often it logs and saves, how many
# workers load data, which device it ran on, what an evaluation keeps besides its numbers.
NOT_IN_FINGERPRINT = frozenset({
    "data_dir", "eval_data_dir", "log_dir", "exp_name", "device",
    "train.resume", "train.print_every", "train.snapshot_every", "train.checkpoint_every", "train.num_workers",
    "evaluation.checkpoint", "evaluation.save_predictions", "evaluation.n_overlays", "evaluation.batch_size",
})


def flatten_config(tree: dict, prefix: str = "") -> dict:
    """A nested config as dotted keys ({"train": {"n_steps": 2}} -> {"train.n_steps": 2}); an empty
    section stays a value of its own ({} is what was set)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten_config(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def config_fingerprint(config: dict, kind: str) -> str:
    """A short digest of the keys of `config` that decide the numbers of a run of `kind` (train: what
    the model learns; test: that and how it is evaluated). Paths, log cadence, worker counts and the
    device are left out (NOT_IN_FINGERPRINT), so moving data or logs keeps a run's fingerprint."""
    if kind not in (TRAIN, TEST):
        raise ValueError(f"kind must be {TRAIN!r} or {TEST!r}, got {kind!r}")
    flat = flatten_config(json.loads(json.dumps(config, default=str)))
    kept = {k: v for k, v in flat.items() if _decides(k, kind)}
    text = json.dumps(kept, sort_keys=True, separators=(",", ":"))
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


# Top-level keys that only say how a model is evaluated (the dataset evaluated: cross-domain).
EVALUATION_ONLY = frozenset({"eval_dataset"})


def _decides(key: str, kind: str) -> bool:
    """Whether `key` decides the numbers of a run of `kind`: no evaluation key decides what a training
    learns (evaluation.fold_scheme orders a fold's test scans; both schemes train on the same ones;
    eval_dataset and evaluation.n_shot choose what a trained model is evaluated on)."""
    return key not in NOT_IN_FINGERPRINT and not (
        kind == TRAIN and (key.startswith("evaluation.") or key in EVALUATION_ONLY))


def config_differences(old: dict, new: dict, kind: str, limit: int = 6) -> str:
    """The keys that make two configurations' fingerprints differ, as 'key: old -> new; ...'."""
    a, b = flatten_config(json.loads(json.dumps(old, default=str))), flatten_config(json.loads(json.dumps(new, default=str)))
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and _decides(k, kind))
    text = "; ".join(f"{k}: {a.get(k, '(none)')!r} -> {b.get(k, '(none)')!r}" for k in keys[:limit])
    return text + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")


class RunBusyError(UserError):
    """Another process trains into the same run folder."""


def experiment_folder(log_dir: str | Path, kind: str, exp_name: str) -> Path:
    """Where Sacred numbers the runs of one experiment: <log_dir>/<train|test>/<exp_name>."""
    return Path(log_dir) / kind / exp_name


class RunFolder:
    """One run folder (see the module docstring for its layout)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------ where things are
    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    @property
    def status_file(self) -> Path:
        return self.path / "run.json"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.json"

    @property
    def provenance_file(self) -> Path:
        return self.path / "provenance.json"

    @property
    def lock_file(self) -> Path:
        return self.path / "train.lock"

    @property
    def snapshot_dir(self) -> Path:
        return self.path / "snapshots"

    @property
    def resume_file(self) -> Path:
        return self.snapshot_dir / "last.pth"

    def snapshot_file(self, episodes: int) -> Path:
        return self.snapshot_dir / f"{int(episodes)}.pth"

    @property
    def results_json(self) -> Path:
        return self.path / "results.json"

    @property
    def results_csv(self) -> Path:
        return self.path / "results.csv"

    @property
    def predictions_dir(self) -> Path:
        return self.path / "predictions"

    @property
    def overlays_dir(self) -> Path:
        return self.path / "overlays"

    @property
    def curves_file(self) -> Path:
        return self.path / "curves.png"

    @staticmethod
    def is_snapshot_file(path: Path) -> bool:
        """Whether `path` is an evaluable snapshot <run>/snapshots/<episodes>.pth or its resume point."""
        path = Path(path)
        return path.parent.name == "snapshots" and (path.name == "last.pth" or bool(_SNAPSHOT_RE.match(path.name)))

    @classmethod
    def of_snapshot(cls, path: Path) -> "RunFolder":
        """The run folder a snapshot file belongs to."""
        return cls(Path(path).parent.parent)

    # ------------------------------------------------------------------ what is there
    def snapshots(self) -> list[tuple[int, Path]]:
        """(episodes, path) of the evaluable snapshots, fewest episodes first (not the resume point)."""
        if not self.snapshot_dir.is_dir():
            return []
        return sorted((int(m.group(1)), p) for p in self.snapshot_dir.iterdir() if (m := _SNAPSHOT_RE.match(p.name)))

    def last_snapshot(self) -> Path | None:
        snaps = self.snapshots()
        return snaps[-1][1] if snaps else None

    def has_resume_point(self) -> bool:
        return self.resume_file.is_file()

    def read_resume_point(self) -> dict:
        """The resume point's content, read safely (torch.load with weights_only=True)."""
        return load_checkpoint_file(self.resume_file, what="resume point", missing_hint=(
            "A run writes it every train.checkpoint_every episodes; nothing to resume from (train.resume takes "
            "the run folder)"))

    def status(self) -> str:
        """Sacred's status of the run (COMPLETED, RUNNING, FAILED, INTERRUPTED, ...); UNKNOWN when its
        record is missing or unreadable."""
        try:
            status = json.loads(self.status_file.read_text()).get("status")
        except (OSError, ValueError, AttributeError):
            return "UNKNOWN"
        return str(status) if status else "UNKNOWN"

    def config(self) -> dict:
        """The configuration Sacred recorded for the run ({} when missing or unreadable)."""
        return _read_json_or_empty(self.config_file)

    def provenance(self) -> dict:
        return _read_json_or_empty(self.provenance_file)

    def fingerprint(self, kind: str, upgrade=None) -> str | None:
        """The fingerprint of the configuration that produced the run: the one it recorded, else (a run
        written before runs recorded one) computed from the configuration Sacred recorded, brought to
        the current keys by `upgrade` (models.engine.experiment.upgrade_config) when given; None when
        neither is readable."""
        value = self.provenance().get("fingerprint")
        if value:
            return str(value)
        config = self.config()
        if not config:
            return None
        return config_fingerprint(upgrade(config) if upgrade else config, kind)

    def write_provenance(self, record: dict) -> None:
        write_json(self.provenance_file, json.loads(json.dumps(record, default=str)))

    # ------------------------------------------------------------------ the lock
    def lock(self, create_file: bool = True) -> None:
        """Hold an exclusive lock while this process trains into the folder.

        Advisory flocks on the run folder itself and on its lock file: the operating system drops them
        when the process ends, however it ends (kill -9 included), so a stale lock file never blocks a
        later resume, and deleting the lock file by hand does not let a second process in (the folder's
        own lock still holds; on file systems without folder locks the file's lock alone is used).
        `create_file=False` writes nothing (a check before a resume that may still be refused): it locks
        the folder and an existing lock file; a later lock() adds the file."""
        key = self.path.resolve()
        held = _held_locks.setdefault(key, [])
        fds = []
        try:
            if not held:
                folder = _open_folder(self.path)
                if folder is not None:
                    fds.append((folder, True))
            if not any(is_file for _, is_file in held) and (create_file or self.lock_file.exists()):
                fds.append((os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644), False))
            for fd, is_folder in fds:
                if not try_flock(fd, fcntl.LOCK_EX, is_folder, self.lock_file):
                    raise RunBusyError(
                        f"{key} is being trained by another process right now (it holds {self.lock_file}); wait "
                        f"for that process to end, or stop it, before resuming this run")
        except BaseException:
            for fd, _ in fds:
                os.close(fd)
            if not held:
                del _held_locks[key]
            raise
        held += [(fd, not is_folder) for fd, is_folder in fds]

    def unlock(self) -> None:
        for fd, _ in _held_locks.pop(self.path.resolve(), []):
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError:
                pass                            # closing the descriptor drops the lock all the same
            finally:
                os.close(fd)

    def is_locked(self) -> bool:
        """Whether another process trains into the folder now (probes the locks and lets them go);
        writes nothing."""
        if self.path.resolve() in _held_locks:
            return False
        fds = []
        try:
            for opener in (lambda: os.open(self.lock_file, os.O_RDONLY), lambda: _open_folder(self.path)):
                try:
                    fd = opener()
                except OSError:
                    continue
                if fd is not None:
                    fds.append(fd)
            return any(not try_flock(fd, fcntl.LOCK_SH, folder=True) for fd in fds)
        finally:
            for fd in fds:
                os.close(fd)

    # ------------------------------------------------------------------ metrics
    def read_metrics(self) -> dict:
        """The metrics Sacred recorded ({} before its first flush, when the file is missing or empty)."""
        text = self.metrics_file.read_text() if self.metrics_file.is_file() else ""
        return json.loads(text) if text.strip() else {}

    def write_metrics(self, metrics: dict) -> None:
        with atomic_path(self.metrics_file) as tmp:
            tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True))

    def restore_metrics(self, saved: dict | None, episodes: int) -> dict:
        """Make the metrics file hold exactly the metrics logged up to the resume point, and return them.

        Sacred flushes metrics on its heartbeat, so a killed run's metrics may lack the last entries
        before its resume point, and hold entries after it (trained again on resume). The resume point
        carries the metrics logged up to it (`saved`); one written before it did (None) keeps what the
        file has up to `episodes`."""
        if saved is None:
            self.truncate_metrics(episodes)
            return self.read_metrics()
        self.write_metrics(saved)
        return json.loads(json.dumps(saved))

    def truncate_metrics(self, after_step: int) -> None:
        """Drop metric entries with step > after_step (atomically)."""
        if not self.metrics_file.is_file():
            return
        metrics = self.read_metrics()
        for entry in metrics.values():
            keep = [i for i, s in enumerate(entry["steps"]) if s <= after_step]
            for key in ("values", "steps", "timestamps"):
                entry[key] = [entry[key][i] for i in keep]
        self.write_metrics(metrics)

    def remove_partial_snapshots(self) -> list[Path]:
        """Delete the temporary files a killed atomic write left among the snapshots (data.core.io.atomic_path
        names them .<name>.<random>.partial<suffix>); returns what was removed."""
        folder = self.snapshot_dir
        stale = [p for p in folder.glob(".*.partial*") if p.is_file()] if folder.is_dir() else []
        for p in stale:
            p.unlink()
        return stale


def _open_folder(path: Path) -> int | None:
    """A descriptor of the folder itself to lock (None where folders cannot be opened so)."""
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None


def try_flock(fd: int, kind: int, folder: bool = False, path: Path | None = None) -> bool:
    """Take a non-blocking flock; False when another process holds a conflicting one (tried for about
    a second, so that a brief probe of another process is not taken for a holder). A file system that
    cannot lock a folder counts as free there (the lock file still holds); one that cannot lock the lock
    file is an error."""
    for attempt in range(20):
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if kind == fcntl.LOCK_SH or attempt == 19:
                return False
            time.sleep(0.05)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            if folder:
                return True
            raise RunBusyError(f"cannot lock {path}: {os.strerror(err.errno)}. Runs need a file system with file "
                               f"locks (flock); put log_dir on a local or lock-capable file system") from None
    return False


def run_folders(base: str | Path) -> list[RunFolder]:
    """The numbered run folders Sacred wrote under `base` (<log_dir>/<train|test>/<exp_name>), oldest first."""
    base = Path(base)
    if not base.is_dir():
        return []
    return [RunFolder(p) for _, p in sorted((int(p.name), p) for p in base.iterdir()
                                            if p.is_dir() and p.name.isdigit())]


def evaluation_folders(path: str | Path) -> list[RunFolder]:
    """Every folder under `path` (or `path` itself) that holds evaluation results."""
    path = Path(path)
    probe = RunFolder(path)
    if probe.results_json.is_file():
        return [probe]
    return sorted((RunFolder(f.parent) for f in path.rglob(probe.results_json.name)), key=lambda r: str(r.path))


def _read_json_or_empty(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
