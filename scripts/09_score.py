"""Score a submission against a labels CSV with the competition metric."""

import gc

gc.disable()  # during the imports below (they make millions of objects); cli.run freezes them and resumes

from pathlib import Path

from pneumothorax.io import atomic
from pneumothorax.pipeline import cli
from pneumothorax.post import submission


def main() -> None:
    p = cli.parser(__doc__, config=False)
    p.add_argument("--submission", required=True)
    p.add_argument("--labels", required=True)
    p.add_argument("--out", default=None, help="write the scores as JSON here")
    args = p.parse_args()
    result = submission.score(Path(args.submission), Path(args.labels))
    print(
        f"score {result['score']:.4f} vs all-empty baseline {result['all_empty_score']:.4f} "
        f"({result['n_images']} images, {result['n_positive']} positive)"
    )
    print(
        f"Dice on positive images {result['dice_positive']:.4f}, on negative images {result['dice_negative']:.4f}, "
        f"false-positive images {result['false_positive_images']}"
    )
    if args.out:
        atomic.write_json(args.out, result)


if __name__ == "__main__":
    cli.run(main)
