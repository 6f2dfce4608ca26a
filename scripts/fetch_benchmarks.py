"""Download a benchmark's prompt files from their official sources into the data cache, recording URL and sha256.

    python scripts/fetch_benchmarks.py geneval imagereward hpsv2 mjhq30k dpg_bench

Needs internet (run it on your machine, not in CI). Files land in $VARBENCH_DATA (default ~/.cache/varbench/data)
as <source>/<file>, each with <file>.source.json = {url, sha256, fetched}. DPG-Bench prompts are a folder: they are
listed with the GitHub git-trees API at the pinned commit and fetched one by one.
"""
import argparse
import hashlib
import json
import sys
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def fetch(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    data = urllib.request.urlopen(url, timeout=60).read()
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(dest)
    meta = {"url": url, "sha256": hashlib.sha256(data).hexdigest(),
            "fetched": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    dest.with_name(dest.name + ".source.json").write_text(json.dumps(meta, indent=1))
    print(f"{dest}  sha256 {meta['sha256'][:16]}…")


def main(argv=None) -> int:
    from eval.datasets import SOURCES, data_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", nargs="+", choices=sorted(SOURCES))
    a = ap.parse_args(argv)
    root = data_dir()
    for src in a.sources:
        for name, url in SOURCES[src].items():
            if name == "prompts":  # a folder of 1065 files: list it with the git trees API at the pinned commit
                commit = url.split("/tree/")[1].split("/")[0]
                api = f"https://api.github.com/repos/TencentQQGYLab/ELLA/git/trees/{commit}?recursive=1"
                tree = json.loads(urllib.request.urlopen(api, timeout=60).read())["tree"]
                for e in tree:
                    if e["path"].startswith("dpg_bench/prompts/") and e["path"].endswith(".txt"):
                        raw = f"https://raw.githubusercontent.com/TencentQQGYLab/ELLA/{commit}/{e['path']}"
                        fetch(raw, root / src / "prompts" / Path(e["path"]).name)
            else:
                fetch(url, root / src / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
