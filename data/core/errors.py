"""The errors a user can fix, one family for the whole project.

Commands print a `UserError` as its message alone (no traceback) and exit with status 1
(`configs.experiment.FewShotExperiment`, `data.core.cli.run_cli`).
"""
import errno


class UserError(RuntimeError):
    """An error the user can fix: a bad file, key or value. Its message names the file or key, says
    what is wrong and how to fix it; commands print it without a traceback and exit with status 1
    (`configs.experiment.user_errors`, `data.core.cli.run_cli`)."""


class ConfigError(UserError, ValueError):
    """A configuration that cannot work: unknown key, method or value. The message names the key."""


class DataError(UserError):
    """A problem with the user's data: a missing, unreadable or inconsistent file.

    The message always names the file and says how to fix the problem.
    """


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable, unsafe, or does not fit the model."""


class OutputError(UserError):
    """An output cannot be written: a read-only or unwritable folder, or a full disk."""


# errno values of a failed write that the user fixes with permissions, another folder or free space
_UNWRITABLE = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
               errno.EROFS: "the file system is read-only"}
_FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded"}


def output_error(err: OSError, what: str = "") -> OutputError | None:
    """A failed write the user can fix (read-only or unwritable folder, full disk) as one clear error
    naming the path (and `what` it is); None for any other OSError (a bug or a missing input, reported
    as it is).

    Every output of the project is written to a temporary name and renamed into place
    (data.core.io.atomic_path, the trainer's snapshots), so an interrupted write leaves the previous
    file, or none, never a truncated one."""
    where = err.filename if err.filename is not None else "an output file"
    where = f"{what} {where}" if what else where
    if err.errno in _UNWRITABLE:
        return OutputError(f"cannot write {where}: {_UNWRITABLE[err.errno]}. Make the folder writable (or choose "
                           f"another output folder: log_dir=... for training.py/validation.py, --out for the "
                           f"scripts) and run the command again; files are written whole or not at all, so no "
                           f"file there was left half-written")
    if err.errno in _FULL:
        return OutputError(f"cannot write {where}: {_FULL[err.errno]}. Free some space (or choose an output folder "
                           f"on another disk) and run the command again; files are written whole or not at all, "
                           f"so no file there was left half-written")
    return None


def fixable_error(err: BaseException) -> UserError | None:
    """The error as one the user can fix, printed as one `error:` paragraph by every command
    (data.core.cli.run_cli, configs.experiment.user_errors): a UserError itself, or a write failed on an
    unwritable folder or a full disk (`output_error`); None for anything else (raised as it is)."""
    if isinstance(err, UserError):
        return err
    return output_error(err) if isinstance(err, OSError) else None
