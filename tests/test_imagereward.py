"""ImageReward port: preprocessing equals the published transform, checkpoint keys load with nothing missing, and the
fresh-MLP invariant (-mean/std) on a tiny random model of the same classes."""
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("torchvision", reason="the [eval] extra (torchvision) is not installed")
from eval.imagereward import (  # noqa: E402
    CLIP_MEAN,
    CLIP_STD,
    MEAN,
    STD,
    ImageRewardModel,
    ImageRewardScorer,
    ir_preprocess,
    load_state,
)

TINY = dict(vit=dict(image_size=224, patch=32, width=32, depth=1, heads=2),
            text=dict(vocab_size=30, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))


def test_preprocessing_matches_the_published_steps_on_a_fixed_image():
    img = Image.fromarray((np.random.default_rng(0).random((300, 400, 3)) * 255).astype(np.uint8))
    x = ir_preprocess(img)
    # the published steps by hand: shorter side -> 224 (PIL bicubic), centre crop 224, /255, CLIP mean/std
    r = img.resize((int(224 * 400 / 300), 224), Image.BICUBIC)  # torchvision: long side = int(224 * long / short)
    left = int(round((r.width - 224) / 2.0))
    a = np.asarray(r.crop((left, 0, left + 224, 224)), np.float32) / 255
    ref = (torch.from_numpy(a).permute(2, 0, 1) - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    assert x.shape == (3, 224, 224) and torch.allclose(x, ref, atol=1e-5)


def _tok(tmp_path):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cat", "dog"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    return BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))


def test_checkpoint_round_trip_and_fresh_mlp_invariant(tmp_path):
    torch.manual_seed(0)
    m = ImageRewardModel(**TINY)
    for name, p in m.mlp.layers.named_parameters():  # the package's MLP init: N(0, 1/(768+1)) weights, zero biases
        torch.nn.init.normal_(p, std=1 / 769) if "weight" in name else torch.nn.init.zeros_(p)
    sd = {**m.state_dict(), "blip.text_proj.weight": torch.zeros(1), "blip.text_encoder.embeddings.position_ids": torch.arange(3)}
    m2 = ImageRewardModel(**TINY)
    load_state(m2, sd)                               # extra BLIP heads are ignored, nothing is missing
    scorer = ImageRewardScorer(m2, _tok(tmp_path))
    img = Image.fromarray((np.random.default_rng(1).random((64, 80, 3)) * 255).astype(np.uint8))
    r = scorer([img, img], "a red cat")
    assert r[0] == pytest.approx(r[1]) and r[0] == pytest.approx(-MEAN / STD, abs=1e-3)   # -0.16178
    from varbench.errors import UserError

    with pytest.raises(UserError, match="missing"):
        load_state(ImageRewardModel(**TINY), {k: v for k, v in sd.items() if not k.startswith("mlp.")})
