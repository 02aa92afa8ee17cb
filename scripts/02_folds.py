"""metadata.csv -> models/<exp>/folds.csv: K folds stratified by label and mask area, grouped by patient.

The split belongs to the experiment: another experiment's `make folds` never changes it, and it
is rewritten only when its content changes.
"""

from pneumothorax import cli, folds, models, steps
from pneumothorax.paths import ProcessedDir


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--processed", required=True)
    p.add_argument("--exp-dir", required=True, help="models/<exp>")
    args = p.parse_args()
    cfg = cli.load_config(args, models.check_names)
    table = steps.make_folds(cfg, ProcessedDir(args.processed), cli.experiment(cfg, args.exp_dir))
    print(folds.fold_summary(table).to_string())


if __name__ == "__main__":
    cli.run(main)
