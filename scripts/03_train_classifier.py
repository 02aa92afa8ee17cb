"""Train one classifier (gate) fold, or pre-train on classifier.external_csv; resumes; DDP under torchrun."""

import gc

gc.disable()  # during the imports below (they make millions of objects); cli.run freezes them and resumes

from pneumothorax.models import factory
from pneumothorax.pipeline import cli
from pneumothorax.train import classifier


def main() -> None:
    p = cli.parser(__doc__, step=True)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--fold", type=int, help="train this fold on the prepared caches")
    which.add_argument("--pretrain", action="store_true", help="train on the config's classifier.external_csv")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = p.parse_args()
    cfg = cli.load_config(args, factory.check_names)
    exp = cli.experiment(cfg, args.exp_dir)
    if args.pretrain:
        if cfg.classifier.external_csv == "none":
            p.error("--pretrain needs classifier.external_csv in the config")
        summary = classifier.pretrain_external(
            cfg, cfg.classifier.external_csv, exp.pretrain.root, device=args.device, progress=not args.quiet
        )
    else:
        summary = classifier.train_classifier_fold(
            cfg, args.fold, args.processed, exp, device=args.device, progress=not args.quiet
        )
    print(summary)


if __name__ == "__main__":
    cli.run(main)
