"""Tiny settings for the test suite: a generated cohort of small slides, 64-px patches at 2 um/px
(each patch covers 128 um, a quarter of the method's 256 um), a VGG-16 at 1/8 width; seconds per
stage on a CPU."""

from configs import default


def get_config():
    config = default.get_config()
    config.workers = 2
    config.data.classes = ('negative', 'positive')
    config.data.split_fractions = (0.5, 0.25, 0.25)
    config.data.synthetic.num_slides = 8
    config.data.synthetic.width = 2048
    config.data.synthetic.height = 1536
    config.tile.mpp = 2.0
    config.tile.patch_size = 64
    config.stain.fit_patches = 8
    config.compilation_cache = False
    config.feature_net.width = 0.125
    config.learn.lr = 1e-3  # trained from scratch
    config.learn.patches_per_slide = 32
    config.learn.epochs = 3
    config.learn.batch_size = 32
    config.learn.lr_schedule = 'constant'
    config.learn.log_every = 4
    config.extract.batch_size = 32
    config.graph.max_patches = 512
    config.slide_net.d_model = 32
    config.slide_net.transformer_layers = 1
    config.slide_net.gcn_layers = 1
    config.slide_net.mlp_hidden = 32
    config.train.lr = 1e-3
    config.train.max_steps = 300
    return config
