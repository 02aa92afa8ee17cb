"""Predict pneumothorax on new images (DICOM, PNG, JPEG) with a trained experiment or ensemble.

make predict INPUT=/path/to/folder EXP=demo      -> predictions/demo-folder/
make predict INPUT=... EXP=demo DICOM_SEG=1      -> also a DICOM Segmentation object per DICOM input
"""

import gc

gc.disable()  # during the imports below (they make millions of objects); cli.run freezes them and resumes

from pathlib import Path

from pneumothorax.io.paths import ExperimentDir
from pneumothorax.pipeline import cli, predict


def main() -> None:
    p = cli.parser(__doc__, config=False)
    p.add_argument("--exp-dir", required=True, help="models/<exp or ensemble>")
    p.add_argument("--input", required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="predictions/<name>")
    p.add_argument("--device", default=None)
    p.add_argument("--dicom-seg", action="store_true", help="also write dicom_seg/<file>.dcm per DICOM input")
    args = p.parse_args()
    table = predict.predict_folder(
        ExperimentDir(Path(args.exp_dir)), Path(args.input), Path(args.out), args.device, not args.quiet, args.dicom_seg
    )
    failed = table["rle"].isna().sum()
    positive = table["has_pneumothorax"].fillna(False).astype(bool).sum()
    print(f"{len(table)} images ({failed} unreadable), {positive} with pneumothorax -> {args.out}/predictions.csv")


if __name__ == "__main__":
    cli.run(main)
