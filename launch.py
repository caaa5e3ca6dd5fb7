"""pathjax entry point.

  python launch.py --config configs/demo.py --workdir /tmp/demo [--stages tile,...]
                   [--config.tile.mpp=0.25 ...]

Exit status: 0 when the run completed (slides that failed are listed in the stage reports), 1 when
a stage could not go on (no usable slide), 2 for an invalid command line, config or manifest.
"""

import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from pathjax.errors import StageError, UsageError, describe_os_error


def _fail(message: str) -> None:
    sys.stderr.write(f'launch.py: {message}\n')
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a one-line message instead of a traceback for a bad override."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        _fail(f'{error}\nPass --helpshort to see the flags.')
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        overrides = [a for a in argv[1:] if a.startswith('--config.')]
        reason = str(error).strip('"\'').replace('\\n', ' ').replace("\\'", "'")
        _fail(f'bad config override in {" ".join(overrides)}: {reason}')
    except Exception as error:  # the config file's own code failed
        where = traceback.extract_tb(error.__traceback__)[-1]
        _fail(f'cannot load --config: {type(error).__name__}: {error} '
              f'({where.filename}, line {where.lineno})')


def main(argv: list[str]) -> int:
    console.configure(detailed=bool(flags.FLAGS['verbosity'].present))
    if len(argv) > 1:
        _fail(f'unexpected arguments: {" ".join(argv[1:])}')
    config = _CONFIG.value
    try:
        config.seed  # a config file that failed to load raises on first use
    except OSError as error:
        _fail(f'cannot load --config: {error}')
    try:
        return pipeline.run(config, _WORKDIR.value, _STAGES.value)
    except UsageError as error:
        logging.error('%s', error)
        return 2
    except StageError as error:
        logging.error('%s', error)
        return 1
    except OSError as error:  # outside a stage: writing the cohort or the report, say
        logging.error('%s', describe_os_error(error))
        return 1


if __name__ == '__main__':
    # The slide workers are spawned processes that import this file again (as '__mp_main__'):
    # only a real run loads the pipeline (jax, TFDS, every stage) and defines the flags.
    from pathjax import console, pipeline
    _CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (ml_collections).')
    _WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for every artifact of the run.')
    _STAGES = flags.DEFINE_list('stages', None,
                                f'Stages to run, in pipeline order (default all): '
                                f'{",".join(pipeline.stage_names())}.')
    flags.mark_flags_as_required(['config', 'workdir'])
    app.run(main, flags_parser=parse_flags)
