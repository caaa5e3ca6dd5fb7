"""The demo: a generated cohort of 12 slides through the whole method in minutes on 2 CPU cores.

Patches are 128 px at 2 um/px, so each covers 256 um of tissue like the method's 512 px at
0.5 um/px, at a sixteenth of the pixels.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.classes = ('negative', 'positive')
    config.data.split_fractions = (0.5, 0.25, 0.25)
    config.data.synthetic.num_slides = 12
    config.data.synthetic.width = 6144
    config.data.synthetic.height = 4096
    config.tile.mpp = 2.0
    config.tile.patch_size = 128
    config.stain.fit_patches = 16
    return config
