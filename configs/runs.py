"""Sacred's run folders: where runs go, and resuming into an existing one.

A run folder is Sacred's FileStorageObserver layout, <log_dir>/<train|test>/<exp_name>/<run id>/,
holding config.json, run.json, cout.txt, metrics.json, plus what the engine writes there
(models/engine/runs.py: provenance.json, the run lock; snapshots/, results and overlays).
"""
from __future__ import annotations

from pathlib import Path

from sacred.observers import FileStorageObserver


class ResumableFileStorageObserver(FileStorageObserver):
    """A FileStorageObserver that can continue an existing run folder instead of making a new one.

    Sacred appends to cout.txt and metrics.json, so a resumed run keeps one history; metrics.json
    is first reset to the metrics of the resume point (models/engine/runs.restore_metrics), since
    the steps after it are trained again.
    """

    def __init__(self, basedir, resume_dir: str | Path | None = None, **kwargs):
        super().__init__(basedir, **kwargs)
        self.resume_dir = Path(resume_dir) if resume_dir else None

    def _make_run_dir(self, _id):
        if self.resume_dir is None:
            return super()._make_run_dir(_id)
        if not self.resume_dir.is_dir():
            raise FileNotFoundError(f"train.resume: run folder {self.resume_dir} does not exist")
        self.dir = str(self.resume_dir)
