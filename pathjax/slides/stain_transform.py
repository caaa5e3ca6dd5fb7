"""A slide's stain normalization, whatever the method, as its tiles file stores it.

`stain.method` picks a module with one interface: slide_statistics(tissue pixels uint8 [N, 3]),
reference(statistics of several slides), fit(slide statistics, reference) -> the transform's
arrays (named stain_*), apply(images, transform). 'histogram' is `stain` (per-channel lookup
tables), 'macenko' `stain_macenko` (one 3x3 map in optical density), 'reinhard' `stain_reinhard`
(an affine map in Lab); 'none' is the identity. A tiles file holds `stain_method` and the arrays;
files written before the other methods existed hold only `stain_lut` (histogram or identity).
"""

import dataclasses
import functools
import hashlib

import numpy as np

from pathjax.slides import stain, stain_macenko, stain_reinhard

MODULES = {'histogram': stain, 'macenko': stain_macenko, 'reinhard': stain_reinhard}
METHODS = (*MODULES, 'none')
TRANSFORM_KEYS = {'histogram': ('stain_lut',), 'macenko': ('stain_od_matrix',),
                  'reinhard': ('stain_lab_scale', 'stain_lab_shift'), 'none': ()}


@dataclasses.dataclass(frozen=True)
class SlideStain:
    """One slide's stain transform: the method and its arrays ({} for 'none')."""

    method: str
    arrays: dict[str, np.ndarray]

    @classmethod
    def identity(cls) -> 'SlideStain':
        return cls('none', {})

    @classmethod
    def from_tiles(cls, tiles: dict[str, np.ndarray]) -> 'SlideStain':
        """From the arrays of a tiles file; a damaged or unknown transform is a ValueError."""
        method = str(tiles['stain_method']) if 'stain_method' in tiles else 'histogram'
        if method not in METHODS:
            raise ValueError(f'unknown stain method {method!r} (known: {", ".join(METHODS)})')
        missing = [k for k in TRANSFORM_KEYS[method] if k not in tiles]
        if missing:
            raise ValueError(f'the {method} stain transform lacks {", ".join(missing)}')
        arrays = {k: np.asarray(tiles[k]) for k in TRANSFORM_KEYS[method]}
        if method == 'histogram':
            arrays = {'stain_lut': stain.checked_lut(arrays['stain_lut'])}
            if np.array_equal(arrays['stain_lut'], stain.IDENTITY_LUT):
                return cls.identity()
        slide_stain = cls(method, arrays)
        slide_stain.apply(np.zeros((1, 1, 3), np.uint8))  # checks the arrays' shapes and values
        return slide_stain

    def to_tiles(self) -> dict[str, np.ndarray]:
        """The arrays a tiles file stores."""
        return {'stain_method': np.asarray(self.method), **self.arrays}

    def apply(self, images: np.ndarray) -> np.ndarray:
        """uint8 [..., 3] -> uint8 [..., 3], contiguous (the identity returns them as they are)."""
        if self.method == 'none':
            return np.ascontiguousarray(images, dtype=np.uint8)
        return MODULES[self.method].apply(images, self.arrays)

    def copy_into(self, pixels: np.ndarray, out: np.ndarray) -> None:
        """out[...] = apply(pixels), for uint8 [h, w, 3] pixels and out (views whose rows are
        contiguous will do); the histogram's lookup writes straight into `out`. Every method is
        pixelwise, so a patch may be written piece by piece."""
        if self.method == 'none':
            out[...] = pixels
        elif self.method == 'histogram':
            stain.copy_through_lut(pixels, out, self._opencv_lut)
        else:
            out[...] = self.apply(pixels)

    @functools.cached_property
    def _opencv_lut(self) -> np.ndarray:
        return stain.opencv_lut(self.arrays['stain_lut'])

    def digest(self) -> bytes:
        """What the transform is, as a short digest."""
        digest = hashlib.blake2b(self.method.encode(), digest_size=16)
        for name in sorted(self.arrays):
            digest.update(name.encode() + np.ascontiguousarray(self.arrays[name]).tobytes())
        return digest.digest()
