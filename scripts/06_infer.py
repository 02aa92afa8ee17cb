"""Test-set probabilities: every fold with the TTA of infer.tta, averaged; classifier gate probabilities."""

import gc

gc.disable()  # during the imports below (they make millions of objects); cli.run freezes them and resumes

from pneumothorax.io.paths import ProcessedDir
from pneumothorax.models import factory
from pneumothorax.pipeline import cli
from pneumothorax.predict import infer


def main() -> None:
    p = cli.parser(__doc__, step=True)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = p.parse_args()
    cfg = cli.load_config(args, factory.check_names)
    exp = cli.experiment(cfg, args.exp_dir)
    out = infer.infer_test(cfg, exp, ProcessedDir(args.processed), args.device, not args.quiet)
    print(f"test predictions -> {out}")
    cli.record("infer", cfg, exp, args.processed)


if __name__ == "__main__":
    cli.run(main)
