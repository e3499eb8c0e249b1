"""The errors a user can fix, one family for the whole project.

Commands print a `UserError` as its message alone (no traceback) and exit with status 1
(`configs.experiment.FewShotExperiment`, `data.core.cli.run_cli`).
"""


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
