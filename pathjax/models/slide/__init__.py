"""Slide models: patch features of one slide (a padded graph) in, class logits and per-patch scores
out."""
