"""Slides: reading, tissue, stain, tiling and the synthetic cohort.

Every module here that uses OpenCV does so inside reader threads (the patch reader's) or the
tile stage's worker processes, which are the parallelism: OpenCV's own thread pool would
oversubscribe the cores, so it is set to one thread once, for the package.
"""

import cv2

cv2.setNumThreads(1)
