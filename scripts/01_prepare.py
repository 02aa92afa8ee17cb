"""DICOMs + label CSV -> data/processed/<data>/: metadata.csv and the image/mask caches.

The layout is found from --data-dir alone (today's download with stage-1 re-uploads, or the
stage-1 layout); every other option overrides one part of it.
"""

from pathlib import Path

from pneumothorax import cli, models, prepare
from pneumothorax import layout as layout_mod


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--data-dir", required=True, help="the SIIM download (see README, Getting the data)")
    p.add_argument("--train-csv", default=None, help="label CSV (default: stage_2_train.csv, else train-rle.csv)")
    p.add_argument("--train-dir", action="append", default=[], help="folder of training DICOMs (repeatable)")
    p.add_argument("--test-dir", default=None, help="test DICOMs (default: stage_2_images or dicom-images-test); none")
    p.add_argument("--sample-submission", default=None, help="sample submission CSV (default: found), or none")
    p.add_argument("--patient-map", default=None, help="Kaggle_ID,NIH_ID CSV")
    p.add_argument("--out", required=True, help="processed folder")
    p.add_argument("--skip-bad", action="store_true", help="leave unreadable training files out (reported)")
    p.add_argument("--workers", type=int, default=None)
    args = p.parse_args()
    cfg = cli.load_config(args, models.check_names)
    found = layout_mod.detect(
        args.data_dir, args.train_csv, args.train_dir, args.test_dir, args.sample_submission, args.patient_map
    )
    print(cli.describe_layout(found))
    table = prepare.prepare(found, args.out, cfg.data.sizes, args.workers, args.skip_bad, progress=not args.quiet)
    counts = table.groupby("split").size().to_dict()
    print(f"prepared {counts} at sizes {list(cfg.data.sizes)} -> {args.out}")
    print(prepare.summarize(Path(args.out) / "prepare-report.json"))


if __name__ == "__main__":
    cli.run(main)
