"""The report in a real browser (issue 29): a small real run (model=tiny, bench=shapes, method none/nova/fastvar
and a NOVA 2-point sweep), ``varbench report``, then every page opened in headless Chromium from a COPY of the
report folder (so it must be self-contained). Fails on a console error or uncaught exception, a broken image
(naturalWidth == 0), a broken or non-relative link, or a table number that differs from the results store.
A full-page screenshot of every page is saved in the test's tmp folder (``screenshots/``; also copied to
$VARBENCH_SCREENSHOTS when set), and the bench page as a small JPEG (the README's picture).

Chromium: ``/usr/bin/chromium`` (Debian's package; ``.ci/run`` installs it) or $VARBENCH_CHROMIUM; the test skips with
a reason where there is none. Talks to it over the DevTools protocol with a small websocket client (stdlib only).
"""
from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from varbench.results import store

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def chromium() -> str | None:
    for c in (os.environ.get("VARBENCH_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
              shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


# ------------------------------------------------------------------ a minimal DevTools-protocol client
class WebSocket:
    """Client side of RFC 6455 for the DevTools socket: text frames, masked, no extensions."""

    def __init__(self, url: str, timeout: float = 60.0):
        u = urllib.parse.urlparse(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            head += chunk
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status:
            raise ConnectionError(f"websocket handshake failed: {status!r}")
        self.buf = head.split(b"\r\n\r\n", 1)[1]

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("websocket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send(self, text: str) -> None:
        data = text.encode()
        n = len(data)
        head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
                                if n < 65536 else bytes([0x80 | 127]) + struct.pack(">Q", n))
        mask = os.urandom(4)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def recv(self) -> str:
        parts = []
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(n)
            op = b0 & 0x0F
            if op == 8:
                raise ConnectionError("websocket closed by the browser")
            if op in (9, 10):      # ping / pong: not sent by Chromium to clients in practice; ignore
                continue
            parts.append(payload)
            if b0 & 0x80:
                return b"".join(parts).decode()

    def close(self) -> None:
        self.sock.close()


class Page:
    def __init__(self, ws_url: str):
        self.ws = WebSocket(ws_url)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params):
        self.next_id += 1
        mid = self.next_id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def wait_event(self, name: str, timeout: float = 60.0) -> dict:
        t0 = time.monotonic()
        for i, e in enumerate(self.events):
            if e["method"] == name:
                return self.events.pop(i)
        while time.monotonic() - t0 < timeout:
            msg = json.loads(self.ws.recv())
            if msg.get("method") == name:
                return msg
            if "method" in msg:
                self.events.append(msg)
        raise TimeoutError(name)

    def evaluate(self, expr: str):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page script failed: {r['exceptionDetails']}")
        return r["result"].get("value")


class Browser:
    def __init__(self, exe: str, profile: Path):
        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
             f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        t0 = time.monotonic()
        while not port_file.is_file() or not port_file.read_text().strip():
            if self.proc.poll() is not None or time.monotonic() - t0 > 60:
                self.close()
                pytest.fail(f"chromium did not start (exit {self.proc.poll()})")
            time.sleep(0.2)
        self.port = int(port_file.read_text().split()[0])

    def page(self) -> Page:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=30) as r:
            targets = [t for t in json.load(r) if t.get("type") == "page"]
        return Page(targets[0]["webSocketDebuggerUrl"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


CHECK_JS = r"""
(() => {
  const imgs = [...document.images].map(i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0}));
  const refs = [...document.querySelectorAll('[href],[src]')].map(e => ({
      raw: e.getAttribute('href') || e.getAttribute('src'), abs: e.href || e.src}));
  const cells = [...document.querySelectorAll('table[data-kind="runs"] tr[data-run] td[data-metric]')].map(td => ({
      run: td.closest('tr').dataset.run, metric: td.dataset.metric, text: td.textContent.trim()}));
  return {imgs, refs, cells, height: document.documentElement.scrollHeight, title: document.title,
          tables: document.querySelectorAll('table').length};
})()
"""


def parse_cell(text: str) -> tuple[float, float] | None:
    """'1.45×' / '24.0%' / '0.6493' / '1' -> (value, half of the last printed digit); '—' -> None."""
    if text.startswith("—"):
        return None
    pct = text.endswith("%")
    t = text.rstrip("×%")
    dec = len(t.split(".")[1]) if "." in t else 0
    v = float(t)
    tol = 0.5 * 10 ** -dec
    return (v / 100, tol / 100) if pct else (v, tol)


def run_cmd(args: list[str], env: dict) -> None:
    p = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, f"{' '.join(args)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    exe = chromium()
    if exe is None:
        pytest.skip("no Chromium (install Debian's `chromium`, or set VARBENCH_CHROMIUM): the browser test needs it")
    root = tmp_path_factory.mktemp("results")
    env = os.environ | {"VARBENCH_RESULTS": str(root)}
    run_cmd(["run.py", "-m", "method=none,nova,fastvar", "bench=shapes", "bench.limit=4"], env)
    run_cmd(["run.py", "-m", "method=nova", "method.alpha=0.3,0.7", "bench=shapes", "bench.limit=4"], env)
    run_cmd(["run.py", "report", "--no-progress"], env)            # `varbench report` (the console script is run.py)
    assert (root / "report" / "index.html").is_file()
    copy = tmp_path_factory.mktemp("copied") / "site"              # a copied folder must still work
    shutil.copytree(root / "report", copy)
    shutil.rmtree(root / "report")
    return {"exe": exe, "root": root, "site": copy, "shots": tmp_path_factory.mktemp("screenshots")}


def test_every_page_in_chromium(site):
    exe, root, folder = site["exe"], site["root"], site["site"]
    df = store.load(root)
    want: dict[tuple[str, str], set[float]] = {}      # a run scored on several item sets has several values
    for r in df.itertuples():
        want.setdefault((r.run, r.metric), set()).add(r.value)
    pages = sorted(folder.glob("*.html"))
    assert len(pages) == 1 + 1 + 5, [p.name for p in pages]        # index, tiny/shapes, 5 runs
    profile = folder.parent / "chromium-profile"
    profile.mkdir()
    browser = Browser(exe, profile)
    problems, checked, shots = [], 0, []
    try:
        page = browser.page()
        page.call("Page.enable")
        page.call("Runtime.enable")
        page.call("Log.enable")
        for p in pages:
            page.events.clear()
            page.call("Page.navigate", url=p.as_uri())
            page.wait_event("Page.loadEventFired")
            info = page.evaluate(CHECK_JS)
            for e in page.events:
                m, prm = e["method"], e.get("params", {})
                if m == "Runtime.exceptionThrown":
                    problems.append(f"{p.name}: exception {prm['exceptionDetails'].get('text')}")
                elif m == "Runtime.consoleAPICalled" and prm.get("type") in ("error", "assert"):
                    problems.append(f"{p.name}: console.{prm['type']} {prm.get('args')}")
                elif m == "Log.entryAdded" and prm["entry"].get("level") == "error":
                    problems.append(f"{p.name}: console error {prm['entry'].get('text')} {prm['entry'].get('url')}")
            problems += [f"{p.name}: broken image {i['src']}" for i in info["imgs"] if not i["ok"]]
            for ref in info["refs"]:
                raw, target = ref["raw"], urllib.parse.urlparse(ref["abs"])
                if re.match(r"^[a-z]+:", raw) or raw.startswith("/"):
                    problems.append(f"{p.name}: non-relative link {raw}")
                elif target.scheme != "file" or not Path(urllib.parse.unquote(target.path)).exists():
                    problems.append(f"{p.name}: broken link {raw}")
            for c in info["cells"]:
                checked += 1
                got, key = parse_cell(c["text"]), (c["run"], c["metric"])
                if got is None:
                    if any(math.isfinite(v) for v in want.get(key, ())):
                        problems.append(f"{p.name}: {key} shows — but the store has {want[key]}")
                elif key not in want:
                    problems.append(f"{p.name}: {key} shows {c['text']} but the store has no such value")
                elif not any(abs(got[0] - v) <= got[1] + 1e-9 for v in want[key]):
                    problems.append(f"{p.name}: {key} shows {c['text']}, the store has {want[key]}")
            assert info["imgs"], f"{p.name}: no image on the page"
            page.call("Emulation.setDeviceMetricsOverride", width=1400, height=min(int(info["height"]), 12000),
                      deviceScaleFactor=1, mobile=False)
            shot = page.call("Page.captureScreenshot", format="png")
            out = site["shots"] / (p.stem + ".png")
            out.write_bytes(base64.b64decode(shot["data"]))
            shots.append(out)
            if p.name.startswith("bench-"):    # the bench page, small (the README's picture)
                top = page.call("Page.captureScreenshot", format="jpeg", quality=80,
                                clip={"x": 0, "y": 0, "width": 1400, "height": min(int(info["height"]), 3000),
                                      "scale": 0.6})
                (site["shots"] / (p.stem + "-top.jpg")).write_bytes(base64.b64decode(top["data"]))
            page.call("Emulation.clearDeviceMetricsOverride")
        page.ws.close()
    finally:
        browser.close()
    assert not problems, "\n".join(problems)
    # every stored speed/fidelity value of every run appears on the run's bench page and its own page at least
    assert checked >= 2 * sum(1 for (_, m) in want if m in ("speedup", "latency_s", "flop_speedup", "tokens_frac"))
    assert all(s.stat().st_size > 10_000 for s in shots), "a blank screenshot"
    if os.environ.get("VARBENCH_SCREENSHOTS"):       # keep them: VARBENCH_SCREENSHOTS=<folder> python -m pytest ...
        keep = Path(os.environ["VARBENCH_SCREENSHOTS"])
        keep.mkdir(parents=True, exist_ok=True)
        for f in site["shots"].iterdir():
            shutil.copy2(f, keep / f.name)
    print(f"\n{len(pages)} pages, {checked} table cells checked against the store; screenshots in {site['shots']}")
