"""Data: prepare (DICOMs -> caches), folds, datasets, augmentations, the synthetic world."""
