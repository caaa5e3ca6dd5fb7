"""The two ways a run stops early, as `launch.py` reports them."""


class UsageError(Exception):
    """The config, the command line or the manifest is invalid; nothing was run (exit status 2)."""


class StageError(Exception):
    """A stage could not go on, e.g. no slide could be processed or the loss became NaN
    (exit status 1); finished work is kept."""
