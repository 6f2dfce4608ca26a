"""Bad files give one line naming the file (each of these was a traceback before)."""
import pytest

from varbench.errors import UserError


def test_truncated_safetensors_is_one_line_naming_the_file(tmp_path, trained_tiny_cfg):
    from conftest import REPO

    from varbench.weights import load_safetensors

    data = (REPO / "varbench/backbones/infinity/weights/tiny/vae.safetensors").read_bytes()
    bad = tmp_path / "vae.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"cannot read .*vae\.safetensors.*truncated or corrupt"):
        load_safetensors(bad)


def test_malformed_prompt_file_names_file_and_line(tmp_path):
    from varbench.harness.runner import load_prompts

    (tmp_path / "geneval").mkdir()
    (tmp_path / "geneval/evaluation_metadata.jsonl").write_text('{"prompt": "a", "tag": "x"}\n{"prompt": "b", \n')
    with pytest.raises(UserError, match=r"malformed prompt file .*evaluation_metadata\.jsonl \(line 2\)"):
        load_prompts({"name": "geneval", "source": "geneval", "data_dir": str(tmp_path)})
    (tmp_path / "imagereward").mkdir()
    (tmp_path / "imagereward/benchmark-prompts.json").write_text('[{"id": 1}]')
    with pytest.raises(UserError, match=r"no 'prompt' field"):
        load_prompts({"name": "imagereward", "source": "imagereward", "data_dir": str(tmp_path)})


def test_unknown_package_weights_are_not_told_to_git_checkout():
    from varbench.backbones.infinity.load import load_package_weights

    with pytest.raises(UserError, match=r"no package weights named 'mine' \(shipped with varbench: .*tiny"):
        load_package_weights("mine", None, None, None)


def test_weights_config_mismatch_keeps_the_detail_line(trained_tiny_cfg):
    from varbench.harness.registry import build_backbone

    cfg = dict(trained_tiny_cfg, arch=dict(trained_tiny_cfg["arch"], embed_dim=64))
    with pytest.raises(UserError, match=r"does not match the model config: size mismatch for .*torch\.Size"):
        build_backbone(cfg, "cpu", "fp32")
