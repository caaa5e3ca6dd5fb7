"""The method's settings (CN115409783A as stated in DESIGN.md). Other configs override these.

Run: python launch.py --config configs/default.py --workdir <dir> --config.data.manifest=<csv>
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.workers = -1  # worker processes/threads for slide reading; -1 = one per CPU core
    config.dtype = 'auto'  # compute dtype: 'auto' (bfloat16 on GPU/TPU, float32 on CPU), 'float32', 'bfloat16'
    config.deterministic = False  # True: XLA's deterministic GPU ops (bit-identical reruns and
    # resumes on GPU, somewhat slower); CPU runs are deterministic either way
    config.micro_batch = 0  # feature network images per device per pass; 0 = auto: the whole
    # batch on GPU/TPU, on CPU as many as keep Eigen's convolution buffers under 4.5 GiB
    config.cpu_devices = 0  # XLA devices per process on CPU (batches are split between them and
    # run side by side); 0 = auto: one per core, as many as split every batch evenly
    config.compilation_cache = True  # persistent XLA compilation cache in <workdir>/jax_cache/,
    # a folder per host instruction set (runtime/compilation_cache.py)

    config.data = ml_collections.ConfigDict()
    config.data.manifest = ''  # CSV: slide_id, path, label[, case_id, split]
    config.data.classes = ('wild_type', 'mutant')  # label names; index = class id
    config.data.split_fractions = (0.7, 0.15, 0.15)  # train, val, test (by case, stratified)
    config.data.folds = 0  # > 1: k-fold cross-validation by case instead of split_fractions
    config.data.fold = 0  # with folds > 1: the test fold (the next fold is validation); -1:
    # every fold in one run, each in <workdir>/folds/<k>/, summarized in <workdir>/cv/
    config.data.split_seed = 0  # deals cases to splits or folds; `seed` (training) leaves them
    config.data.fold_by = 'case'  # folds of cases, or 'site': every site (manifest column) in one
    # fold (site-preserved cross-validation, where the site follows the label as in TCGA)
    # A generated cohort, used when data.manifest is empty (demo, tests, benchmarks).
    config.data.synthetic = ml_collections.ConfigDict()
    config.data.synthetic.num_slides = 0
    config.data.synthetic.width = 4096
    config.data.synthetic.height = 3072
    config.data.synthetic.seed = 0
    config.data.synthetic.motif_fraction = (0.15, 0.25)  # a positive slide's motif: this share
    # of its tissue (uniform in the range); lower is a harder cohort
    config.data.synthetic.artifacts = ()  # drawn on every slide, with known masks: any of
    # 'pen' (blue, green, black marker strokes), 'blur' (out-of-focus bands), 'fold' (doubled
    # tissue)
    config.data.synthetic.sites = 0  # >= 2: slides come from this many staining sites (one
    # stain per site) and the manifest gets site and split columns; 0: a stain per slide
    config.data.synthetic.site_follows_label = (0.8, 0.5)  # with sites: the chance a slide of
    # label y is at site y (mod sites), in train/val and in test (0.5 of 2 sites: no confound)

    config.tile = ml_collections.ConfigDict()
    config.tile.mpp = 0.0  # microns per pixel of a patch; 0: the backbone's (0.5, about 20x)
    config.tile.level = 0  # pyramid level used when a slide has no usable mpp metadata
    config.tile.patch_size = 0  # patch side in pixels; 0: the backbone's (VGG-16: 512)

    config.tissue = ml_collections.ConfigDict()
    config.tissue.method = 'seed'  # 'seed' (the method's rule below) or 'otsu' (Otsu on
    # saturation, holes filled, small pieces removed: CLAM's and TRIDENT's)
    config.tissue.channel_rule = 'any'  # background if 'any' (or 'all') channel > threshold
    config.tissue.threshold = 200
    config.tissue.neighbourhood = 200  # window side in level-0 pixels
    config.tissue.neighbourhood_fraction = 0.9  # background if this much of the window is
    config.tissue.min_fraction = 0.25  # keep a patch with at least this tissue fraction
    config.tissue.remove_pen = False  # drop blue, green and black marker ink (colour rules)
    config.tissue.remove_folds = False  # drop folds: tissue about twice the slide's optical density
    config.tissue.max_artifact_fraction = 0.1  # a patch with more pen or fold than this is dropped
    config.tissue.max_blur = 0.0  # > 0: drop patches whose focus (variance of the Laplacian of
    # grey, 0-255, at the read level) is below this; 0: off

    config.stain = ml_collections.ConfigDict()
    config.stain.method = 'histogram'  # 'histogram' (per-slide LUT), 'macenko' (Macenko 2009
    # stain vectors), 'reinhard' (Reinhard 2001, Lab means and deviations) or 'none'
    config.stain.reference = 'cohort'  # 'cohort' (training slides) or a template image path
    config.stain.fit_patches = 32  # kept patches sampled per slide to fit its LUT
    config.feature_net = ml_collections.ConfigDict()
    config.feature_net.width = 1.0  # VGG-16's channel multiplier (smaller for CPU configs)
    config.feature_net.embed_dim = 0  # > 0: a linear embedding after pooling
    config.feature_net.backbone = 'vgg16'  # the method's VGG-16, or a ViT preset (README)
    # Weights file: torchvision's vgg16 state_dict, or the preset's timm state_dict
    # (.safetensors, .pth/.bin, .npz); '' = random initialisation.
    config.feature_net.weights = ''
    config.feature_net.learn = True  # False: extract with the initial network (the baseline)
    # A ViT weights file's own input normalization (RGB in [0, 1]), e.g. (0.485, 0.456, 0.406)
    # and (0.229, 0.224, 0.225) for UNI; () = the preset's (README: Foundation models)
    config.feature_net.mean = ()
    config.feature_net.std = ()

    config.am_softmax = ml_collections.ConfigDict()
    config.am_softmax.s = 30.0  # scale
    config.am_softmax.m = 0.35  # additive cosine margin

    config.learn = ml_collections.ConfigDict()
    config.learn.patches_per_slide = 200  # sampled from each train/val slide
    config.learn.epochs = 100
    config.learn.batch_size = 32  # global, over all devices
    config.learn.optimizer = 'adam'  # 'adam', 'adamw' or 'sgd' (Nesterov momentum)
    config.learn.lr = 1e-4  # fine-tuning rate for an ImageNet start; 1e-3 from scratch
    config.learn.lr_schedule = 'cosine'  # 'cosine' or 'constant'
    config.learn.momentum = 0.9
    config.learn.weight_decay = 5e-4
    config.learn.grad_clip = 1.0  # > 0: clip gradients to this global norm (AM-softmax's s=30
    # makes early gradients large; without clipping, VGG-16 trained from scratch stalls)
    config.learn.augment = 'd4'  # the 8 rotations/flips, per patch, on device; 'd4+hed' adds
    # HED colour jitter (Tellez 2019); or 'none'
    config.learn.hed_sigma = 0.05  # 'd4+hed': each stain scaled by U(1 - s, 1 + s) and
    # shifted by U(-s, s) in optical density (HED-light; 0.2 is HED-strong)
    config.learn.log_every = 50  # steps between metric lines

    # Patch features made by another tool (TRIDENT, CLAM, STAMP): one <slide_id>.h5 per slide in
    # import_dir; tile, patches, learn_features and extract are then skipped (README: Interop).
    config.features = ml_collections.ConfigDict()
    config.features.import_dir = ''
    config.features.format = 'auto'  # 'auto', 'trident', 'clam' or 'stamp'
    config.features.patch_size_level0 = 0  # CLAM files: a patch's side in level-0 pixels
    config.features.export = ''  # 'h5': extract and predict also write features_h5/<id>.h5
    # (TRIDENT's layout)

    config.extract = ml_collections.ConfigDict()
    config.extract.batch_size = 64  # patches per device batch (over this host's devices)
    config.extract.checkpoint = 'latest'  # feature network: 'latest' (the method) or 'best'

    config.graph = ml_collections.ConfigDict()
    config.graph.k = 8  # nearest neighbours per patch (feature space), then symmetrized
    config.graph.max_patches = 8192  # > 0: seeded sample of at most this many patches per slide

    config.slide_net = ml_collections.ConfigDict()
    # 'graph_transformer' (the method), or a baseline on the same features and splits: 'abmil'
    # (Ilse 2018), 'transmil' (Shao 2021), 'clam_sb' (Lu 2021), 'mean' (mean pooling + MLP)
    config.slide_net.model = 'graph_transformer'
    config.slide_net.d_model = 128  # the patch embedding's width (every model but 'mean')
    config.slide_net.heads = 4
    config.slide_net.transformer_layers = 2
    config.slide_net.gcn_layers = 2
    config.slide_net.attention = 'dense'  # 'dense' (all patches) or 'graph' (along kNN edges)
    config.slide_net.pooling = 'mean'  # 'mean' or 'gated' (attention; weights are heatmaps)
    config.slide_net.mlp_hidden = 64  # also the gated attention's width (abmil, clam_sb)
    config.slide_net.dropout = 0.1
    config.slide_net.position_encoding = True  # graph_transformer: add the grid encoding
    config.slide_net.bag_weight = 0.7  # clam_sb: slide loss weight (1 - it: instance loss)
    config.slide_net.instance_k = 8  # clam_sb: top and bottom patches of the instance loss

    config.train = ml_collections.ConfigDict()
    config.train.batch_slides = 8  # slides per step (global)
    config.train.optimizer = 'adamw'  # 'adam' or 'adamw'
    config.train.lr = 1e-4
    config.train.weight_decay = 1e-4
    config.train.loss_target = 0.05  # stop when an epoch's training loss reaches this
    config.train.max_steps = 2000  # ... or after this many steps
    config.train.class_weights = 'none'  # 'none' or 'balanced' (imbalanced cohorts)
    config.train.log_every_epochs = 10

    config.eval = ml_collections.ConfigDict()
    config.eval.splits = ('test',)  # splits the evaluate stage reports on
    config.eval.checkpoint = 'latest'  # 'latest' (where the method's stopping rule ended) or
    # 'best' (highest validation AUC, ties to the lower validation loss)
    config.eval.heatmaps = True
    config.eval.top_patches = 4  # highest-scoring patches per slide saved at full resolution
    config.predict = ml_collections.ConfigDict()
    config.predict.manifest = ''  # CSV of new slides (label optional) for --stages predict
    config.predict.import_dir = ''  # with features.import_dir: the new slides' h5 files, if
    # not in features.import_dir

    # Slide models compared on the same features and folds (with data.folds=K, data.fold=-1):
    # e.g. ('graph_transformer', 'abmil', 'transmil', 'clam_sb', 'mean',
    # 'graph_transformer:gcn_layers=0'); the first is the reference of the paired tests
    config.compare = ml_collections.ConfigDict()
    config.compare.models = ()

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # devices on the data axis; -1 = all

    config.distributed = ml_collections.ConfigDict()
    config.distributed.coordinator = ''  # host:port of process 0 (with num_processes and
    # process_id on each host); 'auto': all three from the scheduler (srun, mpirun, a Cloud TPU
    # pod, a Kubernetes Job) through jax.distributed's detection; empty = single process
    config.distributed.num_processes = 1
    config.distributed.process_id = 0

    config.lock()  # a misspelt field in a derived config or an override is an error
    return config
