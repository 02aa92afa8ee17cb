"""Exact grid search of B-TH, R-TH, gate (and triplet / min component) on out-of-fold predictions, then
the choice re-scored at 1024x1024 with the competition metric against the original RLE rows."""

from pneumothorax import cli, models, postprocess, steps
from pneumothorax.paths import ProcessedDir


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--processed", required=True)
    p.add_argument("--exp-dir", required=True, help="models/<exp>")
    args = p.parse_args()
    cfg = cli.load_config(args, models.check_names)
    result = steps.search(cfg, cli.experiment(cfg, args.exp_dir), ProcessedDir(args.processed), not args.quiet)
    post = postprocess.PostProcess.from_dict(result["postprocess"])
    print(
        f"OOF Dice {result['score_full_resolution']:.4f} at 1024 on the original RLE "
        f"({result['score_search']:.4f} at {result['size']} in the search; all-empty {result['all_empty_score']:.4f}, "
        f"B-TH 0.5 alone {result['no_postprocess_score']:.4f}) with {post.describe()}"
    )


if __name__ == "__main__":
    cli.run(main)
