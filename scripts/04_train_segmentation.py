"""Train one segmentation fold (all stages, SWA); resumes from state.pt; DDP under torchrun.

A fold trained under other settings (its config section, its split or its inputs) is moved aside and
trained from scratch; a finished fold with the same settings is left as it is.
"""

import gc

gc.disable()  # during the imports below (they make millions of objects); cli.run freezes them and resumes

from pneumothorax.models import factory
from pneumothorax.pipeline import cli
from pneumothorax.train import segmentation


def main() -> None:
    p = cli.parser(__doc__, step=True)
    p.add_argument("--fold", type=int, required=True)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = p.parse_args()
    cfg = cli.load_config(args, factory.check_names)
    exp = cli.experiment(cfg, args.exp_dir)
    print(segmentation.train_fold(cfg, args.fold, args.processed, exp, device=args.device, progress=not args.quiet))


if __name__ == "__main__":
    cli.run(main)
