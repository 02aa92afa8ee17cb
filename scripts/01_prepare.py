"""DICOMs + label CSV -> data/processed/<data>/: metadata.csv and the image/mask caches."""

from pathlib import Path

from pneumothorax import cli, prepare


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--data-dir", required=True, help="the SIIM download (stage-1 layout)")
    p.add_argument("--train-csv", default=None, help="label CSV (default DATA_DIR/train-rle.csv)")
    p.add_argument("--train-dir", default=None, help="training DICOMs (default DATA_DIR/dicom-images-train)")
    p.add_argument("--test-dir", default=None, help="test DICOMs (default DATA_DIR/dicom-images-test)")
    p.add_argument("--patient-map", default=None, help="Kaggle_ID,NIH_ID CSV")
    p.add_argument("--out", required=True, help="processed folder")
    p.add_argument("--skip-bad", action="store_true", help="leave unreadable training files out (reported)")
    p.add_argument("--workers", type=int, default=None)
    args = p.parse_args()
    cfg = cli.load_config(args)
    layout = prepare.Layout.stage1(
        args.data_dir, args.patient_map, train_csv=args.train_csv, train_dir=args.train_dir, test_dir=args.test_dir
    )
    table = prepare.prepare(layout, args.out, cfg.data.sizes, args.workers, args.skip_bad, progress=not args.quiet)
    counts = table.groupby("split").size().to_dict()
    print(f"prepared {counts} at sizes {list(cfg.data.sizes)} -> {args.out}")
    print(prepare.summarize(Path(args.out) / "prepare-report.json"))


if __name__ == "__main__":
    cli.run(main)
