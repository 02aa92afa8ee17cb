"""Exact grid search of B-TH, R-TH, gate (and triplet / min component) on out-of-fold predictions."""

from pathlib import Path

from pneumothorax import cli, thresholds


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--processed", required=True)
    p.add_argument("--exp-dir", required=True, help="models/<exp>")
    args = p.parse_args()
    cfg = cli.load_config(args)
    result = thresholds.search(cfg, Path(args.exp_dir), Path(args.processed))
    print(
        f"OOF Dice {result['score']:.4f} (all-empty {result['all_empty_score']:.4f}, "
        f"B-TH 0.5 alone {result['no_postprocess_score']:.4f}) with "
        + ", ".join(f"{k}={result[k]}" for k in ("rule", "b_th", "r_th", "gate", "min_component"))
    )


if __name__ == "__main__":
    cli.run(main)
