"""The real loading path (local folder and HF hub cache), exercised with the tiny official-format fixture files."""
import json

import pytest
import torch
from conftest import shared_path

from varbench.backbones.infinity import load
from varbench.errors import MissingWeights


def _tiny_t5_dir(path, d_model):
    """A tiny T5 encoder + a word-level fast tokenizer saved in the HF format (what flan-t5-xl looks like)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate("a red blue circle square".split())}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(path)
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=32, d_ff=64, num_layers=1, num_heads=2)).save_pretrained(path)


def _model_cfg(meta, wdir):
    I, V = meta["infinity"], meta["vae"]
    return {
        "name": "tiny_2bstyle", "family": "infinity", "weights_dir": str(wdir),
        "arch": {k: I[k] for k in ("depth", "embed_dim", "num_heads", "mlp_ratio", "block_chunks", "text_channels", "text_maxlen")},
        "vae": {"codebook_dim": V["codebook_dim"], "base_ch": V["base_ch"], "ch_mult": V["ch_mult"],
                "num_res_blocks": V["num_res_blocks"], "patch_size": V["patch_size(stride)"], "patchify": False},
        "text": {}, "schedule": {"h_div_w": 1.0, "pn": "0.06M"},
        "sampling": {"cfg": 4.0, "tau": 0.5, "top_k": 900, "top_p": 0.97, "cfg_insertion_layer": 0},
        "files": {"transformer": {"file": "tf.pth", "hf_repo": "org/infinity", "url": "https://example.org/tf"},
                  "vae": {"file": "vae.pth", "hf_repo": "org/infinity", "url": "https://example.org/vae"},
                  "text_encoder": {"file": "t5", "hf_repo": "org/t5", "snapshot": True, "url": "https://example.org/t5"}},
    }


def test_local_folder_load_matches_fixture(tmp_path):
    from safetensors.torch import load_file

    d = shared_path("fixtures", "infinity")
    meta = json.loads((d / "tiny_2bstyle_meta.json").read_text())
    f32 = lambda sd: {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}  # noqa: E731
    sd = f32(load_file(str(d / "tiny_2bstyle_infinity_weights.safetensors")))
    sd.pop("block_chunks.0.module.0.sa.zero_k_bias")  # a benign difference the official loader tolerates
    torch.save(sd, tmp_path / "tf.pth")
    vsd = f32(load_file(str(d / "tiny_2bstyle_vae_weights.safetensors")))
    flux = {k.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias"): v for k, v in vsd.items()}
    torch.save({"vae": flux}, tmp_path / "vae.pth")  # the flux spelling of the keys also loads
    _tiny_t5_dir(tmp_path / "t5", meta["infinity"]["text_channels"])
    bb = load.build_infinity(_model_cfg(meta, tmp_path))
    ref = f32(load_file(str(d / "tiny_2bstyle_infinity_weights.safetensors")))
    for k, v in bb.model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    kv, lens = bb.text(["a red circle", "blue square"])
    assert lens == [4, 3] and kv.shape == (7, meta["infinity"]["text_channels"])  # words + </s>


def test_hf_cache_lookup_and_missing_report(tmp_path, monkeypatch):
    import huggingface_hub.constants as C

    cache = tmp_path / "hub"
    snap = cache / "models--org--infinity" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "tf.pth").write_bytes(b"x")
    (cache / "models--org--infinity" / "refs").mkdir()
    (cache / "models--org--infinity" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = {"transformer": {"file": "tf.pth", "hf_repo": "org/infinity", "url": "u1"},
             "vae": {"file": "vae.pth", "hf_repo": "org/infinity", "url": "https://example.org/vae"}}
    with pytest.raises(MissingWeights) as e:
        load.resolve_files(files, tmp_path / "empty")
    msg = str(e.value)
    assert "\n" not in msg and "vae.pth" in msg and "https://example.org/vae" in msg and "tf.pth" not in msg
    assert load.find_file("tf.pth", tmp_path / "empty", "org/infinity") == snap / "tf.pth"


def test_checkpoint_with_wrong_keys_is_refused():
    from varbench.errors import UserError

    m = load.InfinityTransformer(2, 64, 1, 8, 128, 8, 4, 1)
    sd = m.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match="unexpected"):
        load.load_transformer_state(m, sd)
