"""Write a synthetic SIIM-ACR world in today's (stage2) or the stage-1 layout (see pneumothorax.synthetic)."""

from pneumothorax import cli, synthetic


def main() -> None:
    p = cli.parser(__doc__, config=False)
    p.add_argument("--out", required=True, help="world folder (DATA_DIR)")
    p.add_argument("--n-train", type=int, default=synthetic.WorldSpec.n_train)
    p.add_argument("--n-test", type=int, default=synthetic.WorldSpec.n_test)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--layout", choices=synthetic.LAYOUTS, default="stage2", help="stage2 = today's download")
    args = p.parse_args()
    spec = synthetic.WorldSpec(n_train=args.n_train, n_test=args.n_test, seed=args.seed, layout=args.layout)
    out = synthetic.make_world(args.out, spec, args.workers, progress=not args.quiet)
    print(f"synthetic world: {out} ({spec.layout} layout, {spec.n_train} train, {spec.n_test} test, seed {spec.seed})")


if __name__ == "__main__":
    cli.run(main)
