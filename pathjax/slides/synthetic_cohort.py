"""A synthetic cohort: its slides' specs (`cohort_specs`), rendered and written with a manifest
(`make_cohort`). Cases alternate between two classes; with staining sites, each site has one
stain, drawn from wider ranges than a slide's own, and each case a site that follows its label
with a set chance, in train/val and in test, as submitting sites do in TCGA."""

import concurrent.futures
import csv
import dataclasses
import io
import multiprocessing
import pathlib

import numpy as np
from absl import logging

from pathjax import artifacts as artifacts_lib
from pathjax import cohort as cohort_lib
from pathjax.progress import Progress
from pathjax.slides import slide_writer, synthetic
from pathjax.slides.slide_writer import FORMATS
from pathjax.slides.synthetic import MOTIF_FRACTION, SITE_TAG, SyntheticSlideSpec
from pathjax.slides.synthetic_artifacts import ARTIFACTS

MPPS = (0.25, 0.5)  # level-0 microns per pixel, cycled within each class
MANIFEST_COLUMNS = ('slide_id', 'path', 'label', 'case_id')
SITE_COLUMNS = ('site', 'split')  # added to the manifest of a cohort with staining sites
SITE_FOLLOWS_LABEL = (0.8, 0.5)  # chance a case is at its label's site (train/val, test)
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)  # with sites: the generator's split (train, val, test)


def cohort_specs(num_slides: int, classes=('negative', 'positive'), *, seed: int = 0,
                 width: int = 4096, height: int = 3072, slides_per_case: int | None = None,
                 formats=FORMATS, motif_fraction: tuple[float, float] = MOTIF_FRACTION,
                 artifacts=(), sites: int = 0,
                 site_follows_label: tuple[float, float] = SITE_FOLLOWS_LABEL,
                 split_fractions: tuple[float, float, float] = SPLIT_FRACTIONS
                 ) -> list[SyntheticSlideSpec]:
    """The slides of a synthetic cohort, in manifest order.

    Cases alternate between the classes (classes[1] carries the motif), so any num_slides >= 2
    has both. slides_per_case=None mixes: about a quarter of cases hold 2 slides (same case and
    label). Format and mpp cycle within each class, so neither tells the class. Every slide
    carries `artifacts` (any of ARTIFACTS). With `sites` >= 2 the cohort is split
    (`split_fractions`, by case, stratified by label: `cohort.split_by_case`) and each case put
    at a staining site: a case of class index y at site y mod sites with chance
    site_follows_label[0] in train and val, [1] in test, else at one of the other sites
    (uniformly); the slides take their site's stain (`synthetic.site_stains`). sites=0: no
    splits, a stain per slide. Everything is deterministic from `seed`.
    """
    if len(classes) != 2:
        raise ValueError(f'a synthetic cohort has exactly 2 classes, got {classes}')
    if num_slides < 0 or (slides_per_case is not None and slides_per_case < 1):
        raise ValueError(f'bad num_slides {num_slides} or slides_per_case {slides_per_case}')
    unknown = sorted(set(artifacts) - set(ARTIFACTS))
    if unknown:
        raise ValueError(f'unknown artifact(s) {unknown}; choose from {ARTIFACTS}')
    if sites < 0 or sites == 1:
        raise ValueError(f'sites must be 0 (a stain per slide) or >= 2, got {sites}')
    drawn = tuple(a for a in ARTIFACTS if a in artifacts)
    specs, per_class, case = [], [0, 0], 0
    while len(specs) < num_slides:
        label = case % 2
        count = slides_per_case or (2 if case % 8 in (2, 7) else 1)
        for _ in range(min(count, num_slides - len(specs))):
            k, j = per_class[label], len(specs)
            per_class[label] += 1
            specs.append(SyntheticSlideSpec(
                slide_id=f'syn{seed}_{j:04d}', case_id=f'syn{seed}_case{case:04d}',
                label=classes[label], positive=bool(label), mpp=MPPS[k // len(formats) % len(MPPS)],
                fmt=formats[k % len(formats)], width=width, height=height,
                seed=int(np.random.SeedSequence([seed, j]).generate_state(1)[0]),
                motif_fraction=tuple(motif_fraction), artifacts=drawn))
        case += 1
    if sites:
        specs = _place_at_sites(specs, classes, seed, sites, site_follows_label, split_fractions)
    return specs


def _place_at_sites(specs, classes, seed, sites, site_follows_label, split_fractions):
    """The specs with their split and site (see cohort_specs): splits dealt by
    cohort.split_by_case, sites drawn per case in manifest order, both from `seed`."""
    chances = tuple(site_follows_label)
    if len(chances) != 2 or not all(0 <= p <= 1 for p in chances):
        raise ValueError(f'site_follows_label must be (train/val, test) chances in [0, 1], '
                         f'got {chances}')
    records = [cohort_lib.SlideRecord(slide_id=s.slide_id, path='', label=s.label,
                                      case_id=s.case_id, split='', line=i + 2)
               for i, s in enumerate(specs)]
    split_seed = int(np.random.SeedSequence([seed, SITE_TAG, 3, 1]).generate_state(1)[0])
    split_of = cohort_lib.split_by_case(records, tuple(split_fractions), split_seed)
    rng = np.random.default_rng(np.random.SeedSequence([seed, SITE_TAG, 2, 1]))
    site_of = {}
    for spec in specs:
        if spec.case_id in site_of:
            continue
        home = classes.index(spec.label) % sites
        chance = chances[0] if split_of[spec.case_id] in ('train', 'val') else chances[1]
        follows, other = rng.uniform() < chance, int(rng.integers(sites - 1))
        site_of[spec.case_id] = home if follows else (home + 1 + other) % sites
    stains = synthetic.site_stains(seed, sites)
    return [dataclasses.replace(spec, site=site_of[spec.case_id], split=split_of[spec.case_id],
                                site_stain=tuple(float(v) for v in stains[site_of[spec.case_id]]))
            for spec in specs]


def slide_file_name(spec: SyntheticSlideSpec) -> str:
    """The slide's file in a generated cohort: <slide_id>.<fmt>, the artifacts and site (what
    changes the pixels beyond the slide's seed) added before the suffix, e.g.
    syn0_0003-pen-fold-site1.svs, so that a cohort made with other settings is not reused."""
    variant = ''.join(f'-{a}' for a in spec.artifacts)
    variant += f'-site{spec.site}' if spec.site >= 0 else ''
    return f'{spec.slide_id}{variant}.{spec.fmt}'


def site_name(site: int) -> str:
    """A site's name in the manifest's `site` column."""
    return f'site{site}'


def _render_and_write(spec: SyntheticSlideSpec, path: pathlib.Path) -> None:
    slide_writer.write_slide(path, synthetic.render_slide(spec), spec.mpp, spec.fmt)


def make_cohort(out_dir, num_slides: int, classes=('negative', 'positive'), *, seed: int = 0,
                width: int = 4096, height: int = 3072, slides_per_case: int | None = None,
                formats=FORMATS, workers: int = 1,
                motif_fraction: tuple[float, float] = MOTIF_FRACTION, artifacts=(),
                sites: int = 0, site_follows_label: tuple[float, float] = SITE_FOLLOWS_LABEL,
                split_fractions: tuple[float, float, float] = SPLIT_FRACTIONS) -> pathlib.Path:
    """Renders and writes a synthetic cohort and out_dir/manifest.csv; returns the manifest path.

    Manifest columns: slide_id, path (absolute), label, case_id, and with sites >= 2 also site
    ('site0', 'site1', ...) and split ('train', 'val', 'test'). Deterministic from `seed`. A slide
    whose file exists is not rendered again (files are written atomically, named by
    `slide_file_name`); the others are rendered in `workers` processes. Layout: cohort_specs.
    """
    out_dir = pathlib.Path(out_dir).resolve()
    specs = cohort_specs(num_slides, classes, seed=seed, width=width, height=height,
                         slides_per_case=slides_per_case, formats=formats,
                         motif_fraction=motif_fraction, artifacts=artifacts, sites=sites,
                         site_follows_label=site_follows_label, split_fractions=split_fractions)
    paths = [out_dir / slide_file_name(spec) for spec in specs]
    todo = [(spec, path) for spec, path in zip(specs, paths) if not path.exists()]
    if todo:
        logging.info('rendering %d synthetic slides', len(todo))
        progress = Progress('synthetic slides', len(todo), 'slides')
        if workers <= 1:
            for spec, path in todo:
                _render_and_write(spec, path)
                progress.update()
        else:
            context = multiprocessing.get_context('spawn')
            with concurrent.futures.ProcessPoolExecutor(min(workers, len(todo)), context) as pool:
                for future in concurrent.futures.as_completed(
                        [pool.submit(_render_and_write, spec, path) for spec, path in todo]):
                    future.result()
                    progress.update()
        progress.close()
    text = io.StringIO()
    writer = csv.writer(text, lineterminator='\n')
    writer.writerow(MANIFEST_COLUMNS + (SITE_COLUMNS if sites else ()))
    for spec, path in zip(specs, paths):
        row = (spec.slide_id, str(path), spec.label, spec.case_id)
        writer.writerow(row + ((site_name(spec.site), spec.split) if sites else ()))
    manifest = out_dir / 'manifest.csv'
    artifacts_lib.save_text(manifest, text.getvalue())
    return manifest
