"""Weight decay, dropout, pooling layers and channels for each architecture, times seeds, ASHA on SSIM.

Submit to a running cluster (cpu profile on synthetic data by default)::

    ray job submit --working-dir . -- python sweeps/regularisation_sweep.py [--profile smoke|cpu|paper]

See ``--help`` for every flag and configs/regularisation_sweep.yaml for the grid.
"""

import sys
from pathlib import Path

# The job's working directory is the repository: make its packages importable without installing them.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeps.sweep_command import CONFIG_DIR, sweep_main


def main(argv: list[str] | None = None) -> int:
    return sweep_main(CONFIG_DIR / "regularisation_sweep.yaml", argv)


if __name__ == "__main__":
    raise SystemExit(main())
