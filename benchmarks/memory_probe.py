"""Peak RSS of infer + search + submit on N synthetic test maps (run in a fresh process by bench_post)."""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import peak_rss_mb, write_prepare_record  # noqa: E402

from pneumothorax.io import atomic, config
from pneumothorax.io.paths import ExperimentDir, ProcessedDir
from pneumothorax.models import factory
from pneumothorax.post import submission
from pneumothorax.post.postprocess import PostProcess
from pneumothorax.predict import infer


def main(n: int) -> None:
    cfg = config.load("tiny", ["data.n_folds=2", "data.sizes=[32, 128]", "segmentation.stages.1.size=128"])
    size = 128
    rng = np.random.default_rng(0)
    torch.manual_seed(0)  # the untrained models' maps, hence the RLE sizes, are the same every run
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        processed, exp = root / "p", ExperimentDir(root / "models" / "tiny", 128)
        processed.mkdir()
        meta = pd.DataFrame(
            {"image_id": [f"t{i}" for i in range(n)], "split": "test", "index": np.arange(n), "error": ""}
        )
        n_train = 200
        train = pd.DataFrame(
            {"image_id": [f"r{i}" for i in range(n_train)], "split": "train", "index": np.arange(n_train), "error": ""}
        )
        atomic.write_csv(processed / "metadata.csv", pd.concat([meta, train]))
        write_prepare_record(processed, list(meta["image_id"]))  # the ids the submission must hold
        for split, count in (("test", n), ("train", n_train)):
            images = np.lib.format.open_memmap(
                processed / f"images_{split}_{size}.npy", "w+", np.uint8, (count, size, size)
            )
            for i in range(0, count, 250):
                images[i : i + 250] = rng.integers(0, 255, (min(250, count - i), size, size), dtype=np.uint8)
            images.flush()
        masks = np.lib.format.open_memmap(processed / f"masks_train_{size}.npy", "w+", np.uint8, (n_train, size, size))
        masks[:50, 40:60, 40:60] = 1
        masks.flush()
        for k in range(2):
            fold = exp.segmenter(k).root
            fold.mkdir(parents=True)
            model = factory.create_segmenter(replace(cfg.segmentation, encoder_weights="none"), cfg.data.channels)
            torch.save(model.state_dict(), fold / "swa.pt")
            part = np.arange(k, n_train, 2)
            atomic.save_npy(exp.oof_maps(k), rng.integers(0, 255, (len(part), size, size), dtype=np.uint8))
            atomic.write_csv(
                exp.oof_ids(k),
                pd.DataFrame(
                    {"image_id": [f"r{i}" for i in part], "index": part, "has_pneumothorax": (part < 50).astype(int)}
                ),
            )
            cls_dir = exp.classifier(k).root
            cls_dir.mkdir(parents=True)
            clf = factory.create_classifier(replace(cfg.classifier, pretrained="none"), cfg.data.channels)
            torch.save(clf.state_dict(), cls_dir / "model.pt")
            atomic.write_csv(
                exp.oof_gate(k),
                pd.DataFrame(
                    {
                        "image_id": [f"r{i}" for i in part],
                        "label": (part < 50).astype(int),
                        "prob": rng.random(len(part)),
                    }
                ),
            )
        cfg = replace(cfg, classifier=replace(cfg.classifier, size=size))
        infer.infer_test(cfg, exp, ProcessedDir(processed), "cpu", progress=False)
        after_infer = peak_rss_mb()
        atomic.write_json(exp.postprocess, {"postprocess": PostProcess("b_r", 0.5, 1024, 0.3).to_dict()})
        submission.make_submission(exp, ProcessedDir(processed), root / "sub.csv", progress=False)
        peak = peak_rss_mb()  # before reading the CSV back
        encoded = pd.read_csv(root / "sub.csv")["EncodedPixels"]
    figures = {"images": n, "rows": len(encoded), "peak_rss_mb": round(peak, 1)}
    # untrained models predict noise: its RLE (held until the CSV is written) is far larger than real masks'
    figures |= {"peak_after_infer_mb": round(after_infer, 1), "rle_mb": round(encoded.str.len().sum() / 1e6, 1)}
    print(json.dumps(figures))


if __name__ == "__main__":
    main(int(sys.argv[1]))
