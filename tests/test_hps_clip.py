"""open_clip-hosted scorers on a tiny registered open_clip architecture: HPSv2.1 (load path, preprocessing,
aggregation) and GenEval's colour head."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

open_clip = pytest.importorskip("open_clip", reason="the [eval] extra (open_clip_torch) is not installed")

TINY = {"embed_dim": 16, "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "patch_size": 32, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory):
    d = tmp_path_factory.mktemp("oc")
    (d / "varbench-tiny.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(d / "varbench-tiny.json")
    return "varbench-tiny"


def test_hps_preprocessing_resizes_longer_side_and_pads():
    from eval.hpsv2 import MEAN, STD, hps_preprocess

    img = Image.new("RGB", (400, 100), (255, 255, 255))      # W=400, H=100 -> 224 x 56, pad 168 rows
    x = hps_preprocess(img)
    assert x.shape == (3, 224, 224)
    white = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    black = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(x[:, 112, 5], white, atol=1e-3)   # image rows 84..139
    assert torch.allclose(x[:, 10, 5], black, atol=1e-5)    # top padding (84 rows)
    assert torch.allclose(x[:, 200, 5], black, atol=1e-5)   # bottom padding (84 rows)
    sq = hps_preprocess(Image.new("RGB", (448, 448), (255, 0, 0)))
    assert torch.allclose(sq[:, 0, 0], (torch.tensor([1.0, 0, 0]) - torch.tensor(MEAN)) / torch.tensor(STD), atol=1e-3)


def test_hps_loads_a_checkpoint_strictly_and_scores(tmp_path, tiny_arch):
    from eval.hpsv2 import HPSv21, style_score

    torch.manual_seed(0)
    ref = open_clip.create_model(tiny_arch, pretrained=None)
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "HPS_v2.1_compressed.pt")
    hps = HPSv21(tmp_path / "HPS_v2.1_compressed.pt", arch=tiny_arch)
    img = Image.fromarray((np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8))
    s = hps([img, img], ["a cat", "a dog"])
    assert len(s) == 2 and all(-100 <= v <= 100 for v in s) and s == hps([img, img], ["a cat", "a dog"])
    bad = {"state_dict": {k: v for k, v in ref.state_dict().items() if "visual" not in k}}
    torch.save(bad, tmp_path / "bad.pt")
    from varbench.errors import UserError

    with pytest.raises(UserError, match="does not fit"):
        HPSv21(tmp_path / "bad.pt", arch=tiny_arch)
    assert style_score([1.0] * 80 + [3.0] * 40) == 2.0      # chunk means 1 and 3, not the image mean 1.67


def test_geneval_colour_head_runs_on_tiny_open_clip(tiny_arch):
    from eval.geneval.rules import COLORS, Det
    from eval.geneval.scorer import ClipColor

    torch.manual_seed(0)
    model, _, pre = open_clip.create_model_and_transforms(tiny_arch, pretrained=None)
    cc = ClipColor(model=model, preprocess=pre, tokenizer=open_clip.get_tokenizer(tiny_arch))
    img = Image.new("RGB", (64, 64), (255, 0, 0))
    mask = np.zeros((64, 64), bool)
    mask[10:30, 10:30] = True
    out = cc(img, [Det((10, 10, 30, 30), 0.9, mask), Det((0, 0, 64, 64), 0.8, None)], "apple")
    assert len(out) == 2 and all(c in COLORS for c in out)
    assert cc.head("apple").shape == (16, len(COLORS))
    assert torch.allclose(cc.head("apple").norm(dim=0), torch.ones(len(COLORS)), atol=1e-5)


def test_imagereward_clip_score_is_raw_cosine(tiny_arch):
    from eval.imagereward import OpenAIClipScore

    torch.manual_seed(0)
    model, _, pre = open_clip.create_model_and_transforms(tiny_arch, pretrained=None)
    cs = OpenAIClipScore(model=model, preprocess=pre, tokenizer=open_clip.get_tokenizer(tiny_arch))
    s = cs([Image.new("RGB", (50, 40), (0, 0, 255))] * 3, "a blue square " * 40)  # > 77 tokens: truncated
    assert len(s) == 3 and all(-1 <= v <= 1 for v in s) and s[0] == pytest.approx(s[2])


def _acts(model):
    from open_clip.transformer import QuickGELU

    return {type(m) for m in model.modules() if isinstance(m, (QuickGELU, torch.nn.GELU))}


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory, tiny_arch):
    torch.manual_seed(0)
    p = tmp_path_factory.mktemp("ocw") / "open_clip_model.pt"
    torch.save(open_clip.create_model(tiny_arch, pretrained=None).state_dict(), p)
    return p


def test_openai_clip_models_are_built_with_quickgelu(tiny_arch, tiny_weights):
    """OpenAI CLIP was trained with QuickGELU; open_clip 3.x builds plain GELU for a config without quick_gelu
    (e.g. "ViT-L-14" + a weights file/folder) and only warns. Both OpenAI-CLIP scorers must build QuickGELU."""
    from open_clip.transformer import QuickGELU

    from eval.geneval.scorer import ClipColor
    from eval.imagereward import OpenAIClipScore

    assert _acts(ClipColor(tiny_arch, str(tiny_weights)).model) == {QuickGELU}          # GenEval colour head
    assert _acts(OpenAIClipScore(pretrained=str(tiny_weights), arch=tiny_arch).model) == {QuickGELU}   # IR CLIP-Score


def test_quickgelu_changes_a_tiny_models_outputs(tiny_arch, tiny_weights):
    """The activation matters: the same weights give different embeddings under GELU and QuickGELU."""
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    outs = []
    for quick in (False, True):
        m = open_clip.create_model(tiny_arch, pretrained=str(tiny_weights), force_quick_gelu=quick).eval()
        with torch.no_grad():
            outs.append(m.encode_image(x))
    assert not torch.allclose(outs[0], outs[1], atol=1e-4)
