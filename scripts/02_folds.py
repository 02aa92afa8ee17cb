"""metadata.csv -> models/<exp>/folds.csv: K folds stratified by label and mask area, grouped by patient.

The split belongs to the experiment: another experiment's `make folds` never changes it, and it
is rewritten only when its content changes.
"""

import gc

gc.disable()  # during the imports below (they make millions of objects); cli.run freezes them and resumes

from pneumothorax.data import folds, splitting
from pneumothorax.io.paths import ProcessedDir
from pneumothorax.pipeline import cli


def main() -> None:
    p = cli.parser(__doc__, step=True)
    args = p.parse_args()
    cfg = cli.load_config(args, cli.no_models)
    exp = cli.experiment(cfg, args.exp_dir)
    table = splitting.write_folds(cfg, ProcessedDir(args.processed), exp)
    print(folds.fold_summary(table).to_string())
    cli.record("folds", cfg, exp, args.processed)


if __name__ == "__main__":
    cli.run(main)
