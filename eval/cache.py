"""Per-image score cache, so a scoring stage resumes where it stopped: one JSON line per scored file, keyed by the
file's path relative to the image folder, its size and mtime (a regenerated image is scored again). Written with
``varbench.io``'s JSONL helpers: a line torn by a killed scorer is skipped and never swallows the next one."""
from __future__ import annotations

from pathlib import Path

from varbench.io import append_jsonl, iter_jsonl


class ScoreCache:
    def __init__(self, path: Path, root: Path):
        self.path, self.root = Path(path), Path(root)
        self.data: dict[str, dict] = {r["key"]: r for r in iter_jsonl(self.path) if "key" in r}

    def _key(self, f: Path) -> str:
        st = f.stat()
        return f"{f.relative_to(self.root)}|{st.st_size}|{int(st.st_mtime_ns)}"

    def get(self, f: Path):
        r = self.data.get(self._key(f))
        return None if r is None else r["value"]

    def put(self, f: Path, value) -> None:
        r = {"key": self._key(f), "value": value}
        self.data[r["key"]] = r
        append_jsonl(self.path, [r])
