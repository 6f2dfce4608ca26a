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


# ---------------------------------------------------------------- issue 25 item 7 (fail-first on the old code)
def _cleanfid_reference(mu1, s1, mu2, s2, eps=1e-6):
    """clean-fid 0.1.35 ``frechet_distance`` (cleanfid/fid.py), written out here from its rules."""
    from scipy import linalg

    covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        covmean = linalg.sqrtm((s1 + np.eye(len(s1)) * eps).dot(s2 + np.eye(len(s1)) * eps))
    if np.iscomplexobj(covmean):
        assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        covmean = covmean.real
    d = mu1 - mu2
    return d.dot(d) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_frechet_distance_is_clean_fids_sqrtm_on_rank_deficient_covariances():
    """n = 300 features of dimension 512: both covariances are rank-deficient (rank 299), scipy's sqrtm returns a
    complex root, and an eigenvalue route differs from it by ~1e-5 here; the value must be clean-fid's."""
    from eval.mjhq import frechet_distance, stats

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((300, 512)), rng.standard_normal((300, 512)) + 0.1
    (m1, s1), (m2, s2) = stats(a), stats(b)
    want = _cleanfid_reference(m1, s1, m2, s2)
    assert abs(frechet_distance(m1, s1, m2, s2) - want) <= 1e-12 * abs(want)


CLEANING_CASES = {   # raw prompt -> what OpenAI's clip.tokenize sees after its cleaning
    "Fish &amp; Chips": "fish & chips",
    "Tom&#39;s   cat\t\non a  mat ": "tom's cat on a mat",
    "a \u201ccurly\u201d and \u2018single\u2019 quote": "a \"curly\" and 'single' quote",
    "a \ufb01ne \ufb02ower": "a fine flower",
    "double &amp;amp; escaped": "double & escaped",
}


@pytest.mark.parametrize("raw", list(CLEANING_CASES))
def test_clip_text_cleaning_is_openais(raw):
    from eval.mjhq import clip_clean

    assert clip_clean(raw) == CLEANING_CASES[raw]
    tok = pytest.importorskip("open_clip.tokenizer")     # open_clip's copy of OpenAI's cleaning, where installed
    assert clip_clean(raw) == tok._clean_lower(raw)


def test_clip_scorer_tokenises_the_cleaned_prompts():
    from types import SimpleNamespace

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    words = "fish & chips a fine flower".split()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "?": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A <|endoftext|>",
                                                      special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", unk_token="?")
    seen = []

    def recording(texts, **kw):
        seen.extend(texts)
        return tok(texts, **kw)
    proc = SimpleNamespace(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32),
                           tokenizer=recording)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=77, eos_token_id=1),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                        image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    scorer = ClipScorer("", model=CLIPModel(cfg), processor=proc)
    img = [Image.new("RGB", (48, 48), (200, 0, 0))]
    raw, clean = scorer(img * 2, ["Fish &amp; Chips", "a \ufb01ne \ufb02ower"]), scorer(img * 2, ["fish & chips", "a fine flower"])
    assert seen[:2] == seen[2:] == ["fish & chips", "a fine flower"]
    assert raw == clean
