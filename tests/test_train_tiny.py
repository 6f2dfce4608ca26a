"""The tiny-model training script is deterministic for a seed (a short run twice gives identical weights), on the
textured world with anchored layouts (the defaults; the flat world is pinned byte for byte by tests/test_shapes.py)."""
import subprocess
import sys

from conftest import REPO


def test_training_is_reproducible(tmp_path):
    outs = []
    for k in range(2):
        out = tmp_path / f"w{k}"
        r = subprocess.run([sys.executable, "scripts/train_tiny.py", "--out", str(out), "--world", "textured",
                            "--vae-steps", "2", "--vae-batch", "2", "--steps", "2", "--batch", "2"],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        assert "[transformer] step" in r.stdout and "loss" in r.stdout and "CE per scale" in r.stdout
        outs.append([(out / f).read_bytes() for f in ("infinity.safetensors", "vae.safetensors", "text.safetensors")])
    assert outs[0] == outs[1]
