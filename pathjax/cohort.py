"""The cohort manifest: reading, validation, and splits by case (patient).

A manifest is a CSV with columns `slide_id, path, label` and optional `case_id` (defaults to the
slide id), `split` (train / val / test), `mpp` (microns per level-0 pixel, overriding the slide's
metadata: scanners that write none or a wrong one) and `roi` (a GeoJSON file of polygons, e.g. a
QuPath export: only patches inside them are tiled) and `site` (the submitting site or scanner:
`fold_by='site'` keeps each site within one fold). Relative paths (slide and roi) are relative
to the manifest's folder. With features imported from another tool the slide path may be empty
(`paths_required` False): the slide file then only draws heatmaps, and one that is missing is
noted, not skipped.
Every bad row is reported with its line number before any work starts: an empty required field,
an unknown label, a slide id that is not a safe file name (`slide_paths.RULE`), a duplicate slide
id (or two that differ only in case), an unknown split or a case in two splits stops the run
(`ManifestError`); a missing or unreadable slide file, an `mpp` that is not a positive number or
a missing `roi` file only skips that slide (`Cohort.skipped`).
Without a split column, cases are split stratified by label and seeded, or by k-fold.
A manifest of new slides to predict (`load_new_slides`) may leave `label` empty or out; its
slides are in the split `PREDICT`.
"""

import collections
import csv
import dataclasses
import math
import os
import pathlib

import numpy as np

from pathjax import csv_cells, slide_paths

REQUIRED_COLUMNS = ('slide_id', 'path', 'label')
OPTIONAL_COLUMNS = ('case_id', 'split', 'mpp', 'roi', 'site')
SPLITS = ('train', 'val', 'test')
PREDICT = 'predict'  # the split of the slides of a prediction manifest
MAX_MANIFEST_BYTES = 256 << 20  # about a million rows; a larger file is refused before reading


class ManifestError(Exception):
    """The manifest cannot be used; `problems` holds one message per bad row or column."""

    def __init__(self, manifest: str, problems: list[str]):
        self.problems = problems
        super().__init__(f'{manifest}: {len(problems)} problem(s):\n  ' + '\n  '.join(problems))


@dataclasses.dataclass(frozen=True)
class SlideRecord:
    """One manifest row. `line` is its 1-based line number in the CSV (the header is line 1);
    `path` and `roi` are absolute ('' when not given); `mpp` is the manifest's text ('' when not
    given; `check_files` skips a slide whose mpp is not a positive number)."""

    slide_id: str
    path: str
    label: str
    case_id: str
    split: str
    line: int
    mpp: str = ''
    roi: str = ''
    site: str = ''

    @property
    def level0_mpp(self) -> float | None:
        """The manifest's microns per level-0 pixel, or None (the slide's metadata decides)."""
        return float(self.mpp) if self.mpp else None


@dataclasses.dataclass(frozen=True)
class Cohort:
    """Usable slides (with their split) and the rows skipped with the reason."""

    slides: tuple[SlideRecord, ...]
    skipped: tuple[tuple[SlideRecord, str], ...]
    notes: tuple[str, ...] = ()  # what the caller should warn about (a missing optional file)

    def split(self, name: str) -> tuple[SlideRecord, ...]:
        return tuple(s for s in self.slides if s.split == name)


def read_manifest(manifest: str | os.PathLike, classes: tuple[str, ...],
                  labels_required: bool = True, paths_required: bool = True) -> list[SlideRecord]:
    """Parses and validates every row; raises ManifestError listing all problems at once.
    With `labels_required` False the label column may be absent and a label empty (''); with
    `paths_required` False, likewise the path."""
    manifest = pathlib.Path(manifest)
    if not manifest.is_file():
        raise ManifestError(str(manifest), ['manifest file not found'])
    if manifest.stat().st_size > MAX_MANIFEST_BYTES:
        raise ManifestError(str(manifest), [f'the manifest has {manifest.stat().st_size} bytes, '
                                            f'more than {MAX_MANIFEST_BYTES} (not a manifest?)'])
    try:
        with open(manifest, newline='', encoding='utf-8-sig') as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ManifestError(str(manifest), [f'cannot read the manifest as CSV ({error})']) from None
    if not rows:
        raise ManifestError(str(manifest), ['the manifest is empty'])
    header = [name.strip() for name in rows[0]]
    required = tuple(c for c in REQUIRED_COLUMNS if (c != 'label' or labels_required)
                     and (c != 'path' or paths_required))
    missing = [c for c in required if c not in header]
    if missing:
        raise ManifestError(str(manifest), [f'line 1: missing column(s) {", ".join(missing)} '
                                            f'(found {", ".join(header)})'])
    column = {name: header.index(name) for name in REQUIRED_COLUMNS + OPTIONAL_COLUMNS
              if name in header}
    problems, records, first_of = [], [], {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank line
        if len(row) != len(header):
            problems.append(f'line {line}: {len(row)} fields, the header has {len(header)}')
            continue
        value = {name: row[i].strip() for name, i in column.items()}
        for name in ('label', 'path', 'mpp', 'roi', 'site'):
            value.setdefault(name, '')
        empty = [name for name in required if not value[name]]
        if empty:
            problems.append(f'line {line}: empty {", ".join(empty)}')
            continue
        if value['label'] not in classes and (labels_required or value['label']):
            problems.append(f'line {line}: slide {value["slide_id"]!r} has unknown label '
                            f'{value["label"]!r} (data.classes: {", ".join(classes)})')
        split = value.get('split', '')
        if 'split' in column and split not in SPLITS:
            problems.append(f'line {line}: slide {value["slide_id"]!r} has split {split!r}, '
                            f'expected one of {", ".join(SPLITS)}')
        id_problem = slide_paths.id_problem(value['slide_id'])
        if id_problem:
            problems.append(f'line {line}: {id_problem}')
            continue
        key = slide_paths.collision_key(value['slide_id'])
        if key in first_of:
            first, first_line = first_of[key]
            problems.append(
                f'line {line}: duplicate slide_id {value["slide_id"]!r} (first on line '
                f'{first_line})' if first == value['slide_id'] else
                f'line {line}: slide_id {value["slide_id"]!r} and {first!r} (line {first_line}) '
                f'differ only in case: one file on a case-insensitive file system')
            continue
        first_of[key] = value['slide_id'], line
        path, roi = (_slide_path(value[name], manifest.parent) if value[name] else ''
                     for name in ('path', 'roi'))
        bad = [why for why in (path, roi) if why and not isinstance(why, pathlib.Path)]
        if bad:
            problems.append(f'line {line}: slide {value["slide_id"]!r}: {bad[0]}')
            continue
        records.append(SlideRecord(slide_id=value['slide_id'], path=str(path), label=value['label'],
                                   case_id=value.get('case_id') or value['slide_id'],
                                   split=split, line=line, mpp=value['mpp'], roi=str(roi),
                                   site=value['site']))
    problems += _cases_in_two_splits(records)
    if not records and not problems:
        problems.append('the manifest has no slides')
    if problems:
        raise ManifestError(str(manifest), problems)
    return records


def _slide_path(path: str, folder: pathlib.Path) -> pathlib.Path | str:
    """A manifest's path, absolute (relative ones are relative to the manifest's `folder`), or
    why it cannot be a path."""
    if '\0' in path:
        return 'the path holds a NUL character'
    try:
        resolved = pathlib.Path(path).expanduser()
    except RuntimeError as error:  # ~user of an unknown user
        return f'path {path!r}: {error}'
    return resolved if resolved.is_absolute() else folder / resolved


def _cases_in_two_splits(records: list[SlideRecord]) -> list[str]:
    first = {}
    problems = []
    for record in records:
        if not record.split:
            continue
        seen = first.setdefault(record.case_id, record)
        if seen.split != record.split:
            problems.append(f'line {record.line}: case {record.case_id!r} is in split '
                            f'{record.split!r} but also in {seen.split!r} (line {seen.line})')
    return problems


def mpp_problem(text: str) -> str:
    """Why a manifest's mpp cell is not a usable microns per pixel ('' when it is, or empty)."""
    if not text:
        return ''
    try:
        value = float(text)
    except ValueError:
        return f'mpp {text!r} is not a number'
    return '' if math.isfinite(value) and value > 0 else f'mpp {text!r} is not a positive number'


def file_problem(path: str, what: str) -> str:
    """Why `path` is not a readable file ('' when it is); `what` names it in the message."""
    if not os.path.isfile(path):
        return f'{what} not found: {path}'
    if not os.access(path, os.R_OK):
        return f'{what} not readable: {path}'
    return ''


def check_files(records: list[SlideRecord], slides_required: bool = True
                ) -> tuple[list[SlideRecord], list[tuple[SlideRecord, str]], list[str]]:
    """Splits records into (usable, [(record, why skipped)], notes). A slide is skipped when its
    file (with `slides_required`), its roi file or its mpp is unusable; without `slides_required`
    a slide file that is missing is left out of the record (its path '') and noted instead."""
    usable, skipped, notes = [], [], []
    for record in records:
        where = f'line {record.line}: slide {record.slide_id!r}'
        slide = file_problem(record.path, 'file') if record.path else ''
        if slide and not slides_required:
            notes.append(f'{where}: slide {slide}; its heatmaps are drawn on a map of its patches')
            record, slide = dataclasses.replace(record, path=''), ''
        if not record.path and slides_required:
            slide = 'no slide file'
        why = (slide or mpp_problem(record.mpp)
               or (file_problem(record.roi, 'roi file') if record.roi else ''))
        if why:
            skipped.append((record, f'{where}: {why}'))
        else:
            usable.append(record)
    return usable, skipped, notes


def _case_labels(records: list[SlideRecord]) -> dict[str, str]:
    """Each case's label (its first slide's), in manifest order."""
    labels = {}
    for record in records:
        labels.setdefault(record.case_id, record.label)
    return labels


def _allocate(count: int, fractions: tuple[float, ...]) -> list[int]:
    """Splits `count` items into len(fractions) parts by largest remainder."""
    exact = np.asarray(fractions, np.float64) / np.sum(fractions) * count
    parts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - parts), kind='stable')[:count - parts.sum()]:
        parts[i] += 1
    return parts.tolist()


def split_by_case(records: list[SlideRecord], fractions: tuple[float, float, float],
                  seed: int) -> dict[str, str]:
    """Case id -> 'train' | 'val' | 'test', stratified by label and seeded."""
    rng = np.random.default_rng(seed)
    labels = _case_labels(records)
    assignment = {}
    for label in sorted(set(labels.values())):
        cases = [c for c, lab in labels.items() if lab == label]
        rng.shuffle(cases)
        start = 0
        for name, size in zip(SPLITS, _allocate(len(cases), fractions)):
            assignment.update({case: name for case in cases[start:start + size]})
            start += size
    return assignment


def kfold_by_case(records: list[SlideRecord], folds: int, seed: int) -> dict[str, int]:
    """Case id -> fold in [0, folds), stratified by label and seeded (label groups are dealt
    round-robin after shuffling, so folds differ in size by at most one case per label)."""
    rng = np.random.default_rng(seed)
    labels = _case_labels(records)
    assignment, offset = {}, 0
    for label in sorted(set(labels.values())):
        cases = [c for c, lab in labels.items() if lab == label]
        rng.shuffle(cases)
        assignment.update({case: (offset + i) % folds for i, case in enumerate(cases)})
        offset += len(cases)
    return assignment


def kfold_by_site(records: list[SlideRecord], folds: int, seed: int) -> dict[str, int]:
    """Case id -> fold in [0, folds) such that every site lies within one fold (slideflow's
    site-preserved cross-validation: where the submitting site follows the label, as in TCGA, a
    model cannot score by recognising the site). Sites are dealt, largest first (ties in a
    seeded order), each to the fold with the fewest slides so far.

    Raises:
      ManifestError: a slide without a site, a case at two sites, or fewer sites than folds.
    """
    problems, site_of = [], {}
    for record in records:
        if not record.site:
            problems.append(f'line {record.line}: slide {record.slide_id!r} has no site '
                            "(data.fold_by='site' needs a site column for every slide)")
            continue
        first = site_of.setdefault(record.case_id, record.site)
        if first != record.site:
            problems.append(f'line {record.line}: case {record.case_id!r} is at site '
                            f'{record.site!r} and at {first!r}')
    sizes = collections.Counter(r.site for r in records if r.site)
    if not problems and len(sizes) < folds:
        problems.append(f'{len(sizes)} site(s) ({", ".join(sorted(sizes))}) for data.folds='
                        f'{folds}: every fold needs a site of its own; lower data.folds or use '
                        "data.fold_by='case'")
    if problems:
        raise ManifestError('site-preserved folds', problems)
    rng = np.random.default_rng(seed)
    order = sorted(sizes, key=lambda s: (-sizes[s], rng.random()))
    load, fold_of_site = [0] * folds, {}
    for site in order:
        fold_of_site[site] = int(np.argmin(load))
        load[fold_of_site[site]] += sizes[site]
    return {case: fold_of_site[site] for case, site in site_of.items()}


def assign_splits(records: list[SlideRecord], *, fractions: tuple[float, float, float],
                  folds: int, fold: int, seed: int, fold_by: str = 'case') -> list[SlideRecord]:
    """Records with their split set. The manifest's own split column wins; otherwise with
    `folds` > 1, fold `fold` is the test set, the next fold the validation set and the rest
    training (folds of cases, or with `fold_by` 'site' of whole sites: `kfold_by_site`);
    otherwise cases are split by `fractions` (train, val, test)."""
    if all(r.split for r in records):
        return records
    if folds > 1:
        fold_of = (kfold_by_site if fold_by == 'site' else kfold_by_case)(records, folds, seed)
        name_of = {}
        for case, f in fold_of.items():
            name_of[case] = 'test' if f == fold else 'val' if f == (fold + 1) % folds else 'train'
    else:
        name_of = split_by_case(records, fractions, seed)
    return [dataclasses.replace(r, split=name_of[r.case_id]) for r in records]


def load_cohort(manifest: str | os.PathLike, classes: tuple[str, ...], *,
                fractions: tuple[float, float, float], folds: int, fold: int, seed: int,
                fold_by: str = 'case', slides_required: bool = True) -> Cohort:
    """Reads, validates and splits a manifest; missing files are skipped, not fatal. Without
    `slides_required` (imported features) a slide's path may be empty or missing."""
    records = read_manifest(manifest, classes, paths_required=slides_required)
    records = assign_splits(records, fractions=fractions, folds=folds, fold=fold, seed=seed,
                            fold_by=fold_by)
    usable, skipped, notes = check_files(records, slides_required)
    return Cohort(slides=tuple(usable), skipped=tuple(skipped), notes=tuple(notes))


def load_new_slides(manifest: str | os.PathLike, classes: tuple[str, ...],
                    slides_required: bool = True) -> Cohort:
    """The slides of a prediction manifest, all in split PREDICT, labels optional ('' when
    unknown); a split column is checked but not used; missing files are skipped, not fatal."""
    records = read_manifest(manifest, classes, labels_required=False,
                            paths_required=slides_required)
    records = [dataclasses.replace(r, split=PREDICT) for r in records]
    usable, skipped, notes = check_files(records, slides_required)
    return Cohort(slides=tuple(usable), skipped=tuple(skipped), notes=tuple(notes))


def cohort_csv(cohort: Cohort) -> str:
    """The resolved cohort (absolute paths, splits) as CSV text, for the record (`csv_cells`:
    no cell runs as a spreadsheet formula; `csv_cells.read` reads it back)."""
    return csv_cells.to_text([('slide_id', 'path', 'label', 'case_id', 'split', 'manifest_line',
                               'mpp', 'roi', 'site'),
                              *((s.slide_id, s.path, s.label, s.case_id, s.split, s.line, s.mpp,
                                 s.roi, s.site) for s in cohort.slides)])
