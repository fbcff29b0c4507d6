"""``python -m analysis --experiment PATH [--experiment PATH2] [--out DIR]``: every analysis and report.md.

See :mod:`analysis.report`; each analysis also runs alone, e.g. ``python -m analysis.compare_models``.
"""

from analysis.report import main

if __name__ == "__main__":
    raise SystemExit(main())
