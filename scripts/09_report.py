"""models/<exp>/report/: summary.md and PNG panels of the best and worst out-of-fold cases."""

from pneumothorax import cli, models, report
from pneumothorax.paths import ProcessedDir


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--processed", required=True)
    p.add_argument("--exp-dir", required=True)
    args = p.parse_args()
    cfg = cli.load_config(args, models.check_names)
    out = report.build(cfg, cli.experiment(cfg, args.exp_dir), ProcessedDir(args.processed))
    print(f"report -> {out / 'summary.md'}")


if __name__ == "__main__":
    cli.run(main)
