"""SkipVAR: per-sample step skipping and unconditional-branch replacement (arXiv 2506.08908).

Official code: fakerone-li/SkipVAR @607be0e, ``infinity/models/infinity.py`` ``autoregressive_infer_cfg_SkipVAR``
and ``basic.py`` ``forward_cond``; spec ``shared/specs/methods.md`` §4. Behaviour reproduced:
  * after sampling scale ``decision_si`` (official: 9 of 13), decode two snapshots of the accumulated codes — after
    ``decision_si − 1`` and after ``decision_si`` — resized (trilinear, also when shrinking) to the VAE grid of
    scale ``preview_si`` (official: 4);
  * features: diff_hf = mean |Sobel magnitude(new) − Sobel magnitude(old)| on the channel-mean gray image, and
    hf_ratio = FFT amplitude outside a centred disk of radius int(0.4·min(H, W)/2) over the total (+1e-6), new only;
  * StandardScaler + multinomial logistic regression (argmax of affine scores; numbers in ``data/``, no pickle);
    skip k > 0: stop before scale T − k; else uncond u: CFG's unconditional branch dropped from scale T − u on;
  * cond-only scales: the backbone slices the batch, conditioning and every KV cache to the cond rows, and the
    logits given to the sampler are cfg·ℓ + (1−cfg)·ℓ (the official formula on cond logits).
Scale indices are given relative to the schedule's end (``decision_from_end: 4`` = scale 9 of 13), so that the
rule also runs on other schedule lengths (e.g. model=tiny's 12 scales); on 13 scales it is the official one.
B = 1 (decisions are per image).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from varbench.errors import UserError
from varbench.hooks import Method, MethodConfig, ScaleCtx, ScalePlan

DATA = Path(__file__).resolve().parent / "data"


def sobel_magnitude(img: torch.Tensor) -> torch.Tensor:
    kx = torch.tensor([[[[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]]], device=img.device)
    gray = img.mean(dim=1, keepdim=True)
    gx = F.conv2d(gray, kx, padding=1)
    gy = F.conv2d(gray, kx.permute(0, 1, 3, 2), padding=1)
    return torch.sqrt(gx ** 2 + gy ** 2)


def hf_ratio(img: torch.Tensor, freq_ratio: float = 0.4) -> torch.Tensor:
    gray = img.mean(dim=1, keepdim=True).float()
    amp = torch.fft.fftshift(torch.fft.fft2(gray)).abs()
    H, W = amp.shape[-2:]
    radius = int(freq_ratio * min(H, W) / 2)
    y = torch.arange(H, device=img.device).view(-1, 1).expand(H, W)
    x = torch.arange(W, device=img.device).view(1, -1).expand(H, W)
    mask = (((y - H // 2) ** 2 + (x - W // 2) ** 2).sqrt() > radius).float()
    return (amp * mask).sum(dim=[2, 3]) / (amp.sum(dim=[2, 3]) + 1e-6)


def features(old_img: torch.Tensor, new_img: torch.Tensor) -> tuple[float, float]:
    """(diff_hf, hf_ratio) of two decoded previews [1, 3, H, W] in [-1, 1]."""
    diff = F.l1_loss(sobel_magnitude(new_img), sobel_magnitude(old_img))
    return float(diff), float(hf_ratio(new_img, 0.4))


@dataclass
class LinearDecision:
    """StandardScaler + multinomial logistic regression: classes[argmax(W·(x−μ)/σ + b)]."""

    scaler_mean: list
    scaler_scale: list
    classes: list
    coef: list
    intercept: list

    def scores(self, x: list[float]) -> list[float]:
        z = [(xi - m) / s for xi, m, s in zip(x, self.scaler_mean, self.scaler_scale)]
        return [sum(w * zi for w, zi in zip(row, z)) + b for row, b in zip(self.coef, self.intercept)]

    def predict(self, x: list[float]) -> int:
        s = self.scores(x)
        return int(self.classes[max(range(len(s)), key=s.__getitem__)])


@dataclass
class SkipVARConfig(MethodConfig):
    name: str = "skipvar"
    family: str = "skipvar"
    decision_model: str = "skipvar_ssim84"   # baselines/data/<name>.json
    decision_from_end: int = 4               # decide after scale T − 4 (official: 9 of 13)
    preview_si: int = 4                      # decode previews on the VAE grid of this scale (official: 4)
    freq_ratio: float = 0.4

    def load(self) -> tuple[LinearDecision, LinearDecision]:
        p = DATA / f"{self.decision_model}.json"
        if not p.exists():
            raise UserError(f"unknown SkipVAR decision model {self.decision_model!r}: {p} does not exist")
        d = json.loads(p.read_text())
        return LinearDecision(**d["skip"]), LinearDecision(**d["uncond"])


class SkipVAR(Method):
    CITATION = "SkipVAR, arXiv 2506.08908; official fakerone-li/SkipVAR @607be0e; shared/specs/methods.md §4"
    STATUS = "exact (fixture-verified on Infinity)"
    Config = SkipVARConfig
    NOOP = {"decision_from_end": 99}       # the decision scale is never reached
    FAMILIES = ("infinity",)               # the official code and decision model exist for Infinity only
    features = staticmethod(features)      # the decision features, for checks that only have the class (fixtures)
    batch_rectangular = False
    cfg: SkipVARConfig

    def __init__(self, cfg: SkipVARConfig | None = None):
        super().__init__(cfg)
        self.skip_model, self.uncond_model = self.cfg.load()

    def reset(self) -> None:
        self.old_state = None
        self.decision: dict = {}
        self.stop_at: int | None = None
        self.cond_only_from: int | None = None

    def plan_scale(self, sctx: ScaleCtx) -> ScalePlan:
        skip = self.stop_at is not None and sctx.si >= self.stop_at
        if skip:
            self.claim_skip(sctx)
        cond_only = self.cond_only_from is not None and sctx.si >= self.cond_only_from
        return ScalePlan(skip=skip, cond_only=cond_only)

    def after_scale(self, sctx: ScaleCtx, state) -> None:
        T, d = sctx.num_scales, sctx.num_scales - self.cfg.decision_from_end
        if sctx.si == d - 1:
            self.old_state = state        # states are values: the loop never edits one in place
        if sctx.si != d or self.old_state is None:
            return
        old, new = sctx.preview(self.old_state, self.cfg.preview_si), sctx.preview(state, self.cfg.preview_si)
        diff_hf = float(F.l1_loss(sobel_magnitude(new), sobel_magnitude(old)))
        ratio = float(hf_ratio(new, self.cfg.freq_ratio))
        x = [diff_hf, ratio]
        k = self.skip_model.predict(x)
        u = self.uncond_model.predict(x) if k == 0 else None
        if k > 0:
            self.stop_at = T - k
        elif u:
            self.cond_only_from = T - u
        self.decision = {"diff_hf": diff_hf, "hf_ratio": ratio, "skip_pred": k, "uncond_pred": u,
                         "skip_scores": self.skip_model.scores(x)}

    def summary(self) -> dict:
        return dict(self.decision, stop_at=self.stop_at, cond_only_from=self.cond_only_from)

