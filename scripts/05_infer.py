"""Test-set probabilities: every fold with flip TTA, averaged; classifier gate probabilities."""

from pneumothorax import cli, infer, models
from pneumothorax.paths import ProcessedDir


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--processed", required=True)
    p.add_argument("--exp-dir", required=True, help="models/<exp>")
    p.add_argument("--device", default=None)
    args = p.parse_args()
    cfg = cli.load_config(args, models.check_names)
    exp = cli.experiment(cfg, args.exp_dir)
    out = infer.infer_test(cfg, exp, ProcessedDir(args.processed), args.device, not args.quiet)
    print(f"test predictions -> {out}")


if __name__ == "__main__":
    cli.run(main)
