"""The three architectures at given configurations, times seeds, at full budget (FIFO).

Submit to a running cluster (cpu profile on synthetic data by default)::

    ray job submit --working-dir . -- python sweeps/model_comparison.py [--profile smoke|cpu|paper]

See ``--help`` for every flag and configs/model_comparison.yaml for the grid.
"""

import sys
from pathlib import Path

# The job's working directory is the repository: make its packages importable without installing them.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeps.sweep_command import CONFIG_DIR, sweep_main


def main(argv: list[str] | None = None) -> int:
    return sweep_main(CONFIG_DIR / "model_comparison.yaml", argv)


if __name__ == "__main__":
    raise SystemExit(main())
