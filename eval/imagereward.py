"""ImageReward (THUDM/ImageReward @c1392c6, ``ImageReward/ImageReward.py``) without the package's pinned stack.

The reward model is BLIP's ViT-L/16 image encoder + BLIP's BERT text encoder with cross-attention to the image +
an MLP (768-1024-128-64-16-1, no activations); reward = (mlp(text CLS state) − 0.16717362830052426) /
1.0333394966054072 (shared/specs/evaluation.md §4). We build the same modules — our ViT with the official
``visual_encoder`` keys, transformers' ``BlipTextModel`` (a port of BLIP's med.py: same key names) for the text
encoder — and load ``ImageReward.pt`` with zero missing keys. Prompt: bert-base-uncased with BLIP's added tokens
([DEC], [ENC]; vocab 30524), padded/truncated to 35. Image: resize 224 (bicubic), centre crop, CLIP mean/std.
The ``image-reward`` package itself needs transformers<=4.45 (see the ``imagereward`` extra); our port has not
been compared with it numerically here (no weights, and the package does not install beside transformers 5).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from eval.cache import ScoreCache
from eval.datasets import data_dir, need
from varbench.errors import UserError
from varbench.weights import resolve_files, weights_dir

MEAN, STD = 0.16717362830052426, 1.0333394966054072
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def ir_preprocess(img) -> torch.Tensor:
    """The published transform: Resize(224, bicubic) on the PIL image, CenterCrop(224), RGB, ToTensor, Normalize."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    t = Compose([Resize(224, interpolation=InterpolationMode.BICUBIC), CenterCrop(224), lambda im: im.convert("RGB"),
                 ToTensor(), Normalize(CLIP_MEAN, CLIP_STD)])
    return t(img)


class _Block(nn.Module):
    def __init__(self, C: int, H: int, mlp: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(C, eps=1e-6), nn.LayerNorm(C, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(C, mlp), nn.Linear(mlp, C)
        self.H = H

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).view(B, L, 3, self.H, C // self.H).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.attn.proj(a.transpose(1, 2).reshape(B, L, C))
        return x + self.mlp.fc2(torch.nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


class BlipViT(nn.Module):
    """BLIP's VisionTransformer (timm layout): cls token, learned positions, pre-norm blocks, final norm."""

    def __init__(self, image_size=224, patch=16, width=1024, depth=24, heads=16, mlp_ratio=4.0):
        super().__init__()
        n = (image_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, width))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, width, patch, patch)
        self.blocks = nn.ModuleList(_Block(width, heads, int(width * mlp_ratio)) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        for b in self.blocks:
            x = b(x)
        return self.norm(x)


class ImageRewardModel(nn.Module):
    def __init__(self, vit: dict | None = None, text: dict | None = None):
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel

        vit = vit or {}
        self.blip = nn.Module()
        self.blip.visual_encoder = BlipViT(**vit)
        tcfg = dict(vocab_size=30524, hidden_size=768, encoder_hidden_size=vit.get("width", 1024), intermediate_size=3072,
                    num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=512, layer_norm_eps=1e-12,
                    hidden_act="gelu", is_decoder=True)  # is_decoder builds the cross-attention; forward is bidirectional
        tcfg.update(text or {})
        self.blip.text_encoder = BlipTextModel(BlipTextConfig(**tcfg), add_pooling_layer=False)
        d = tcfg["hidden_size"]
        self.mlp = nn.Module()
        self.mlp.layers = nn.Sequential(nn.Linear(d, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, pixels, input_ids, attention_mask):
        img = self.blip.visual_encoder(pixels)
        out = self.blip.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=img,
                                     encoder_attention_mask=torch.ones(img.shape[:2], dtype=torch.long,
                                                                       device=img.device), is_decoder=False)
        return (self.mlp.layers(out.last_hidden_state[:, 0].float()) - MEAN) / STD


def load_state(model: ImageRewardModel, sd: dict) -> None:
    """Load ImageReward.pt strictly for what the reward uses (visual_encoder, text_encoder, mlp)."""
    keep = {k: v for k, v in sd.items() if k.startswith(("blip.visual_encoder.", "blip.text_encoder.", "mlp."))
            and not k.endswith("position_ids")}
    own = model.state_dict()
    missing = [k for k in own if k not in keep and not k.endswith("position_ids")]
    unexpected = [k for k in keep if k not in own]
    if missing or unexpected:
        raise UserError(f"ImageReward checkpoint mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict(keep, strict=False)


class ImageRewardScorer:
    def __init__(self, model: ImageRewardModel, tokenizer, device="cpu"):
        self.model, self.tok, self.device = model.to(device).eval(), tokenizer, device

    @staticmethod
    def blip_tokenizer(path: str):
        from transformers import BertTokenizer

        tok = BertTokenizer.from_pretrained(path)
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        return tok

    @torch.no_grad()
    def __call__(self, images, prompt: str) -> list[float]:
        t = self.tok(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt").to(self.device)
        px = torch.stack([ir_preprocess(im) for im in images]).to(self.device)
        ids, mask = t.input_ids.expand(len(images), -1), t.attention_mask.expand(len(images), -1)
        return self.model(px, ids, mask)[:, 0].tolist()


OPENCLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def openai_clip(pretrained: str = "openai", arch: str = "ViT-L-14", device: str = "cpu"):
    """OpenAI CLIP through open_clip **with QuickGELU** (the activation OpenAI trained with; the official tools use
    ``clip.load`` / open_clip 2.20 ``ViT-L-14`` + "openai", both QuickGELU). open_clip 3.x builds plain GELU for
    "ViT-L-14" with a weights file or folder and only warns, so QuickGELU is forced here and checked.
    ``pretrained``: the "openai" tag (HF cache), a weights file, or a folder holding one (an HF snapshot of
    timm/vit_large_patch14_clip_224.openai). Returns (model, preprocess, tokenizer)."""
    try:
        import open_clip
        from open_clip.transformer import QuickGELU
    except ImportError:
        raise UserError("OpenAI CLIP scoring needs open_clip: pip install -e '.[eval]'") from None
    src = Path(pretrained)
    if src.is_dir():
        found = [src / f for f in OPENCLIP_WEIGHT_FILES if (src / f).is_file()]
        if not found:
            raise UserError(f"no open_clip weights ({' or '.join(OPENCLIP_WEIGHT_FILES)}) in {src}")
        pretrained = str(found[0])
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained, device=device,
                                                                 force_quick_gelu=True)
    if not any(isinstance(m, QuickGELU) for m in model.modules()):
        raise UserError(f"open_clip built {arch} without QuickGELU; OpenAI CLIP scores would be wrong")
    return model.eval(), preprocess, open_clip.get_tokenizer(arch)


class OpenAIClipScore:
    """The "CLIP-Score" column of the ImageReward protocol: raw cosine (not x100) of OpenAI ViT-L/14 features
    (QuickGELU), the prompt truncated keeping the end-of-text token (open_clip's tokenizer, like
    ``clip.tokenize(truncate=True)``)."""

    def __init__(self, model=None, preprocess=None, tokenizer=None, pretrained: str = "openai", device: str = "cpu",
                 arch: str = "ViT-L-14"):
        if model is None:
            model, preprocess, tokenizer = openai_clip(pretrained, arch, device)
        self.model, self.pre, self.tok, self.device = model.eval(), preprocess, tokenizer, device

    @torch.no_grad()
    def __call__(self, images, prompt: str) -> list[float]:
        x = torch.stack([self.pre(im) for im in images]).to(self.device)
        i = torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1)
        t = torch.nn.functional.normalize(self.model.encode_text(self.tok([prompt]).to(self.device)).float(), dim=-1)
        return (i @ t.T)[:, 0].tolist()


def check(bench: dict) -> dict[str, Path]:
    """The files the ``imagereward`` metric needs (reward checkpoint, BLIP tokenizer, CLIP, the prompt file),
    checked before the first image is generated."""
    c = bench.get("imagereward") or {}
    paths = resolve_files({k: dict(v) for k, v in c["files"].items()}, weights_dir(c.get("weights_dir")),
                          "bench.imagereward.weights_dir")
    return paths | {"prompts": need("imagereward", "benchmark-prompts.json", data_dir(bench.get("data_dir")))}


def run(bench: dict, image_dir: Path, out_dir: Path, device: str = "cpu") -> dict[str, float]:
    """ImageReward over the images in <prompt id>/ (Infinity's layout <id>/<id>_<k>.jpg; any png/jpg there is
    scored), 100 prompts x 10 images: mean reward and mean CLIP-Score over all images."""
    import json

    from PIL import Image

    c = bench.get("imagereward") or {}
    paths = check(bench)
    try:
        sd = torch.load(paths["checkpoint"], map_location="cpu", weights_only=not c.get("trust_pickle", False))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"could not read {paths['checkpoint']} with weights_only=True ({type(e).__name__}); if you "
                        "trust it, set bench.imagereward.trust_pickle=true") from None
    model = ImageRewardModel()
    load_state(model, sd)
    scorer = ImageRewardScorer(model, ImageRewardScorer.blip_tokenizer(str(paths["tokenizer"])), device)
    items = json.loads(paths["prompts"].read_text())
    clip = OpenAIClipScore(pretrained=str(paths["clip"]), device=device)

    cache = ScoreCache(out_dir / "imagereward_cache.jsonl", image_dir)
    rewards, clips = [], []
    for it in items:
        folder = Path(image_dir) / str(it["id"])
        files = sorted(f for f in folder.glob("*") if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
        for f in files:
            v = cache.get(f)
            if v is None:
                im = Image.open(f)
                v = [scorer([im], it["prompt"])[0], clip([im], it["prompt"])[0]]
                cache.put(f, v)
            rewards.append(v[0])
            clips.append(v[1])
    if not rewards:
        return {}
    return {"imagereward_score": sum(rewards) / len(rewards), "imagereward_clip_score": sum(clips) / len(clips)}
