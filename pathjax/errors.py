"""The two ways a run stops early, as `launch.py` reports them."""


class UsageError(Exception):
    """The config, the command line or the manifest is invalid; nothing was run (exit status 2)."""


def describe_os_error(error: OSError) -> str:
    """'<file>: <what went wrong>' for an OSError, naming every file it knows of."""
    files = ' -> '.join(str(f) for f in (error.filename, error.filename2) if f is not None)
    what = error.strerror or str(error) or type(error).__name__
    return f'{files}: {what}' if files else what


class StageError(Exception):
    """A stage could not go on, e.g. no slide could be processed or the loss became NaN
    (exit status 1); finished work is kept."""
