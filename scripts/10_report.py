"""models/<exp>/report/: summary.md and PNG panels of the best and worst out-of-fold cases."""

import gc

gc.disable()  # during the imports below (they make millions of objects); cli.run freezes them and resumes

from pneumothorax.io.paths import ProcessedDir
from pneumothorax.pipeline import cli, report


def main() -> None:
    p = cli.parser(__doc__, step=True)
    args = p.parse_args()
    cfg = cli.load_config(args, cli.no_models)
    out = report.build(cfg, cli.experiment(cfg, args.exp_dir), ProcessedDir(args.processed))
    print(f"report -> {out / 'summary.md'}")


if __name__ == "__main__":
    cli.run(main)
