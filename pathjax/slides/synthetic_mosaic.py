"""Real-size synthetic slides (level 0 of 100,000 px and more) for full-size runs: `MosaicSlide`
lays out a few rendered texture blocks inside a coarse tissue mask and makes any band of rows,
so that `slide_writer.write_streamed_slide` writes the slide without ever holding it whole."""

import dataclasses
import math

import numpy as np
from PIL import Image

from pathjax.slides import synthetic, synthetic_fields

_MASK_UM = 32.0  # microns per cell of a mosaic slide's tissue-mask grid


class MosaicSlide:
    """A real-size slide made row by row from a few rendered texture blocks, for full-size runs.

    Level 0 (`spec`'s size and mpp) is a grid of `cell_size`-px squares, each cut at a random
    offset from one of `blocks` texture blocks (`synthetic.render_texture`: block_size^2 px of
    tissue with the existing morphology, the class motif on positive slides, one stain per
    slide), in one of 4 orientations (as is, flipped, transposed, rotated), shown inside a coarse
    irregular tissue mask (islands around 1-3 centres, `tissue_fraction` of the slide, bilinear
    edges at 32 um) over the slide's glass (its white level and sensor noise). Held: the blocks,
    each also transposed (blocks x 2 x block_size^2 x 3 bytes), and the mask grid; `rows` makes
    any band.
    """

    def __init__(self, spec: synthetic.SyntheticSlideSpec, *, blocks: int = 4,
                 block_size: int = 4096, cell_size: int = 2048, tissue_fraction: float = 0.6):
        if not 0 < cell_size <= block_size or blocks < 1 or not 0 < tissue_fraction <= 1:
            raise ValueError(f'bad mosaic: {blocks} blocks of {block_size} px, cells of '
                             f'{cell_size} px, tissue fraction {tissue_fraction}')
        if spec.artifacts or spec.site >= 0:
            raise ValueError(f'a mosaic slide has neither artifacts nor a staining site (render '
                             f'slides of the usual size for those): got artifacts '
                             f'{spec.artifacts}, site {spec.site}')
        self.spec, self.cell_size = spec, cell_size
        _, white = synthetic.texture_stain(spec.seed)  # the stain of the blocks
        rng = np.random.default_rng([spec.seed, 1])
        self._blocks = []  # (block, its transpose), uint8 [block_size, block_size, 3] each
        for i in range(blocks):
            block_spec = dataclasses.replace(spec, width=block_size, height=block_size,
                                             seed=int(rng.integers(2**63)))
            block = synthetic.render_texture(block_spec, spec.seed)
            self._blocks.append((block, np.ascontiguousarray(block.transpose(1, 0, 2))))
        cells = (-(-spec.height // cell_size), -(-spec.width // cell_size))
        self._choice = rng.integers(blocks, size=cells)
        self._orientation = rng.integers(4, size=cells)  # bit 0: transposed, bit 1: flipped
        self._offset = rng.integers(block_size - cell_size + 1, size=cells + (2,))  # (y, x)
        noise = rng.standard_normal((cell_size, cell_size), dtype=np.float32)
        glass = white * np.exp(0.006 * noise)[..., None]  # Beer-Lambert of no stain
        self._glass = np.minimum(glass, 255).astype(np.uint8)
        self._mask_px = _MASK_UM / spec.mpp  # level-0 px per mask cell
        grid = (math.ceil(spec.height / self._mask_px), math.ceil(spec.width / self._mask_px))
        field = synthetic_fields.tissue_field(rng, *grid)
        field = (field + 0.02 * synthetic_fields.noise(rng, grid, 12)).astype(np.float32)
        self._threshold = float(np.quantile(field, 1 - tissue_fraction))
        self.tissue_fraction = float((field >= self._threshold).mean())
        self._grid, self._field = field, Image.fromarray(field)  # [gh, gw]; as a PIL 'F' image

    def rows(self, top: int, height: int) -> np.ndarray:
        """Level-0 rows [top, top + height): uint8 [height, width, 3]."""
        c = self.cell_size
        out = np.empty((height, self.spec.width, 3), np.uint8)
        for row in range(top // c, (top + height - 1) // c + 1):
            y0, y1 = max(top, row * c), min(top + height, (row + 1) * c)
            for col in range(len(self._choice[row])):
                x0, x1 = col * c, min(self.spec.width, (col + 1) * c)
                target = out[y0 - top:y1 - top, x0:x1]
                glass = self._glass[y0 - row * c:y1 - row * c, :x1 - x0]
                uniform = self._uniform(y0, y1, x0, x1)
                if uniform is False:
                    target[...] = glass
                    continue
                target[...] = self._texture(row, col)[y0 - row * c:y1 - row * c, :x1 - x0]
                if uniform is None:
                    np.copyto(target, glass, where=~self.tissue(y0, y1, x0, x1)[..., None])
        return out

    def tissue(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The tissue mask of level-0 rows [y0, y1) and columns [x0, x1): bool [y1-y0, x1-x0]."""
        m = self._mask_px
        field = self._field.resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR,
                                   box=(x0 / m, y0 / m, x1 / m, y1 / m))
        return np.asarray(field) >= self._threshold

    def _uniform(self, y0: int, y1: int, x0: int, x1: int) -> bool | None:
        """True / False when the area is all tissue / all glass (the mask grid's cells around it
        are all above / below the threshold: bilinear values stay within their range), else
        None."""
        m = self._mask_px
        cells = self._grid[max(int(y0 / m) - 1, 0):int(y1 / m) + 2,
                           max(int(x0 / m) - 1, 0):int(x1 / m) + 2]
        if cells.min() >= self._threshold:
            return True
        if cells.max() < self._threshold:
            return False
        return None

    def _texture(self, row: int, col: int) -> np.ndarray:
        """The cell's texture, a view [cell_size, cell_size, 3] of a block."""
        orientation, (y, x) = self._orientation[row, col], self._offset[row, col]
        block = self._blocks[self._choice[row, col]][orientation & 1]
        if orientation & 2:
            block = block[::-1]
        return block[y:y + self.cell_size, x:x + self.cell_size]
