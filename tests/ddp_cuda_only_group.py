"""Run under torchrun: a tiny DDP fold whose default process group, like NCCL's, has a backend for CUDA only.

A collective on a CPU tensor through the default group then fails ("No backend type associated
with device type cpu"), on CPU as it would on a GPU box: the trainer must send every collective
through its runtime's group, on its device. Trains a segmentation fold, then a classifier fold.
Arguments: processed folder, experiment folder (with its folds.csv).
"""

import sys

import torch
import torch.distributed as dist

from pneumothorax.io import config
from pneumothorax.train import classifier, segmentation

dist.init_process_group(backend="cuda:gloo")  # what NCCL gives: no CPU backend
try:
    dist.broadcast(torch.zeros(1), 0)
except RuntimeError as exc:
    print(f"default group refuses CPU tensors: {str(exc).splitlines()[0]}", flush=True)
else:
    raise SystemExit("the default group served a CPU tensor: this test would prove nothing")
segmentation.train_fold(config.load("tiny"), 0, sys.argv[1], sys.argv[2], device="cpu", progress=False)
summary = classifier.train_classifier_fold(
    config.load("tiny", ["classifier.epochs=2"]), 0, sys.argv[1], sys.argv[2], device="cpu", progress=False
)
print("trained", summary.get("auc", "(rank > 0)"), flush=True)
