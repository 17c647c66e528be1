"""Learning: the model registry, augmentation, the one train/evaluate loop, model files."""
