"""Tiny settings for the test suite: the demo's cohort and patches (64 px at 2 um/px, a VGG-16 at
1/8 width trained from scratch), with fewer and smaller slides and smaller networks; seconds per
stage on a CPU."""

from configs import demo


def get_config():
    config = demo.get_config()
    config.workers = 2
    config.data.synthetic.num_slides = 8
    config.data.synthetic.width = 2048
    config.data.synthetic.height = 1536
    config.stain.method = 'histogram'  # the demo turns it off; the tests run it
    config.stain.fit_patches = 8
    config.compilation_cache = False
    config.learn.patches_per_slide = 32
    config.learn.epochs = 3
    config.learn.batch_size = 32
    config.learn.lr_schedule = 'constant'
    config.learn.log_every = 4
    config.extract.batch_size = 32
    config.slide_net.d_model = 32
    config.slide_net.transformer_layers = 1
    config.slide_net.gcn_layers = 1
    config.slide_net.mlp_hidden = 32
    return config
