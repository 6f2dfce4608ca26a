"""Per-image score cache, so a scoring stage resumes where it stopped: one JSON line per scored file, keyed by the
file's path relative to the image folder, its size and mtime (a regenerated image is scored again)."""
from __future__ import annotations

import json
from pathlib import Path


class ScoreCache:
    def __init__(self, path: Path, root: Path):
        self.path, self.root = Path(path), Path(root)
        self.data: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    r = json.loads(line)
                    self.data[r["key"]] = r
                except (ValueError, KeyError):
                    continue  # a line cut by a killed run

    def _key(self, f: Path) -> str:
        st = f.stat()
        return f"{f.relative_to(self.root)}|{st.st_size}|{int(st.st_mtime_ns)}"

    def get(self, f: Path):
        r = self.data.get(self._key(f))
        return None if r is None else r["value"]

    def put(self, f: Path, value) -> None:
        r = {"key": self._key(f), "value": value}
        self.data[r["key"]] = r
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(r) + "\n")
