"""Patch encoders: the method's VGG-16 with its AM-softmax head, and ViTs in timm's layout that read
pathology foundation models' weights files; images in, patch features out."""
