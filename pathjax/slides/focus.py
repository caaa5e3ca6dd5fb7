"""How sharp a patch is: the variance of its Laplacian (Pech-Pacheco et al. 2000), the focus
measure slideflow and most QC tools use. Grey is the mean of R, G and B (0-255); the Laplacian is
the 3x3 kernel [[0, 1, 0], [1, -4, 1], [0, 1, 0]] with reflected borders. In-focus H&E at 20x scores
in the hundreds to thousands; an out-of-focus band, tens."""

import cv2
import numpy as np


def laplacian_variance(patch: np.ndarray) -> float:
    """patch: uint8 [H, W, 3] -> the variance of the Laplacian of its grey image."""
    grey = patch.astype(np.float32).mean(axis=-1)
    return float(cv2.Laplacian(grey, cv2.CV_32F, ksize=1, borderType=cv2.BORDER_REFLECT_101).var())
