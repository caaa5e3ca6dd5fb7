"""Named ViT presets: the architecture, input and normalization of the timm models that the
pathology foundation models use, named by timm's model names (or by their shape where timm has
no name for it). The README lists which public model each preset fits; weights always come from
a local file (`vit_weights`).

Normalization (the mean and std of RGB in [0, 1]): a preset named after a timm model uses that
model's default pretrained config (`timm.models.get_pretrained_cfg(name)`: what timm's own
forward of its default weights expects); a preset named by its shape uses what the model it fits
was trained with. Where a public model of a timm-named preset's architecture normalizes
otherwise, its `fits` text says so: set `feature_net.mean` / `feature_net.std` (or
`load_encoder(..., mean=, std=)`) to its values. The constants are written out here (timm is a
test dependency only); tests/models/test_normalization.py checks them against timm.
"""

import dataclasses
from typing import Any

from pathjax.models.patch.vit import ViTArchitecture

# timm.data's IMAGENET_DEFAULT_MEAN/STD (torchvision's ImageNet statistics).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# timm.data's IMAGENET_INCEPTION_MEAN/STD: x in [0, 1] -> [-1, 1] (Google's ViT weights, augreg).
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
# H-optimus-0/1 (Bioptimus; the pretrained_cfg of hf-hub:bioptimus/H-optimus-0).
H_OPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
H_OPTIMUS_STD = (0.211883, 0.230117, 0.177517)
SWIGLU_RATIO = 2.66667 * 2  # timm's SwiGLUPacked width for DINOv2 giant (fc1: 8192 at 1536)


@dataclasses.dataclass(frozen=True)
class ViTPreset:
    """A preset: `arch` (input side `arch.img_size` px), the input's mean and std (RGB in [0, 1];
    `norm_from` says where they come from), the microns per pixel its models were trained at,
    and how timm builds the same network (`timm_name`, `timm_args`: for the parity tests and
    benchmarks)."""

    name: str
    arch: ViTArchitecture
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    mpp: float = 0.5
    timm_name: str = ''
    timm_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    fits: str = ''  # public models with this architecture (for the README)
    norm_from: str = ''  # the source of `mean` and `std`

    @property
    def input_size(self) -> int:
        return self.arch.img_size

    @property
    def named_by_timm(self) -> bool:
        """Whether the name is timm's model name (then mean and std are its default cfg's)."""
        return self.name == self.timm_name


def _swiglu(**kwargs) -> dict[str, Any]:
    """timm kwargs of a packed-SwiGLU MLP (import-free: the names are resolved in `timm_kwargs`)."""
    return {'mlp_layer': 'SwiGLUPacked', 'act_layer': 'SiLU', **kwargs}


PRESETS = {p.name: p for p in (
    ViTPreset('vit_small_patch16_224',
              ViTArchitecture(patch_size=16, embed_dim=384, depth=12, num_heads=6),
              mean=INCEPTION_MEAN, std=INCEPTION_STD,
              timm_name='vit_small_patch16_224',
              fits='ViT-S/16 checkpoints (tests, small runs); timm\'s augreg weights. ViT-S/16 '
                   'weights trained with ImageNet\'s normalization (DeiT-S, DINO ViT-S/16): set '
                   'feature_net.mean/std to ImageNet\'s',
              norm_from='timm vit_small_patch16_224.augreg_in21k_ft_in1k'),
    ViTPreset('vit_small_patch14_reg4_dinov2',
              ViTArchitecture(patch_size=14, embed_dim=384, depth=12, num_heads=6,
                              layer_scale=True, reg_tokens=4, no_embed_class=True),
              mean=IMAGENET_MEAN, std=IMAGENET_STD,
              timm_name='vit_small_patch14_reg4_dinov2', timm_args={'img_size': 224},
              fits='DINOv2 ViT-S/14 with registers (weights for 518 px are resampled)',
              norm_from='timm vit_small_patch14_reg4_dinov2.lvd142m'),
    ViTPreset('vit_base_patch16_224',
              ViTArchitecture(patch_size=16, embed_dim=768, depth=12, num_heads=12),
              mean=INCEPTION_MEAN, std=INCEPTION_STD,
              timm_name='vit_base_patch16_224',
              fits='Phikon-class ViT-B/16 (timm layout); Phikon normalizes with ImageNet\'s mean '
                   'and std: set feature_net.mean/std to ImageNet\'s',
              norm_from='timm vit_base_patch16_224.augreg2_in21k_ft_in1k'),
    ViTPreset('vit_large_patch16_224',
              ViTArchitecture(patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                              layer_scale=True),
              mean=INCEPTION_MEAN, std=INCEPTION_STD,
              timm_name='vit_large_patch16_224', timm_args={'init_values': 1e-5},
              fits='UNI (ViT-L/16, LayerScale); UNI normalizes with ImageNet\'s mean and std: '
                   'set feature_net.mean/std to ImageNet\'s',
              norm_from='timm vit_large_patch16_224.augreg_in21k_ft_in1k'),
    ViTPreset('vit_huge_patch14_reg4_swiglu_224',
              ViTArchitecture(patch_size=14, embed_dim=1280, depth=32, num_heads=16,
                              mlp_ratio=5.3375, mlp='swiglu_packed', layer_scale=True,
                              reg_tokens=4, output='class+mean'),
              mean=IMAGENET_MEAN, std=IMAGENET_STD,
              timm_name='vit_huge_patch14_224',
              timm_args=_swiglu(init_values=1e-5, reg_tokens=4, mlp_ratio=5.3375),
              fits='Virchow2-class (ViT-H/14, 4 registers, SwiGLU; class token + mean of patch '
                   'tokens; ImageNet\'s mean and std, as Virchow2)',
              norm_from='Virchow2 (ImageNet\'s)'),
    ViTPreset('vit_giant_patch14_reg4_dinov2',
              ViTArchitecture(patch_size=14, embed_dim=1536, depth=40, num_heads=24,
                              mlp_ratio=SWIGLU_RATIO, mlp='swiglu_packed', layer_scale=True,
                              reg_tokens=4, no_embed_class=True),
              mean=IMAGENET_MEAN, std=IMAGENET_STD,
              timm_name='vit_giant_patch14_reg4_dinov2', timm_args={'img_size': 224},
              fits='H-optimus-class (ViT-g/14, 4 registers, SwiGLU) and DINOv2 ViT-g/14 with '
                   'registers; H-optimus-0/1 normalize with their own mean and std: set '
                   'feature_net.mean to (0.707223, 0.578729, 0.703617) and feature_net.std to '
                   '(0.211883, 0.230117, 0.177517)',
              norm_from='timm vit_giant_patch14_reg4_dinov2.lvd142m'),
    ViTPreset('vit_giant_patch14_reg8_depth24_224',
              ViTArchitecture(patch_size=14, embed_dim=1536, depth=24, num_heads=24,
                              mlp_ratio=SWIGLU_RATIO, mlp='swiglu_packed', layer_scale=True,
                              reg_tokens=8, no_embed_class=True),
              mean=IMAGENET_MEAN, std=IMAGENET_STD,
              timm_name='vit_giant_patch14_224',
              timm_args=_swiglu(embed_dim=1536, depth=24, num_heads=24, init_values=1e-5,
                                reg_tokens=8, mlp_ratio=SWIGLU_RATIO, no_embed_class=True),
              fits='UNI2-h shape (width 1536, depth 24, 8 registers, SwiGLU; ImageNet\'s mean '
                   'and std, as UNI2-h)',
              norm_from='UNI2-h (ImageNet\'s)'),
)}

def get_preset(name: str) -> ViTPreset:
    if name not in PRESETS:
        raise ValueError(f'unknown ViT preset {name!r}; presets: {", ".join(PRESETS)}')
    return PRESETS[name]


def timm_kwargs(preset: ViTPreset, **overrides) -> dict[str, Any]:
    """Keyword arguments for `timm.create_model(preset.timm_name, ...)` that build the preset's
    network without a head (needs timm and torch)."""
    import torch.nn  # pylint: disable=import-outside-toplevel
    from timm.layers import SwiGLUPacked  # pylint: disable=import-outside-toplevel
    names = {'SwiGLUPacked': SwiGLUPacked, 'SiLU': torch.nn.SiLU}
    args = {key: names.get(value, value) if isinstance(value, str) else value
            for key, value in preset.timm_args.items()}
    return {'num_classes': 0, 'global_pool': '', **args, **overrides}
