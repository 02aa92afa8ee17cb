"""Write a synthetic world in today's (stage2) or the stage-1 layout (see pneumothorax.data.synthetic).

Difficulty: --difficulty default|hard|harder sets the three knobs; --noise, --contrast and
--lesion-scale override one of them (1.0 = the default world). --difficulty real moves the world towards
the real SIIM images (their grey-level distribution, their rows per image).
"""

import gc

gc.disable()  # during the imports below (they make millions of objects); cli.run freezes them and resumes

from pneumothorax.data import synthetic
from pneumothorax.pipeline import cli


def main() -> None:
    p = cli.parser(__doc__, config=False)
    p.add_argument("--out", required=True, help="world folder (DATA_DIR)")
    p.add_argument("--n-train", type=int, default=synthetic.WorldSpec.n_train)
    p.add_argument("--n-test", type=int, default=synthetic.WorldSpec.n_test)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--layout", choices=synthetic.LAYOUTS, default="stage2", help="stage2 = today's download")
    p.add_argument("--difficulty", choices=sorted(synthetic.DIFFICULTIES), default="default")
    p.add_argument("--noise", type=float, default=None, help="noise amplitude (x the default's)")
    p.add_argument("--contrast", type=float, default=None, help="pneumothorax contrast against lung (x the default's)")
    p.add_argument("--lesion-scale", type=float, default=None, help="linear size of each pneumothorax (x)")
    args = p.parse_args()
    knobs = dict(synthetic.DIFFICULTIES[args.difficulty])
    knobs.update({k: v for k, v in (("noise", args.noise), ("contrast", args.contrast)) if v is not None})
    if args.lesion_scale is not None:
        knobs["lesion_scale"] = args.lesion_scale
    spec = synthetic.WorldSpec(n_train=args.n_train, n_test=args.n_test, seed=args.seed, layout=args.layout, **knobs)
    out = synthetic.make_world(args.out, spec, args.workers, progress=not args.quiet)
    print(
        f"synthetic world: {out} ({spec.layout} layout, {spec.n_train} train, {spec.n_test} test, seed {spec.seed}, "
        f"noise x{spec.noise:g}, contrast x{spec.contrast:g}, lesions x{spec.lesion_scale:g})"
    )


if __name__ == "__main__":
    cli.run(main)
