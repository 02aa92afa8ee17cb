"""Apply the searched post-processing to the test predictions; validate; write submissions/<exp>.csv.

The RLE is the competition's relative, column-major format: stage 2 used it too (the 1st, 4th,
5th and 8th places' stage-2 code encodes with the official relative ``mask2rle``).
"""

import gc

gc.disable()  # during the imports below (they make millions of objects); cli.run freezes them and resumes

from pathlib import Path

from pneumothorax.io.paths import ExperimentDir, ProcessedDir
from pneumothorax.pipeline import cli
from pneumothorax.post import submission


def main() -> None:
    p = cli.parser(__doc__, config=False)
    p.add_argument("--processed", required=True)
    p.add_argument("--exp-dir", required=True, help="models/<exp>")
    p.add_argument("--out", required=True, help="submission CSV")
    args = p.parse_args()
    exp = ExperimentDir(Path(args.exp_dir))
    frame = submission.make_submission(exp, ProcessedDir(args.processed), Path(args.out), progress=not args.quiet)
    empty = (frame["EncodedPixels"] == "-1").sum()
    print(f"submission: {len(frame)} images, {len(frame) - empty} with pneumothorax -> {args.out}")


if __name__ == "__main__":
    cli.run(main)
