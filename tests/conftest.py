"""Shared test fixtures. Tests run on CPU; 8 virtual host devices for the sharding tests."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent XLA cache for the session: tests that build the same network compile once."""
    import jax
    jax.config.update('jax_compilation_cache_dir', str(tmp_path_factory.mktemp('jax_cache')))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


@pytest.fixture(scope='session')
def shared_data() -> pathlib.Path:
    """../shared/data (real slides and tiles); tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f'real sample data not found at {SHARED_DATA}')
    return SHARED_DATA


def make_config(name: str = 'test', **overrides):
    """configs/<name>.py with dotted overrides, e.g. make_config(**{'learn.epochs': 2})."""
    import importlib
    import sys
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    config = importlib.import_module(f'configs.{name}').get_config()
    for dotted, value in overrides.items():
        *parents, field = dotted.split('.')
        holder = config
        for parent in parents:
            holder = holder[parent]
        holder[field] = value
    from pathjax.models.patch.feature_net import resolve_tile_defaults
    resolve_tile_defaults(config)  # as the pipeline does
    return config


# A cohort big enough for the feature network to learn something: 16 slides, about 120
# training and 160 validation patches, without stain normalization (so that colour cannot carry
# the label: see configs/demo.py).
LEARNING_COHORT = {'data.synthetic.num_slides': 16, 'data.synthetic.width': 3072,
                   'data.synthetic.height': 2048, 'learn.patches_per_slide': 64,
                   'stain.method': 'none'}


@pytest.fixture(scope='session')
def patch_workdir(tmp_path_factory):
    """A workdir with the learning cohort tiled and its patch dataset built (shared; tests that
    train copy what they need into their own workdir)."""
    from pathjax import pipeline
    workdir = tmp_path_factory.mktemp('patch_workdir')
    config = make_config(**LEARNING_COHORT)
    assert pipeline.run(config, workdir, ['tile', 'patches']) == 0
    return workdir


def workdir_with_patches(patch_workdir, destination):
    """A fresh workdir sharing the built tiles and patch dataset of `patch_workdir`."""
    import shutil
    for name in ('tiles', 'patches', 'cohort.csv', 'synthetic'):
        source = patch_workdir / name
        if source.is_dir():
            (destination / name).symlink_to(source, target_is_directory=True)
        else:
            shutil.copy(source, destination / name)
    return destination
