"""A static HTML report of the results store (the same as ``varbench report``; see varbench/report/).

    python scripts/report.py                          # $VARBENCH_RESULTS (else ./results) -> <root>/report/index.html
    python scripts/report.py --root results --out /tmp/site --prompts 12
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from varbench.report.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
