"""The stage list, its order, and the one place that walks the whole config.

`run(config, workdir, stages)` checks the config, reads and validates the cohort (generating a
synthetic one when `data.manifest` is empty), then runs the chosen stages in order; `predict`
(new slides through a trained workdir, `predict_stage`) runs only when named, after the others. Each stage is
`run(config, workdir, cohort) -> [SlideEntry]`; its report goes to `<workdir>/reports/<stage>.json`.
"""

import contextlib
import functools
import os
import pathlib
import shutil
from typing import Any, Callable, NamedTuple

import jax
from absl import logging

from pathjax import (artifacts, cohort as cohort_lib, comparison, console, cpu_devices,
                     cross_validation, determinism, provenance, stage_report, workdir_lock)
from pathjax.errors import StageError, UsageError, describe_os_error
from pathjax.run_summary import RunSummary
from pathjax.data import feature_sources, import_stage, patches
from pathjax.interop import h5_features
from pathjax.models.compute_dtype import CHOICES as DTYPE_CHOICES
from pathjax.models.slide.factory import MODELS as SLIDE_MODELS
from pathjax.models.patch.feature_net import (VGG16_BACKBONE, backbones, normalization_problem,
                                       resolve_tile_defaults)
from pathjax.models.patch.pretrained import check_weights_file
from pathjax.models.patch.vit_presets import PRESETS
from pathjax.slides import stain, stain_transform, synthetic_artifacts, synthetic_cohort, tile_stage
from pathjax.slides.tissue import TissueRule
from pathjax.evaluate import evaluate_stage, predict_stage, report_page
from pathjax.train import extract, feature_learning, slide_training
from pathjax.runtime import cluster, compilation_cache, sharding, shared_workdir


class Stage(NamedTuple):
    """A stage: run(config, workdir, cohort) -> one report entry per slide, or None for a stage
    that works on the cohort as a whole (and writes its own report). On several hosts, a stage
    runs on every process (`every_process`) or on process 0 alone while the others wait.
    `settings`: the config fields its artifacts depend on beyond those of earlier stages;
    `artifacts`: what to delete to redo it; `redo`: the folders it makes from the training and
    validation slides as a whole, deleted (so made again) when one of those slides changed
    (`tile_stage.tiles_digest`: its file was replaced, or the stain reference refitted)."""

    name: str
    run: Callable[..., list[stage_report.SlideEntry] | None]
    every_process: bool
    settings: tuple[str, ...]
    artifacts: str
    redo: tuple[str, ...] = ()


SPLIT_FIELDS = ('data.classes', 'data.split_fractions', 'data.folds', 'data.fold',
                'data.split_seed', 'data.fold_by')
STAGES = (
    Stage('tile', tile_stage.run, True,
          SPLIT_FIELDS + ('data.synthetic', 'tile', 'tissue', 'stain'),
          'tiles/, qc/, thumbnails/, stain/'),
    Stage('patches', patches.run, False, ('seed', 'learn.patches_per_slide'), 'patches/',
          ('patches',)),
    Stage('learn_features', feature_learning.run, True,
          ('feature_net', 'am_softmax', 'learn.batch_size', 'learn.optimizer', 'learn.lr',
           'learn.lr_schedule', 'learn.momentum', 'learn.weight_decay', 'learn.grad_clip',
           'learn.augment', 'learn.hed_sigma'), 'feature_net/', ('feature_net',)),
    Stage('extract', extract.run, True, ('extract.checkpoint',), 'features/'),
    Stage('import', import_stage.run, False,
          SPLIT_FIELDS + ('features.import_dir', 'features.format', 'features.patch_size_level0'),
          'imported/, graphs/, thumbnails/'),
    Stage('train_slide', slide_training.run, True,
          ('graph', 'slide_net', 'train.batch_slides', 'train.optimizer', 'train.lr',
           'train.weight_decay', 'train.class_weights'), 'graphs/, slide_net/', ('slide_net',)),
    Stage('evaluate', evaluate_stage.run, True, (), 'eval/'),
)


PREDICT = 'predict'  # runs only when named: new slides through a trained workdir
NATIVE_ONLY = ('tile', 'patches', 'learn_features', 'extract')  # skipped with imported features


def stages_of(config) -> tuple[Stage, ...]:
    """The stages of a run, in order: with features imported from another tool
    (`features.import_dir`), `import` instead of tile ... extract; otherwise all but `import`."""
    if feature_sources.importing(config):
        return tuple(s for s in STAGES if s.name not in NATIVE_ONLY)
    return tuple(s for s in STAGES if s.name != 'import')


def settings_fields(config, last: str | None = None) -> list[str]:
    """The config fields that the run's stages up to `last` (default: all) depend on."""
    fields = []
    for stage in stages_of(config):
        fields += stage.settings
        if stage.name == last:
            break
    return fields


def stage_names() -> list[str]:
    return [stage.name for stage in STAGES] + [PREDICT]


def resolve_workers(workers: int) -> int:
    """config.workers, with -1 meaning one per CPU core."""
    return workers if workers > 0 else os.cpu_count() or 1


def check_config(config) -> list[str]:
    """Every problem with the config's values, as messages naming the field."""
    problems = []

    def require(condition: bool, message: str) -> None:
        if not condition:
            problems.append(message)

    classes = tuple(config.data.classes)
    require(len(classes) >= 2 and len(set(classes)) == len(classes) and all(classes),
            f'data.classes must be at least two distinct non-empty names, got {classes}')
    fractions = tuple(config.data.split_fractions)
    require(len(fractions) == 3 and min(fractions) >= 0 and fractions[0] > 0,
            f'data.split_fractions must be (train, val, test) >= 0 with train > 0, got {fractions}')
    require(config.data.folds >= 0, f'data.folds must be >= 0, got {config.data.folds}')
    require(config.data.fold_by in ('case', 'site'),
            f"data.fold_by must be 'case' or 'site', got {config.data.fold_by!r}")
    require(config.data.fold_by == 'case' or config.data.folds > 1,
            "data.fold_by='site' makes folds: set data.folds > 1")
    if config.data.folds > 1:
        require(-1 <= config.data.fold < config.data.folds,
                f'data.fold must be in [0, {config.data.folds}) or -1 (every fold), got '
                f'{config.data.fold}')
    if config.data.manifest:
        require(os.path.isfile(config.data.manifest),
                f'data.manifest: file not found: {config.data.manifest}')
    else:
        low, high = (tuple(config.data.synthetic.motif_fraction) + (None, None))[:2]
        require(len(config.data.synthetic.motif_fraction) == 2 and 0 <= low <= high <= 1,
                f'data.synthetic.motif_fraction must be (low, high) with 0 <= low <= high <= 1, '
                f'got {tuple(config.data.synthetic.motif_fraction)}')
        spec = config.data.synthetic
        unknown = sorted(set(spec.artifacts) - set(synthetic_artifacts.ARTIFACTS))
        require(not unknown, f"data.synthetic.artifacts: unknown {', '.join(map(repr, unknown))}; "
                             f"choose from {', '.join(synthetic_artifacts.ARTIFACTS)}")
        require(spec.sites == 0 or spec.sites >= 2,
                f'data.synthetic.sites must be 0 (a stain per slide) or >= 2, got {spec.sites}')
        require(spec.sites == 0 or config.data.folds <= 1,
                'data.synthetic.sites deals the splits itself (the test split has its own share '
                'of slides at their label\'s site): leave data.folds at 0')
        shares = tuple(spec.site_follows_label)
        require(len(shares) == 2 and all(0 <= p <= 1 for p in shares),
                f'data.synthetic.site_follows_label must be (train/val, test) chances in [0, 1], '
                f'got {shares}')
        require(config.data.synthetic.num_slides >= 2,
                'data.manifest is empty: give a manifest CSV (or data.synthetic.num_slides >= 2 '
                'for a generated cohort)')
    require(config.workers == -1 or config.workers >= 1,
            f'workers must be -1 (all cores) or >= 1, got {config.workers}')
    require(config.tile.mpp > 0, f'tile.mpp must be > 0 (or 0: the backbone\'s), got '
                                 f'{config.tile.mpp}')
    require(config.tile.patch_size >= 8, f'tile.patch_size must be >= 8 (or 0: the backbone\'s), '
                                         f'got {config.tile.patch_size}')
    require(config.tile.level >= 0, f'tile.level must be >= 0, got {config.tile.level}')
    try:
        TissueRule(**config.tissue)
    except ValueError as error:
        problems.append(str(error))
    require(config.stain.method in stain_transform.METHODS,
            f"stain.method must be one of {', '.join(stain_transform.METHODS)}, got "
            f'{config.stain.method!r}')
    if config.stain.reference != 'cohort':
        try:
            stain.read_template(config.stain.reference)
        except ValueError as error:
            problems.append(f"{error}; give an image file or 'cohort'")
    require(config.stain.fit_patches >= 1,
            f'stain.fit_patches must be >= 1, got {config.stain.fit_patches}')
    require(config.cpu_devices >= 0,
            f'cpu_devices must be >= 0 (0 = auto), got {config.cpu_devices}')
    distributed = config.distributed
    auto = distributed.coordinator == cluster.AUTO
    require(not auto or (distributed.num_processes, distributed.process_id) == (1, 0),
            'distributed.coordinator=auto takes the process count and id from the scheduler: '
            'leave distributed.num_processes and distributed.process_id at their defaults, 1 and '
            f'0 (got {distributed.num_processes} and {distributed.process_id})')
    if config.cpu_devices > 0:
        global_batches, process_batches = cpu_devices.batch_sizes(config)
        # auto: the count is the scheduler's, known once JAX starts; one process is checked here,
        # and sharding.local_batch_size checks them all at the first batch.
        processes = 1 if auto else distributed.num_processes
        devices = config.cpu_devices * processes
        require(all(b % devices == 0 for b in global_batches)
                and all(b % config.cpu_devices == 0 for b in process_batches),
                f'cpu_devices={config.cpu_devices} (x '
                + ("the scheduler's processes" if auto else f'{processes} process(es)')
                + f') must split learn.batch_size={config.learn.batch_size} and '
                f'train.batch_slides={config.train.batch_slides} over all devices, and '
                f'extract.batch_size={config.extract.batch_size} over one process\'s')
    require(config.micro_batch >= 0,
            f'micro_batch must be >= 0 (0 = auto), got {config.micro_batch}')
    require(config.dtype in DTYPE_CHOICES,
            f'dtype must be one of {DTYPE_CHOICES}, got {config.dtype!r}')
    require(config.feature_net.width > 0, f'feature_net.width must be > 0, got {config.feature_net.width}')
    require(config.feature_net.embed_dim >= 0,
            f'feature_net.embed_dim must be >= 0, got {config.feature_net.embed_dim}')
    net = config.feature_net
    require(net.backbone in backbones(),
            f'feature_net.backbone must be one of {", ".join(backbones())}, got {net.backbone!r}')
    require(not net.weights or os.path.isfile(net.weights),
            f'feature_net.weights: file not found: {net.weights}')
    if net.weights and os.path.isfile(net.weights) and net.backbone in backbones():
        require(net.backbone != VGG16_BACKBONE or net.width == 1,
                f'feature_net.weights are for the full VGG-16 (feature_net.width=1), got '
                f'width={net.width}')
        try:  # headers only: sizes, keys, shapes; no tensor is read
            check_weights_file(net.weights, net.backbone)
        except (ValueError, ImportError) as error:
            problems.append(f'feature_net.weights: {error}')
    problem = normalization_problem(config)
    require(not problem, problem)
    if net.backbone in PRESETS:
        require(net.embed_dim == 0, f'feature_net.embed_dim adds a layer to VGG-16 only; with '
                                    f'backbone={net.backbone} leave it at 0')
        size = PRESETS[net.backbone].input_size
        require(config.tile.patch_size == size,
                f'feature_net.backbone={net.backbone} takes {size} px patches, but '
                f'tile.patch_size={config.tile.patch_size}; set it to {size} or 0 (the '
                f'backbone\'s)')
    require(config.am_softmax.s > 0 and 0 <= config.am_softmax.m < 1,
            f'am_softmax needs s > 0 and 0 <= m < 1, got s={config.am_softmax.s}, m={config.am_softmax.m}')
    learn = config.learn
    require(learn.patches_per_slide >= 1, f'learn.patches_per_slide must be >= 1, got {learn.patches_per_slide}')
    require(learn.epochs >= 1, f'learn.epochs must be >= 1, got {learn.epochs}')
    require(learn.batch_size >= 1, f'learn.batch_size must be >= 1, got {learn.batch_size}')
    require(learn.optimizer in ('sgd', 'adam', 'adamw'),
            f"learn.optimizer must be 'sgd', 'adam' or 'adamw', got {learn.optimizer!r}")
    require(learn.lr > 0, f'learn.lr must be > 0, got {learn.lr}')
    require(learn.lr_schedule in ('cosine', 'constant'),
            f"learn.lr_schedule must be 'cosine' or 'constant', got {learn.lr_schedule!r}")
    require(learn.augment in feature_learning.AUGMENTATIONS,
            f"learn.augment must be one of {', '.join(feature_learning.AUGMENTATIONS)}, got "
            f'{learn.augment!r}')
    require(0 <= learn.hed_sigma < 1, f'learn.hed_sigma must be in [0, 1), got {learn.hed_sigma}')
    require(learn.grad_clip >= 0, f'learn.grad_clip must be >= 0, got {learn.grad_clip}')
    require(learn.log_every >= 1, f'learn.log_every must be >= 1, got {learn.log_every}')
    features = config.features
    require(features.format in h5_features.FORMATS,
            f'features.format must be one of {", ".join(h5_features.FORMATS)}, got '
            f'{features.format!r}')
    for field, folder in (('features.import_dir', features.import_dir),
                          ('predict.import_dir', config.predict.import_dir)):
        require(not folder or os.path.isdir(folder), f'{field}: folder not found: {folder}')
    require(not config.predict.import_dir or features.import_dir,
            'predict.import_dir is for a workdir trained on imported features '
            '(features.import_dir)')
    require(features.patch_size_level0 >= 0,
            f'features.patch_size_level0 must be >= 0, got {features.patch_size_level0}')
    require(features.format != 'clam' or features.patch_size_level0 > 0,
            "features.format='clam': CLAM files do not record the patch size; set "
            'features.patch_size_level0 (a patch\'s side in level-0 pixels, e.g. 512 for 256 px '
            'at 20x on a 40x slide)')
    require(features.export in ('', 'h5'),
            f"features.export must be '' or 'h5', got {features.export!r}")
    require(not (features.export and features.import_dir),
            'features.export writes the extract stage\'s features; with features.import_dir '
            'they are already files of another tool')
    require(config.extract.batch_size >= 1,
            f'extract.batch_size must be >= 1, got {config.extract.batch_size}')
    require(config.graph.k >= 1, f'graph.k must be >= 1, got {config.graph.k}')
    require(config.graph.max_patches >= 0, f'graph.max_patches must be >= 0, got {config.graph.max_patches}')
    net = config.slide_net
    require(net.model in SLIDE_MODELS,
            f'slide_net.model must be one of {", ".join(SLIDE_MODELS)}, got {net.model!r}')
    require(0 <= net.bag_weight <= 1, f'slide_net.bag_weight must be in [0, 1], got '
                                      f'{net.bag_weight}')
    require(net.instance_k >= 1, f'slide_net.instance_k must be >= 1, got {net.instance_k}')
    require(net.d_model >= 4 and net.d_model % 4 == 0,
            f'slide_net.d_model must be a positive multiple of 4, got {net.d_model}')
    require(net.heads >= 1 and net.d_model % max(net.heads, 1) == 0,
            f'slide_net.heads must divide d_model ({net.d_model}), got {net.heads}')
    require(net.transformer_layers >= 0 and net.gcn_layers >= 0,
            'slide_net.transformer_layers and gcn_layers must be >= 0')
    require(net.attention in ('dense', 'graph'),
            f"slide_net.attention must be 'dense' or 'graph', got {net.attention!r}")
    require(net.pooling in ('mean', 'gated'),
            f"slide_net.pooling must be 'mean' or 'gated', got {net.pooling!r}")
    require(net.mlp_hidden >= 1, f'slide_net.mlp_hidden must be >= 1, got {net.mlp_hidden}')
    require(0 <= net.dropout < 1, f'slide_net.dropout must be in [0, 1), got {net.dropout}')
    train = config.train
    require(train.batch_slides >= 1, f'train.batch_slides must be >= 1, got {train.batch_slides}')
    require(train.optimizer in ('adam', 'adamw'),
            f"train.optimizer must be 'adam' or 'adamw', got {train.optimizer!r}")
    require(train.lr > 0, f'train.lr must be > 0, got {train.lr}')
    require(train.max_steps >= 1, f'train.max_steps must be >= 1, got {train.max_steps}')
    require(train.class_weights in ('none', 'balanced'),
            f"train.class_weights must be 'none' or 'balanced', got {train.class_weights!r}")
    require(train.log_every_epochs >= 1,
            f'train.log_every_epochs must be >= 1, got {train.log_every_epochs}')
    unknown_splits = [s for s in config.eval.splits if s not in cohort_lib.SPLITS]
    require(not unknown_splits, f'eval.splits: unknown split(s) {unknown_splits}; '
                                f'splits are {", ".join(cohort_lib.SPLITS)}')
    require(config.extract.checkpoint in ('best', 'latest'),
            f"extract.checkpoint must be 'best' or 'latest', got {config.extract.checkpoint!r}")
    require(config.eval.checkpoint in ('best', 'latest'),
            f"eval.checkpoint must be 'best' or 'latest', got {config.eval.checkpoint!r}")
    require(not config.predict.manifest or os.path.isfile(config.predict.manifest),
            f'predict.manifest: file not found: {config.predict.manifest}')
    require(config.eval.top_patches >= 0,
            f'eval.top_patches must be >= 0, got {config.eval.top_patches}')
    problems += comparison.problems(config)
    require(config.mesh.data == -1 or config.mesh.data >= 1,
            f'mesh.data must be -1 (all devices) or >= 1, got {config.mesh.data}')
    return problems


def prepare_cohort(config, workdir: pathlib.Path) -> tuple[cohort_lib.Cohort, pathlib.Path]:
    """The validated, split cohort (also written to <workdir>/cohort.csv) and its manifest
    (`data.manifest`, or the generated cohort's)."""
    manifest = config.data.manifest
    if not manifest:
        spec = config.data.synthetic
        manifest = workdir / 'synthetic' / 'manifest.csv'
        if sharding.is_leader():
            logging.info('data.manifest is empty: generating %d synthetic slides', spec.num_slides)
            synthetic_cohort.make_cohort(manifest.parent, spec.num_slides,
                                         tuple(config.data.classes), seed=spec.seed,
                                         width=spec.width, height=spec.height,
                                         workers=config.workers,
                                         motif_fraction=tuple(spec.motif_fraction),
                                         artifacts=tuple(spec.artifacts), sites=spec.sites,
                                         site_follows_label=tuple(spec.site_follows_label),
                                         split_fractions=tuple(config.data.split_fractions))
        sharding.barrier('pathjax synthetic cohort')
    try:
        cohort = cohort_lib.load_cohort(manifest, tuple(config.data.classes),
                                        fractions=tuple(config.data.split_fractions),
                                        folds=config.data.folds, fold=max(config.data.fold, 0),
                                        seed=config.data.split_seed,
                                        fold_by=config.data.fold_by,
                                        slides_required=not feature_sources.importing(config))
    except cohort_lib.ManifestError as error:
        raise UsageError(str(error)) from None
    for _, why in cohort.skipped:
        logging.warning('skipping %s', why)
    for note in cohort.notes:
        logging.warning('%s', note)
    if sharding.is_leader():
        artifacts.save_text(workdir / 'cohort.csv', cohort_lib.cohort_csv(cohort))
    counts = {name: len(cohort.split(name)) for name in cohort_lib.SPLITS}
    logging.info('cohort: %d slides (%s), %d skipped', len(cohort.slides),
                 ', '.join(f'{n} {name}' for name, n in counts.items()), len(cohort.skipped))
    return cohort, pathlib.Path(manifest)


def set_backend_flags(config) -> None:
    """XLA's flags from the config (deterministic ops, the CPU device count), set before anything
    can start JAX's backend, which reads them once: the config's own checks do (a ViT weights
    file is checked against the preset's parameter shapes through JAX)."""
    if config.deterministic:
        determinism.enable_deterministic_ops()
    count = cpu_devices.expose(config)
    if count:
        logging.info('%d CPU device(s) per process (config.cpu_devices; used on CPU only)', count)


def run(config, workdir: str | os.PathLike, stages: list[str] | None = None) -> int:
    """Runs the pipeline; returns the process exit status (0 = completed)."""
    resolve_tile_defaults(config)
    set_backend_flags(config)
    problems = check_config(config)
    unknown = [s for s in stages or [] if s not in stage_names()]
    if unknown:
        problems.append(f'--stages: unknown stage(s) {", ".join(unknown)}; '
                        f'stages are {", ".join(stage_names())}')
    names = [s.name for s in stages_of(config)] + [PREDICT]
    other = [s for s in stages or [] if s not in names and s not in unknown]
    if other:
        problems.append(f'--stages: {", ".join(other)} do(es) not run '
                        + ('with features.import_dir (features from another tool)'
                           if feature_sources.importing(config) else
                           'without features.import_dir') + f'; the stages are {", ".join(names)}')
    predicting = PREDICT in (stages or [])
    if predicting and not config.predict.manifest:
        problems.append('--stages predict needs the new slides: '
                        '--config.predict.manifest=<csv with slide_id, path[, label, case_id]>')
    if problems:
        raise UsageError('invalid configuration:\n  ' + '\n  '.join(problems))
    config.workers = resolve_workers(config.workers)
    workdir = pathlib.Path(workdir)
    sharding.initialize_distributed(**config.distributed)
    with contextlib.ExitStack() as lock:
        failure = None
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            lock.enter_context(workdir_lock.hold(workdir, jax.process_index()))
            if sharding.is_leader():
                artifacts.save_text(workdir / 'config.json',
                                    config.to_json_best_effort(indent=2) + '\n')
        except UsageError as error:
            failure = error
        except OSError as error:
            failure = UsageError(f'cannot write to the workdir {workdir}: '
                                 f'{describe_os_error(error)}')
        sharding.raise_together(failure)
        shared_workdir.check(workdir)  # every process sees process 0's workdir
        if config.compilation_cache:
            compilation_cache.enable(workdir)
        summary = RunSummary()
        try:
            run_locked(config, workdir, stages, summary)
        finally:
            if sharding.is_leader() and summary.stages:
                console.show(summary.lines(workdir))
    return 0


def run_locked(config, workdir: pathlib.Path, stages: list[str] | None,
               summary: RunSummary | None = None) -> None:
    """The run, in a workdir that this run holds (`workdir_lock`); each stage timed into
    `summary`."""
    run_stages_timed = functools.partial(run_stages, summary=summary)
    predicting = PREDICT in (stages or [])
    if predicting and cross_validation.is_cross_validation(config):
        _, manifest = prepare_cohort(config, workdir)
        first = config.compare.models[0] if config.compare.models else None  # the fold's own
        cross_validation.deploy(comparison.model_config(config, first) if first else config,
                                workdir, manifest, functools.partial(run_predict, summary=summary))
        write_report_page(workdir)
    elif cross_validation.is_cross_validation(config):
        cohort, manifest = prepare_cohort(config, workdir)
        comparing = bool(config.compare.models)
        cross_validation.run(config, workdir, stages, manifest, cohort,
                             comparison.fold_runner(config, run_stages_timed) if comparing
                             else run_stages_timed, settings_fields(config) + ['compare'])
        if comparing and sharding.is_leader():
            comparison.summarize(workdir, cohort, config)
        write_report_page(workdir)
    else:
        training = [s for s in stages or [] if s != PREDICT]
        if training or not predicting:
            run_stages(config, workdir, training, summary)
        if predicting:
            run_predict(config, workdir, summary)


def run_stages(config, workdir: pathlib.Path, stages: list[str] | None,
               summary: RunSummary | None = None) -> None:
    """The cohort, then the chosen stages (all when `stages` is empty) in order, in `workdir`
    (each timed into `summary`); raises StageError or UsageError (on every process) when one
    cannot go on."""
    summary = summary or RunSummary()
    cohort, _ = prepare_cohort(config, workdir)
    fields = []
    for stage in stages_of(config):
        fields += stage.settings
        if stages and stage.name not in stages:
            continue
        # Every failure goes through raise_together, so no process waits for one that stopped.
        failure = None
        if sharding.is_leader():
            _, failure = _attempt(stage.name, provenance.check_and_record, workdir, stage.name,
                                  provenance.settings_of(config, fields), stage.artifacts)
            if not failure and stage.redo:
                _, failure = _attempt(stage.name, forget_if_slides_changed, stage, workdir,
                                      cohort)
        sharding.raise_together(failure)
        logging.info('stage %s', stage.name)
        with summary.timed(stage.name, workdir):
            entries = None
            if stage.every_process or sharding.is_leader():
                entries, failure = _attempt(stage.name, stage.run, config, workdir, cohort)
            if entries is not None and sharding.is_leader():
                report = stage_report.write_report(workdir, stage.name, entries)
                if not any(e.status == stage_report.OK for e in entries):
                    failure = StageError(f'{stage.name}: no slide could be processed; see '
                                         f'{report}')
            sharding.raise_together(failure)
    write_report_page(workdir)


def forget_if_slides_changed(stage: Stage, workdir: pathlib.Path, cohort: cohort_lib.Cohort
                             ) -> None:
    """(Process 0) Deletes `stage.redo` when a training or validation slide changed since the
    stage last started here, naming the slides; records the slides' digests."""
    digests = {r.slide_id: tile_stage.tiles_digest(workdir, r.slide_id)
               for r in cohort.slides if r.split in ('train', 'val')}
    changed = provenance.changed_slides(workdir, stage.name, digests)
    present = [folder for folder in stage.redo if (workdir / folder).exists()]
    if changed and present:
        logging.warning('%s: slide(s) %s changed since %s was made (see reports/tile.json); '
                        'making it again', stage.name, ', '.join(changed), ', '.join(present))
        for folder in present:
            shutil.rmtree(workdir / folder)


def write_report_page(workdir: pathlib.Path) -> None:
    """(Process 0) `<workdir>/report.html` from what the run has made so far."""
    if sharding.is_leader():
        logging.info('report: %s', report_page.write(workdir))


def run_predict(config, workdir: pathlib.Path, summary: RunSummary | None = None) -> None:
    """The predict stage (`predict_stage`): its steps in `<workdir>/predict/`, each on every
    process (timed into `summary`), stopping all processes together when one cannot go on."""
    summary = summary or RunSummary()
    cohort, failure = _attempt(PREDICT, predict_stage.load_cohort, config)
    sharding.raise_together(failure)
    if sharding.is_leader():
        settings = provenance.settings_of(config, settings_fields(config, 'train_slide'))
        _, failure = _attempt(PREDICT, predict_stage.prepare_folder, config, workdir, cohort,
                              settings)
    sharding.raise_together(failure)
    folder = predict_stage.predict_dir(workdir)
    for name, step in predict_stage.steps(config, workdir):
        logging.info('predict: %s', name)
        with summary.timed(name, folder):
            entries, failure = _attempt(f'{PREDICT} {name}', step, config, folder, cohort)
            if entries is not None and sharding.is_leader():
                report = stage_report.write_report(folder, name, entries)
                if not any(e.status == stage_report.OK for e in entries):
                    failure = StageError(f'{PREDICT} {name}: no slide could be processed; see '
                                         f'{report}')
            sharding.raise_together(failure)
    write_report_page(workdir)


def _attempt(stage: str, function: Callable, *args
             ) -> tuple[Any, StageError | UsageError | None]:
    """(function(*args), None), or (None, the StageError or UsageError it raised). Any other
    exception (a bug, an unforeseen failure) is logged with its traceback and returned as a
    StageError naming `stage`, so every process stops together instead of waiting for this one."""
    try:
        return function(*args), None
    except (StageError, UsageError) as error:
        return None, error
    except OSError as error:  # a full disk, a lost mount: the file and the reason say it all
        logging.error('%s: %s', stage, describe_os_error(error))
        return None, StageError(f'{stage}: {describe_os_error(error)} (on process '
                                f'{jax.process_index()})')
    except Exception as error:  # noqa: BLE001 (reported, and the run stops on every process)
        logging.exception('%s: unexpected error (traceback below)', stage)
        return None, StageError(f'{stage}: unexpected {type(error).__name__} on process '
                                f'{jax.process_index()}: {error}')
