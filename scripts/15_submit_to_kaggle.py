"""Validate submissions/<exp>.csv once more, then send it to the competition with the official kaggle CLI."""

import gc

gc.disable()  # during the imports below (they make millions of objects); cli.run freezes them and resumes

from pathlib import Path

from pneumothorax.pipeline import cli, kaggle


def main() -> None:
    p = cli.parser(__doc__, config=False)
    p.add_argument("--submission", required=True, help="the CSV to send")
    p.add_argument("--message", required=True, help="the submission's description on Kaggle")
    p.add_argument("--processed", required=True, help="the processed folder (the test ids the CSV must hold)")
    p.add_argument("--kaggle", default="kaggle", help="the kaggle CLI (a name on PATH or a path)")
    args = p.parse_args()
    kaggle.submit(Path(args.submission), args.message, Path(args.processed), args.kaggle)
    print(
        f"submitted {args.submission} to {kaggle.COMPETITION}: see https://www.kaggle.com/c/{kaggle.COMPETITION}/submissions"
    )


if __name__ == "__main__":
    cli.run(main)
