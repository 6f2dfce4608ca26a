"""varbench entry point: ``python run.py model=<m> method=<x> bench=<b> [key=value ...]`` (Hydra).

The same as the ``varbench`` console script: ``varbench/harness/cli.py`` checks the command line (one-line errors,
exit code 2), then ``varbench/harness/runner.py`` does the run.
"""
from varbench.harness.cli import main

if __name__ == "__main__":
    main()
