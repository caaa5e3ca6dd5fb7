"""Whether a split can be trained, judged from the tile scans before any training starts.

Training a split needs at least one full batch of training patches for the feature network
(when it learns: `learn.patches_per_slide` sampled from each training slide with tissue; not
with imported features), and
every class among the slides with tissue of its training, validation and test sets (the slide
model's training, its validation AUC and the test metrics need them). Cross-validation checks
every fold this way.
Found after the tile stage, a split that cannot be trained stops the run before hours of work on
the splits that can.
"""

from typing import Iterable

from pathjax.cohort import SPLITS, SlideRecord
from pathjax.data.feature_sources import Sources, importing
from pathjax.data.features import stored_arrays
from pathjax.interop.h5_features import FeatureFileError


def patch_counts(tile_files: dict[str, object]) -> dict[str, int]:
    """{slide id: kept patches} from tiles or scan files (their headers only); a slide whose
    file is missing (it failed to scan) counts 0."""
    counts = {}
    for slide_id, path in tile_files.items():
        try:
            counts[slide_id] = stored_arrays(path)['coords'].shape[0]
        except (OSError, KeyError, ValueError):
            counts[slide_id] = 0
    return counts


def imported_patch_counts(sources: Sources, records: Iterable[SlideRecord]) -> dict[str, int]:
    """{slide id: patches} from the headers of imported features files; a slide whose file is
    missing or unusable counts 0 (the import stage reports why)."""
    counts = {}
    for record in records:
        try:
            counts[record.slide_id] = sources.of(record).inspect().num_patches
        except (FeatureFileError, OSError):
            counts[record.slide_id] = 0
    return counts


def problems(config, records: Iterable[SlideRecord], counts: dict[str, int]) -> list[str]:
    """What stops this split from training, each with what would fix it ([] when it can)."""
    found = []
    with_tissue = [r for r in records if counts.get(r.slide_id, 0) > 0]
    if config.feature_net.learn and not importing(config):
        per_slide = config.learn.patches_per_slide
        patches = sum(min(per_slide, counts[r.slide_id]) for r in with_tissue if r.split == 'train')
        if patches < config.learn.batch_size:
            found.append(f'{patches} training patches, fewer than one batch '
                         f'(learn.batch_size={config.learn.batch_size}): lower learn.batch_size '
                         f'or raise learn.patches_per_slide ({per_slide})')
    for split in SPLITS:
        present = {r.label for r in with_tissue if r.split == split}
        missing = [c for c in config.data.classes if c not in present]
        if missing:
            found.append(f'{split} has no slide with tissue of class(es) '
                         f'{", ".join(map(repr, missing))}')
    return found
