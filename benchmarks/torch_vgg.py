"""The PyTorch reference of the feature-network benchmark: VGG-16 written with torch.nn.

torchvision's convolutional trunk (ReLU, 2x2 max-pool), global average pool, a linear head, cross
entropy, ImageNet normalization in the forward (as pathjax's), eager mode; bfloat16 autocast on
CUDA to match the Flax side there. Tuned as a user would: the model and batch in channels_last
memory format (oneDNN's fast path on CPU, cuDNN's NHWC kernels on GPU), inference under
torch.inference_mode(); optionally a torch.compile'd forward (inductor) for inference.
"""

import numpy as np
import torch

from pathjax.models.patch.vgg import BLOCKS, IMAGENET_MEAN, IMAGENET_STD, scaled

class TorchVGG16(torch.nn.Module):
    """torchvision's VGG-16 trunk + global average pool + linear head; uint8 NCHW in."""

    def __init__(self, width: float, num_classes: int):
        super().__init__()
        layers, channels = [], 3
        for block in BLOCKS:
            for out in block:
                layers += [torch.nn.Conv2d(channels, scaled(out, width), 3, padding=1),
                           torch.nn.ReLU(inplace=True)]
                channels = scaled(out, width)
            layers.append(torch.nn.MaxPool2d(2, 2))
        self.features = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(channels, num_classes)
        self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer('std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, images):
        x = (images.float() / 255.0 - self.mean) / self.std
        return self.head(self.features(x).mean(dim=(2, 3)))


def torch_optimizer(model: torch.nn.Module, optimizer: str, lr: float, momentum: float):
    if optimizer == 'sgd':
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    return torch.optim.Adam(model.parameters(), lr=lr)


def torch_train_runner(model, opt, images, labels):
    """A zero-argument call running one eager train step."""
    def run():
        model.train()
        opt.zero_grad(set_to_none=True)
        with autocast(images):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        sync_torch(images)
    return run


def torch_infer_runner(model, images):
    def run():
        model.eval()
        with torch.inference_mode(), autocast(images):
            model(images)
        sync_torch(images)
    return run


def autocast(tensor):
    """bfloat16 autocast on CUDA (to match the Flax side), a no-op on CPU."""
    return torch.autocast(tensor.device.type, dtype=torch.bfloat16, enabled=tensor.is_cuda)


def sync_torch(tensor) -> None:
    if tensor.is_cuda:
        torch.cuda.synchronize()


def runners(width: float, num_classes: int, optimizer: str, lr: float, momentum: float,
            images: np.ndarray, labels: np.ndarray, device: str, compiled: bool = False) -> dict:
    """{'torch infer', 'torch train'} (and 'torch-compile infer' when `compiled`): zero-argument
    calls on the uint8 NHWC batch `images`, channels_last."""
    torch.manual_seed(0)
    channels_last = torch.channels_last
    reference = TorchVGG16(width, num_classes).to(device, memory_format=channels_last)
    timages = (torch.from_numpy(images).permute(0, 3, 1, 2)  # NCHW view of NHWC memory
               .contiguous(memory_format=channels_last).to(device))
    tlabels = torch.from_numpy(labels).long().to(device)
    opt = torch_optimizer(reference, optimizer, lr, momentum)
    found = {'torch infer': torch_infer_runner(reference, timages),
             'torch train': torch_train_runner(reference, opt, timages, tlabels)}
    if compiled:
        inference = TorchVGG16(width, num_classes).to(device, memory_format=channels_last).eval()
        inference.load_state_dict(reference.state_dict())
        found['torch-compile infer'] = torch_infer_runner(torch.compile(inference), timages)
    return found
