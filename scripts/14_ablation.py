"""The recipe's ablation table on synthetic worlds: models/<exp>/ablation/ablation.md and .csv.

make ablation EXP=demo ABLATION_WORLDS="0" ABLATION_SEEDS="0 1" ABLATION_JOBS=2
"""

import gc

gc.disable()  # during the imports below (they make millions of objects); cli.run freezes them and resumes

import time
from pathlib import Path

from pneumothorax.data import synthetic
from pneumothorax.io.paths import AblationDir
from pneumothorax.models import factory
from pneumothorax.pipeline import ablation, cli


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--out", required=True, help="models/<exp>/ablation")
    p.add_argument("--worlds", type=int, nargs="+", default=[0], help="synthetic world seeds")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    p.add_argument("--n-train", type=int, default=500)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--jobs", type=int, default=1, help="(world, seed) runs trained at once, the cores shared out")
    p.add_argument("--difficulty", choices=sorted(synthetic.DIFFICULTIES), default="default")
    args = p.parse_args()
    cfg = cli.load_config(args, factory.check_names)
    started = time.time()
    size = (args.n_train, args.n_test)
    out = AblationDir(Path(args.out))
    summary = ablation.run(
        cfg, Path(args.config), out, args.worlds, args.seeds, size, args.difficulty, args.quiet, args.jobs
    )
    print(summary.to_string(index=False))
    print(f"ablation -> {out.summary} in {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    cli.run(main)
