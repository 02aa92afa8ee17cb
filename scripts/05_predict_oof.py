"""Out-of-fold predictions: each fold's held-out images with its models and the TTA of infer.tta (what search reads)."""

import gc

gc.disable()  # during the imports below (they make millions of objects); cli.run freezes them and resumes

from pneumothorax.io.paths import ProcessedDir
from pneumothorax.models import factory
from pneumothorax.pipeline import cli
from pneumothorax.predict import oof


def main() -> None:
    p = cli.parser(__doc__, step=True)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = p.parse_args()
    cfg = cli.load_config(args, factory.check_names)
    exp = cli.experiment(cfg, args.exp_dir)
    summary = oof.predict_oof(cfg, exp, ProcessedDir(args.processed), args.device, not args.quiet)
    for fold in summary["folds"]:
        gate = f", gate AUC {fold['classifier']['auc']:.4f}" if "classifier" in fold else ""
        print(f"fold {fold['fold']}: Dice at 0.5 {fold['dice_at_0.5']:.4f} (all-empty {fold['all_empty']:.4f}){gate}")
    cli.record("oof", cfg, exp, args.processed)


if __name__ == "__main__":
    cli.run(main)
