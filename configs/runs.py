"""Sacred's observer of a run folder (data.core.run_folder describes the layout), able to resume
into an existing one."""
from __future__ import annotations

import logging
from pathlib import Path

from sacred.observers import FileStorageObserver

log = logging.getLogger(__name__)


class ResumableFileStorageObserver(FileStorageObserver):
    """A FileStorageObserver that can continue an existing run folder instead of making a new one.

    Sacred appends to the console output and the metrics, so a resumed run keeps one history; the
    metrics are first reset to those of the resume point (RunFolder.restore_metrics), since the steps
    after it are trained again.
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

    def failed_event(self, fail_time, fail_trace):
        """Record the failure; when that write fails too (the disk that failed the run is full), say so
        in one line instead of Sacred's observer traceback: the run's own error follows."""
        try:
            super().failed_event(fail_time, fail_trace)
        except OSError as err:
            log.warning("could not record the failure in %s: %s", self.dir, err.strerror or err)
