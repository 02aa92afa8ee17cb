"""metadata.csv -> folds.csv: K folds stratified by label and mask area, grouped by patient."""

from pathlib import Path

import pandas as pd

from pneumothorax import cli, files, folds


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--processed", required=True)
    p.add_argument("--out", required=True, help="folds.csv path")
    args = p.parse_args()
    cfg = cli.load_config(args)
    meta = pd.read_csv(
        Path(args.processed) / "metadata.csv", dtype={"image_id": str, "patient": str}, keep_default_na=False
    )
    train = meta[(meta["split"] == "train") & (meta["error"] == "")]
    table = folds.make_folds(train, cfg.data.n_folds, cfg.seed, cfg.data.area_bins)
    files.write_csv(args.out, table)
    print(folds.fold_summary(table).to_string())


if __name__ == "__main__":
    cli.run(main)
