"""Exact grid search of B-TH, R-TH, gate (and triplet / min component) on out-of-fold predictions, then
the choice re-scored at 1024x1024 with the competition metric against the original RLE rows."""

import gc

gc.disable()  # during the imports below (they make millions of objects); cli.run freezes them and resumes

from pneumothorax.io.paths import ProcessedDir
from pneumothorax.pipeline import cli, search
from pneumothorax.post import postprocess


def main() -> None:
    p = cli.parser(__doc__, step=True)
    args = p.parse_args()
    cfg = cli.load_config(args, cli.no_models)
    exp = cli.experiment(cfg, args.exp_dir)
    result = search.search(cfg, exp, ProcessedDir(args.processed), not args.quiet)
    post = postprocess.PostProcess.from_dict(result["postprocess"])
    print(
        f"OOF Dice {result['score_full_resolution']:.4f} at 1024 on the original RLE "
        f"({result['score_search']:.4f} at {result['size']} in the search; all-empty {result['all_empty_score']:.4f}, "
        f"B-TH 0.5 alone {result['no_postprocess_score']:.4f}) with {post.describe()}"
    )
    cli.record("search", cfg, exp, args.processed)


if __name__ == "__main__":
    cli.run(main)
