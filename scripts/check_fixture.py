"""Check a backbone re-implementation against a golden fixture produced by the official code.

    python scripts/check_fixture.py ../shared/fixtures/infinity/tiny_2bstyle_meta.json

Rebuilds the model, VAE, schedule and sampling settings from the meta file alone, loads the weights beside it
strictly, replays the recorded bits, and prints max |Δ| per compared tensor with PASS/FAIL against the fixture's
tolerance. Selection-based methods (FastVAR) replay the official kept tokens downstream and have their own
selection checked on the block inputs, near-ties accepted and counted (``varbench/harness/fixtures.py``), so the
verdict holds on every CPU. Exit code 0 on PASS, 1 on FAIL, 2 on bad input (one line: a missing file, a folder,
a corrupt JSON or safetensors file, an unsupported fixture family).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from varbench.errors import UserError  # noqa: E402  (light: no torch)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("meta", type=Path, help="<dir>/<tag>_meta.json (or meta.json) of a fixture")
    ap.add_argument("--free-running", action="store_true",
                    help="let OUR selection drive the run (diagnostics only: a near-tie flip on another CPU makes "
                         "it diverge); default: the official selection is replayed downstream")
    args = ap.parse_args(argv)
    try:
        import torch

        from varbench.harness import fixtures

        fixtures.read_meta(args.meta)  # a folder / missing file / corrupt JSON: one line before any loading
        torch.set_num_threads(max(1, torch.get_num_threads()))
        if args.free_running:
            checks = fixtures.check_infinity_fixture(args.meta, teacher_forced_selection=False)
        else:
            checks = fixtures.check_fixture(args.meta)
    except UserError as e:
        print(f"check_fixture: {e}", file=sys.stderr)
        return 2
    print(f"fixture: {args.meta}")
    print(fixtures.format_checks(checks))
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
