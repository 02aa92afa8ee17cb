"""Train one classifier (gate) fold; resumes from its state.pt. Works under torchrun (DDP)."""

from pneumothorax import classifier, cli


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--fold", type=int, required=True)
    p.add_argument("--processed", required=True)
    p.add_argument("--out", required=True, help="models/<exp>/classifier/fold<k>")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = p.parse_args()
    cfg = cli.load_config(args)
    summary = classifier.train_classifier_fold(cfg, args.fold, args.processed, args.out, args.device, not args.quiet)
    print(summary)


if __name__ == "__main__":
    cli.run(main)
