"""What a run prints: pathjax's progress lines, warnings and closing summary, without third-party
noise (TensorFlow Datasets' "Downloading and preparing dataset" and progress bars, JAX's probe
of a TPU backend on hosts without one, absl's INFO records) unless `--verbosity` (absl's flag)
asks for the detailed records."""

import contextlib
import io
import logging as python_logging
import sys

from absl import logging

_detailed = True  # library use (tests, notebooks) keeps every record; launch.py decides


NARRATING = ('/tensorflow_datasets/', '/orbax/', '/grain/')  # library code logging as it goes


class _QuietLibraries(python_logging.Filter):
    """Drops the records below ERROR of libraries that narrate their work (TFDS's dataset
    folders, Orbax's every checkpoint); an error stays."""

    def filter(self, record) -> bool:
        return record.levelno >= python_logging.ERROR or not any(
            part in record.pathname for part in NARRATING)


class _Plain(python_logging.Formatter):
    """'warning: message' instead of absl's 'W1207 14:46:51.161260 1400... file.py:65] message'."""

    def format(self, record) -> str:
        text = f'{record.levelname.lower()}: {record.getMessage()}'
        if record.exc_info:  # logging.exception: the traceback stays
            text += '\n' + self.formatException(record.exc_info)
        return text


def configure(detailed: bool) -> None:
    """detailed=False (launch.py without --verbosity): warnings and errors only, plainly
    formatted, the narration of TFDS, Orbax and grain below ERROR dropped, TFDS's bars and
    prints off. detailed=True: every record, as absl prints them."""
    global _detailed
    _detailed = detailed
    if detailed:
        return
    logging.get_absl_handler().addFilter(_QuietLibraries())
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_handler().setFormatter(_Plain())
    python_logging.getLogger('jax._src.xla_bridge').setLevel(python_logging.ERROR)
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()


def show(lines: list[str]) -> None:
    """The run's result (the closing summary) on stdout, whatever the verbosity."""
    sys.stdout.write(''.join(line + '\n' for line in lines))
    sys.stdout.flush()


def say(line: str) -> None:
    """A line the user should see whatever the verbosity (what a run found about its setting)."""
    sys.stderr.write(line + '\n')
    sys.stderr.flush()


def detailed() -> bool:
    return _detailed


@contextlib.contextmanager
def quiet_stdout():
    """What third-party code prints to stdout inside is dropped (kept when detailed)."""
    if _detailed:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield
