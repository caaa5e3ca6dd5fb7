"""The method's settings (CN115409783A as stated in DESIGN.md). Other configs override these.

Run: python launch.py --config configs/default.py --workdir <dir> --config.data.manifest=<csv>
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.workers = -1  # worker processes for slide reading; -1 = one per CPU core

    config.data = ml_collections.ConfigDict()
    config.data.manifest = ''  # CSV: slide_id, path, label[, case_id, split]
    config.data.classes = ('wild_type', 'mutant')  # label names; index = class id
    config.data.split_fractions = (0.7, 0.15, 0.15)  # train, val, test (by case, stratified)
    config.data.folds = 0  # > 1: k-fold cross-validation by case instead of split_fractions
    config.data.fold = 0  # with folds > 1: the test fold (the next fold is validation)
    # A generated cohort, used when data.manifest is empty (demo, tests, benchmarks).
    config.data.synthetic = ml_collections.ConfigDict()
    config.data.synthetic.num_slides = 0
    config.data.synthetic.width = 4096
    config.data.synthetic.height = 3072
    config.data.synthetic.seed = 0

    config.tile = ml_collections.ConfigDict()
    config.tile.mpp = 0.5  # target microns per pixel of a patch (about 20x)
    config.tile.level = 0  # pyramid level used when a slide has no usable mpp metadata
    config.tile.patch_size = 512  # patch side in pixels at tile.mpp

    config.tissue = ml_collections.ConfigDict()
    config.tissue.channel_rule = 'any'  # background if 'any' (or 'all') channel > threshold
    config.tissue.threshold = 200
    config.tissue.neighbourhood = 200  # window side in level-0 pixels
    config.tissue.neighbourhood_fraction = 0.9  # background if this much of the window is
    config.tissue.min_fraction = 0.25  # keep a patch with at least this tissue fraction

    config.stain = ml_collections.ConfigDict()
    config.stain.method = 'histogram'  # 'histogram' (per-slide LUT) or 'none'
    config.stain.reference = 'cohort'  # 'cohort' (training slides) or a template image path
    config.stain.fit_patches = 32  # kept patches sampled per slide to fit its LUT
    config.lock()  # a misspelt field in a derived config or an override is an error
    return config
