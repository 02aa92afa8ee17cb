"""Train one segmentation fold (all stages, SWA, OOF predictions); resumes from state.pt; DDP under torchrun."""

from pneumothorax import cli, train


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--fold", type=int, required=True)
    p.add_argument("--processed", required=True)
    p.add_argument("--out", required=True, help="models/<exp>/fold<k>")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = p.parse_args()
    cfg = cli.load_config(args)
    print(train.train_fold(cfg, args.fold, args.processed, args.out, args.device, not args.quiet))


if __name__ == "__main__":
    cli.run(main)
