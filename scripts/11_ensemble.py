"""Ensemble experiments: blend their OOF and test maps, search post-processing, submit, report.

make ensemble ENSEMBLE="demo demo_r18" NAME=ens1 [WEIGHTS=search]
"""

import gc

gc.disable()  # during the imports below (they make millions of objects); cli.run freezes them and resumes

from pathlib import Path

from pneumothorax.io import atomic
from pneumothorax.io import config as config_mod
from pneumothorax.io.paths import ProcessedDir
from pneumothorax.models import factory
from pneumothorax.pipeline import cli, ensemble
from pneumothorax.post import submission


def _load(name: str, folder: Path) -> config_mod.Config:
    path = folder / f"{name}.yaml"
    cfg = config_mod.load(path if path.exists() else name)
    factory.check_names(cfg)
    return cfg


def main() -> None:
    p = cli.parser(__doc__, config=False)
    p.add_argument("--members", nargs="+", required=True, help="experiment names (their configs and models/<exp>)")
    p.add_argument("--name", required=True, help="the ensemble's name: models/<name>, submissions/<name>.csv")
    p.add_argument("--configs-dir", default="configs")
    p.add_argument("--models-dir", default="models")
    p.add_argument("--processed", required=True)
    p.add_argument("--weights", choices=["equal", "search"], default="equal")
    p.add_argument("--out", required=True, help="submission CSV")
    p.add_argument("--labels", default=None, help="test labels to score the submission against (optional)")
    args = p.parse_args()
    configs = [_load(name, Path(args.configs_dir)) for name in args.members]
    members = [ensemble.member(cfg, Path(args.models_dir)) for cfg in configs]
    out = ensemble.out_dir(members, Path(args.models_dir), args.name)
    processed = ProcessedDir(args.processed)
    record = ensemble.build(members, out, processed, args.weights, not args.quiet)
    submission.make_submission(out, processed, Path(args.out), progress=not args.quiet)
    test = None
    if args.labels and Path(args.labels).exists():
        scores = submission.score(Path(args.out), Path(args.labels))
        atomic.write_json(out.score, scores)
        test = scores["score"]
    print(f"report -> {ensemble.report(record, out, test)}")
    nan = float("nan")
    for row in record["members"]:
        print(f"  {row['experiment']}: OOF {row.get('oof_full', nan):.4f}, test {row.get('test', nan):.4f}")
    weights = [round(w, 3) for w in record["weights"]]
    tested = f", test {test:.4f}" if test is not None else ""
    print(f"  {args.name} (weights {weights}): OOF {record['score_full_resolution']:.4f}{tested}")


if __name__ == "__main__":
    cli.run(main)
