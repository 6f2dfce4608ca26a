"""MJHQ-30K metrics: FID through the TorchScript-Inception path (a random TorchScript net stands in for the file),
clean-fid resizing, and a CLIP score whose truncation keeps the end-of-text token."""
import numpy as np
import pytest
import torch
from PIL import Image

from eval.mjhq import ClipScorer, InceptionFeatures, clean_resize, fid


class TinyFeat(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 5, stride=4)

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x / 255.0)), 2).flatten(1)


@pytest.fixture(scope="module")
def jit_file(tmp_path_factory):
    torch.manual_seed(0)
    p = tmp_path_factory.mktemp("inc") / "inception.pt"
    torch.jit.script(TinyFeat()).save(str(p))
    return p


def _imgs(folder, n, seed, shift=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        a = (rng.random((40, 40, 3)) * 200 + shift).clip(0, 255).astype(np.uint8)
        Image.fromarray(a).save(folder / f"{i}.png")


@pytest.mark.parametrize("resize", ["clean", "bilinear"])
def test_fid_identical_is_zero_and_shift_increases(tmp_path, jit_file, resize):
    _imgs(tmp_path / "a", 12, 0)
    _imgs(tmp_path / "b", 12, 1, shift=60)
    feats = InceptionFeatures(jit_file, resize)
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
