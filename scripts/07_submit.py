"""Apply the searched post-processing to the test predictions; validate; write submissions/<exp>.csv."""

from pathlib import Path

from pneumothorax import cli, submission


def main() -> None:
    p = cli.parser(__doc__, config=False)
    p.add_argument("--processed", required=True)
    p.add_argument("--exp-dir", required=True, help="models/<exp>")
    p.add_argument("--out", required=True, help="submission CSV")
    p.add_argument("--stage2", action="store_true", help="standard (absolute) RLE, as stage 2 asked")
    args = p.parse_args()
    frame = submission.make_submission(
        Path(args.exp_dir), Path(args.processed), Path(args.out), relative=not args.stage2, progress=not args.quiet
    )
    empty = (frame["EncodedPixels"] == "-1").sum()
    print(f"submission: {len(frame)} images, {len(frame) - empty} with pneumothorax -> {args.out}")


if __name__ == "__main__":
    cli.run(main)
