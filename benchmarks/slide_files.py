"""Synthetic slide files, cohorts and configs for the benchmarks (pathjax.slides.synthetic).

Rendering costs about 0.3 us per level-0 pixel on one core, so large benchmark slides repeat one
rendered block of tissue (`block`): the file's size, pyramid and JPEG tiles are those of a real
slide of that size, and its content a mosaic of one synthetic field.
"""

import importlib.util
import os
import pathlib

import numpy as np
import openslide

from pathjax.cohort import Cohort, SlideRecord
from pathjax.slides import slide_writer, synthetic

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'


def write_slide(path, width: int, height: int, *, mpp: float = 0.5, fmt: str = 'svs',
                block: int | None = None, seed: int = 1) -> pathlib.Path:
    """Writes a synthetic slide of width x height level-0 pixels; with `block`, one
    block x block render repeated to that size."""
    side_w, side_h = (width, height) if block is None else (min(block, width), min(block, height))
    spec = synthetic.SyntheticSlideSpec('bench', 'bench', 'positive', True, mpp, fmt, side_w,
                                        side_h, seed=seed)
    image = synthetic.render_slide(spec)
    if (side_w, side_h) != (width, height):
        repeats = (-(-height // side_h), -(-width // side_w), 1)
        image = np.tile(image, repeats)[:height, :width]
    path = pathlib.Path(path)
    slide_writer.write_slide(path, image, mpp, fmt)
    return path


def cohort(path, copies: int, folder) -> Cohort:
    """A cohort of `copies` slides that are hard links to one file (each read as its own slide),
    all in the training split."""
    path, folder = pathlib.Path(path), pathlib.Path(folder)
    records = []
    for i in range(copies):
        linked = folder / f'slide{i}{path.suffix}'
        if not linked.exists():
            os.link(path, linked)
        records.append(SlideRecord(f'slide{i}', str(linked), 'positive', f'case{i}', 'train',
                                   line=i + 2))
    return Cohort(slides=tuple(records), skipped=())


def level0_bytes(path) -> int:
    """Bytes of the slide's level-0 RGB pixels (what a reader that never holds a slide avoids)."""
    with openslide.OpenSlide(str(path)) as slide:
        width, height = slide.dimensions
    return 3 * width * height


def config(**overrides):
    """configs/default.py (the method's settings) with dotted overrides, e.g.
    config(**{'feature_net.width': 0.125}); loaded by path, so no sys.path setup is needed."""
    spec = importlib.util.spec_from_file_location('configs_default', CONFIGS / 'default.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.get_config()
    for dotted, value in overrides.items():
        *parents, field = dotted.split('.')
        holder = result
        for parent in parents:
            holder = holder[parent]
        holder[field] = value
    from pathjax.models.patch.feature_net import resolve_tile_defaults
    resolve_tile_defaults(result)  # as the pipeline does
    return result
