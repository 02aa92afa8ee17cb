"""Models: the factory over smp/timm, losses, devices and DDP, flip TTA."""
