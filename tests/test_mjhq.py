"""MJHQ-30K metrics: FID through the TorchScript-Inception path (a random TorchScript net with the interface of NVIDIA's
file stands in for it),
clean-fid resizing, and a CLIP score whose truncation keeps the end-of-text token."""
import numpy as np
import pytest
import torch
from PIL import Image

from eval.mjhq import ClipScorer, InceptionFeatures, clean_resize, fid


def _imgs(folder, n, seed, shift=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        a = (rng.random((40, 40, 3)) * 200 + shift).clip(0, 255).astype(np.uint8)
        Image.fromarray(a).save(folder / f"{i}.png")


@pytest.mark.parametrize("resize", ["clean", "legacy_tensorflow"])
def test_fid_identical_is_zero_and_shift_increases(tmp_path, nvidia_like, resize):
    _imgs(tmp_path / "a", 12, 0)
    _imgs(tmp_path / "b", 12, 1, shift=60)
    feats = InceptionFeatures(nvidia_like[0], resize)
    same = fid(tmp_path / "a", tmp_path / "a", feats)
    diff = fid(tmp_path / "a", tmp_path / "b", feats)
    assert abs(same) < 1e-3 and diff > 0.01 and diff > 100 * abs(same)
    assert abs(diff - fid(tmp_path / "b", tmp_path / "a", feats)) < 1e-3 * max(1.0, diff)   # symmetric


def test_clean_resize_is_float_bicubic():
    img = Image.fromarray((np.arange(40 * 40 * 3) % 251).astype(np.uint8).reshape(40, 40, 3))
    out = clean_resize(img, 299)
    assert out.shape == (299, 299, 3) and out.dtype == np.float32
    assert not np.allclose(out, np.round(out))  # not quantised to uint8


def test_clip_score_keeps_end_of_text_on_truncation():
    from types import SimpleNamespace

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{w: i + 2 for i, w in enumerate("a red cat on mat".split())}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A <|endoftext|>",
                                                      special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", unk_token="a")
    proc = SimpleNamespace(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32), tokenizer=tok)
    long_prompt = " ".join(["red cat"] * 60)  # 120 words > 77 tokens
    ids = proc.tokenizer([long_prompt], truncation=True, max_length=77)["input_ids"][0]
    assert len(ids) == 77 and ids[-1] == 1       # end-of-text kept
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=77, eos_token_id=1),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                        image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    scorer = ClipScorer("", model=CLIPModel(cfg), processor=proc)
    s = scorer([Image.new("RGB", (48, 48), (200, 0, 0))] * 2, ["a red cat", long_prompt])
    assert len(s) == 2 and all(0 <= v <= 100 for v in s)


class NvidiaLikeInception(torch.nn.Module):
    """Same interface as NVIDIA's inception-2015-12-05.pt (what clean-fid calls): ``layers`` maps a normalised
    299x299 batch ((x - 128) / 128) to pool3 features [N, D, 1, 1]; ``forward(img, return_features=False)`` takes
    0..255 images of any size, resizes them itself and returns the 1008-way softmax (features when asked)."""

    def __init__(self, dim: int = 24):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Conv2d(3, dim, 7, stride=6), torch.nn.Tanh(),
                                          torch.nn.AdaptiveAvgPool2d(1))
        self.output = torch.nn.Linear(dim, 1008)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(img.float(), size=(299, 299), mode="bilinear", align_corners=False)
        f = self.layers((x - 128) / 128).flatten(1)
        if return_features:
            return f
        return torch.softmax(self.output(f), dim=1)


@pytest.fixture(scope="module")
def nvidia_like(tmp_path_factory):
    torch.manual_seed(0)
    net = torch.jit.script(NvidiaLikeInception())
    p = tmp_path_factory.mktemp("nv") / "inception-2015-12-05.pt"
    net.save(str(p))
    return p, torch.jit.load(str(p))


def test_clean_mode_features_are_pool3_of_layers_on_normalised_clean_resized_input(nvidia_like):
    """clean-fid "clean": PIL-bicubic float resize to 299, then ``layers.forward((x - 128) / 128)`` (pool3), never
    the network's default entry point (softmax over 1008 classes)."""
    path, net = nvidia_like
    rng = np.random.default_rng(3)
    x = torch.from_numpy((rng.random((3, 50, 70, 3)) * 255).astype(np.uint8)).permute(0, 3, 1, 2)
    got = InceptionFeatures(path, "clean")(x)
    resized = np.stack([clean_resize(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in x])
    ref = net.layers.forward((torch.from_numpy(resized).permute(0, 3, 1, 2) - 128) / 128).reshape(3, -1)
    assert got.shape == (3, 24)
    assert torch.allclose(got.float(), ref, atol=1e-5)


def test_legacy_tensorflow_mode_uses_the_return_features_entry_point(nvidia_like):
    path, net = nvidia_like
    x = torch.from_numpy((np.random.default_rng(4).random((2, 40, 40, 3)) * 255).astype(np.uint8)).permute(0, 3, 1, 2)
    got = InceptionFeatures(path, "legacy_tensorflow")(x)
    assert torch.allclose(got.float(), net(x.float(), return_features=True), atol=1e-6)


def test_frechet_distance_closed_form_for_commuting_covariances():
    from eval.mjhq import frechet_distance

    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))          # shared eigenbasis: tr sqrtm(s1 s2) = sum sqrt(a b)
    a, b = rng.random(6) + 0.1, rng.random(6) + 0.1
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12)
