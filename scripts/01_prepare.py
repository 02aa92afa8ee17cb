"""DICOMs + label CSV -> data/processed/<data>/: metadata.csv, the image/mask caches and the input manifests.

The layout is found from --data-dir alone (today's download with stage-1 re-uploads, or the
stage-1 layout); every other option overrides one part of it.
"""

import gc

gc.disable()  # during the imports below (they make millions of objects); cli.run freezes them and resumes

from pathlib import Path

from pneumothorax.data import prepare, prepared
from pneumothorax.io import layout as layout_mod
from pneumothorax.pipeline import cli


def main() -> None:
    p = cli.parser(__doc__, step=True)
    p.add_argument("--data-dir", required=True, help="the SIIM download (see docs/data.md)")
    p.add_argument("--train-csv", default=None, help="label CSV (default: stage_2_train.csv, else train-rle.csv)")
    p.add_argument("--train-dir", action="append", default=[], help="folder of training DICOMs (repeatable)")
    p.add_argument("--test-dir", default=None, help="test DICOMs (default: stage_2_images or dicom-images-test); none")
    p.add_argument("--sample-submission", default=None, help="sample submission CSV (default: found), or none")
    p.add_argument("--patient-map", default=None, help="Kaggle_ID,NIH_ID CSV")
    p.add_argument("--extra-dir", default=None, help="extra training images and labels.csv (default: found), or none")
    p.add_argument("--skip-bad", action="store_true", help="leave unreadable training files out (reported)")
    p.add_argument("--workers", type=int, default=None)
    args = p.parse_args()
    cfg = cli.load_config(args, cli.no_models)
    found = layout_mod.detect(
        args.data_dir,
        args.train_csv,
        args.train_dir,
        args.test_dir,
        args.sample_submission,
        args.patient_map,
        args.extra_dir,
    )
    print(prepare.describe_layout(found))
    table = prepare.prepare(found, args.processed, cfg.data.sizes, args.workers, args.skip_bad, not args.quiet)
    counts = table.groupby("split").size().to_dict()
    print(f"prepared {counts} at sizes {list(cfg.data.sizes)} -> {args.processed}")
    print(prepared.summarize(Path(args.processed) / "prepare-report.json"))
    cli.record("prepare", cfg, cli.experiment(cfg, args.exp_dir), args.processed)


if __name__ == "__main__":
    cli.run(main)
