"""models/leaderboard.md and .csv: every experiment and ensemble, best out-of-fold score first."""

import gc

gc.disable()  # during the imports below (they make millions of objects); cli.run freezes them and resumes

from pathlib import Path

from pneumothorax.pipeline import cli, leaderboard


def main() -> None:
    p = cli.parser(__doc__, config=False)
    p.add_argument("--models-dir", default="models")
    args = p.parse_args()
    table = leaderboard.build(Path(args.models_dir))
    print(table.to_string(index=False))


if __name__ == "__main__":
    cli.run(main)
