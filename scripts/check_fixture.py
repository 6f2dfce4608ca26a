"""Check a backbone re-implementation against a golden fixture produced by the official code.

    python scripts/check_fixture.py ../shared/fixtures/infinity/tiny_2bstyle_meta.json

Rebuilds the model, VAE, schedule and sampling settings from the meta file alone, loads the weights beside it
strictly, replays the recorded bits, and prints max |Δ| per compared tensor with PASS/FAIL against the fixture's
tolerance. Exit code 0 only on PASS.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("meta", type=Path, help="<dir>/<tag>_meta.json (or meta.json) of a fixture")
    args = ap.parse_args(argv)
    if not args.meta.exists():
        print(f"check_fixture: no such file: {args.meta}", file=sys.stderr)
        return 2
    import torch

    from varbench.harness.fixtures import check_fixture, format_checks

    torch.set_num_threads(max(1, torch.get_num_threads()))
    checks = check_fixture(args.meta)
    print(f"fixture: {args.meta}")
    print(format_checks(checks))
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
