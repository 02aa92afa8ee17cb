"""Training: the one Trainer engine, checkpoints, and the segmentation and classifier tasks."""
