"""Where the slide model's features come from: the extract stage's files, or another tool's.

With `features.import_dir` set, each slide's features are read from `<import_dir>/<slide_id>.h5`,
a file written by TRIDENT, CLAM or STAMP (`interop.h5_features`); otherwise from the workdir's
`features/<slide_id>.npz` (`features.NativeFeatures`). A new slide to predict is read from
`predict.import_dir` when it is set.
"""

import dataclasses
import json
import pathlib

import numpy as np

from pathjax.cohort import SlideRecord
from pathjax.data.features import FeatureSource, NativeFeatures, SlideBag
from pathjax.interop import h5_features
from pathjax.slide_paths import slide_file
from pathjax.slides import source_file


def layout_path(workdir, slide_id: str) -> pathlib.Path:
    """`imported/<slide_id>.npz`: written by the import stage when a slide's file passed its
    checks, with the slide's level-0 size and patch side (the tiles file's fields that heatmaps
    and top patches read)."""
    return slide_file(workdir, 'imported', slide_id, '.npz')


def importing(config) -> bool:
    """True when the slides' features come from another tool's files."""
    return bool(config.features.import_dir)


@dataclasses.dataclass(frozen=True)
class ImportedFeatures:
    """A slide's features file written by another tool. `format`: 'auto' or one of
    `h5_features.FORMATS`; `patch_size_level0`: a CLAM file's patch side in level-0 pixels; `mpp`:
    the manifest's microns per level-0 pixel (0: the file's, if it records one)."""

    slide_id: str
    path: pathlib.Path
    format: str
    patch_size_level0: float
    mpp: float
    layout: pathlib.Path  # the import stage's `layout_path`: the slide passed its checks
    redo_hint = 'import features of one encoder'

    def available(self) -> bool:
        return self.path.exists() and self.layout.exists()

    def inspect(self) -> h5_features.FeatureFileInfo:
        """The file's layout from its headers (FeatureFileError when it is not usable)."""
        return h5_features.inspect(self.path, self.format, self.patch_size_level0)

    def reading(self) -> str:
        return json.dumps({'format': self.format, 'patch_size_level0': self.patch_size_level0,
                           'mpp': self.mpp}, sort_keys=True)

    def digest(self) -> np.ndarray:
        """The file's fingerprint: its size and first and last MiB (headers and first rows)."""
        return np.frombuffer(bytes.fromhex(source_file.fingerprint(self.path)), np.uint8)

    def read(self) -> tuple[h5_features.FeatureFileInfo, h5_features.ImportedPatches]:
        info = self.inspect()
        return info, h5_features.read(info, self.mpp)

    def load(self) -> SlideBag:
        _, patches = self.read()
        return SlideBag(self.slide_id, patches.features, patches.coords, patches.grid)

    def network(self) -> str:
        return self.inspect().encoder


@dataclasses.dataclass(frozen=True)
class Sources:
    """Resolves a slide's `FeatureSource`: in `workdir`, or in `import_dir` when it is set."""

    workdir: pathlib.Path
    import_dir: str = ''
    format: str = 'auto'
    patch_size_level0: float = 0.0

    @classmethod
    def from_config(cls, config, workdir, predicting: bool = False) -> 'Sources':
        """The sources of a run's slides (`predicting`: of new slides to predict)."""
        folder = (config.predict.import_dir if predicting else '') or config.features.import_dir
        return cls(pathlib.Path(workdir), folder, config.features.format,
                   float(config.features.patch_size_level0))

    def of(self, record: SlideRecord) -> FeatureSource:
        if not self.import_dir:
            return NativeFeatures(self.workdir, record.slide_id)
        return ImportedFeatures(record.slide_id,
                                slide_file(self.import_dir, '', record.slide_id, '.h5'),
                                self.format, self.patch_size_level0, record.level0_mpp or 0.0,
                                layout_path(self.workdir, record.slide_id))

    def describe(self) -> str:
        """Where the features come from, in words (for logs and the report)."""
        if not self.import_dir:
            return f'the extract stage ({self.workdir / "features"})'
        return f'{self.import_dir} (format {self.format})'
