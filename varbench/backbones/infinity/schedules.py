"""Infinity's official scale schedules and 2-D RoPE positions.

Spec: ``shared/specs/infinity.md`` §3 (schedules) and §5 (RoPE, mode ``rope2d_normalized_by_hw=2``).
Official: FoundationVision/Infinity @4c27bbb5 ``infinity/utils/dynamic_resolution.py`` and
``precompute_rope2d_freqs_grid`` in ``infinity/models/basic.py``.

The (h, w) lists below are the official aspect-ratio templates (data, not code). A schedule is the first
N entries of a template: N = 7, 10, 12, 13 for the presets '0.06M', '0.25M', '0.60M', '1M'. RoPE positions of
every scale are normalised to the last grid of the template's '1M' schedule, whatever preset is used, so the
template (not only the list of sizes) determines the positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# h/w ratio -> 13 (h, w) token grids at VAE stride 16 (official templates).
_RATIO_TO_HWS: dict[float, list[tuple[int, int]]] = {
    1.000: [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40), (48, 48), (64, 64)],
    1.250: [(1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36), (55, 44), (70, 56)],
    1.333: [(1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36), (60, 45), (72, 54)],
    1.500: [(1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32), (63, 42), (78, 52)],
    1.750: [(1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32), (70, 40), (84, 48)],
    2.000: [(1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30), (74, 37), (90, 45)],
    2.500: [(1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26), (80, 32), (100, 40)],
    3.000: [(1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24), (90, 30), (111, 37)],
}
PN_TO_NUM_SCALES = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13, "2M": 14, "4M": 15}
# Beyond '1M': OUR EXTRAPOLATION, not Infinity's. The official table (dynamic_resolution.py) lists 13 grids per
# template and its presets are prefixes of them (7, 10, 12, 13 scales); nothing was trained above 1024². '2M' appends
# one grid with sides x√2 of the template's last, '4M' two (x√2, x2), rounded to even sides (1:1: 64 -> 90 -> 128,
# 1440² and 2048² px); the model's 15 level embeddings cover 15 scales. RoPE positions stay normalised to the
# template's '1M' grid (mode 2, spec §5), so a finer grid interpolates positions inside the trained range instead
# of extrapolating them. Use them to measure memory (ScaleKV, NOVA: "2K on a 24 GB GPU"), not to claim image quality.
EXTRAPOLATED_PN = ("2M", "4M")


def extrapolated_hws(hws: list[tuple[int, int]], extra: int) -> list[tuple[int, int]]:
    """``hws`` followed by ``extra`` grids, the k-th with sides √2^k times the last's, rounded to even."""
    h, w = hws[-1]
    out = list(hws)
    for k in range(1, extra + 1):
        f = 2 ** (k / 2)
        out.append((2 * round(h * f / 2), 2 * round(w * f / 2)))
    return out


def _all_templates() -> dict[float, list[tuple[int, int]]]:
    out: dict[float, list[tuple[int, int]]] = {}
    for r, hws in _RATIO_TO_HWS.items():
        out[r] = hws
        if r != 1.0:  # the inverse key is truncated to 3 decimals, as in the official table
            out[int(1 / r * 1000) / 1000] = [(w, h) for h, w in hws]
    return out


TEMPLATES = _all_templates()


@dataclass(frozen=True)
class Scale:
    """One scale of a schedule: index ``si``, token grid (h, w), and its offset in the flat sequence."""

    si: int
    h: int
    w: int
    start: int
    rule_w: int = 0   # the width that methods' width-keyed rules see (= w on official schedules)

    @property
    def n(self) -> int:
        return self.h * self.w


@dataclass(frozen=True)
class Schedule:
    """A schedule: ``template`` (h/w key), ``pn`` preset, and the token grids.

    Official schedules come from :func:`get_schedule`. :func:`custom_schedule` builds one from explicit grids (used by
    the project's own trained tiny model, whose 10 scales end at 16x16 so that it trains on a CPU); its RoPE
    positions are normalised to its own last grid (``rope_hw``), since no official template defines them.
    """

    template: float
    pn: str
    hws: tuple[tuple[int, int], ...]
    rope_hw: tuple[int, int] | None = None
    rule_widths: tuple[int, ...] | None = None

    @property
    def scales(self) -> list[Scale]:
        out, start = [], 0
        for si, (h, w) in enumerate(self.hws):
            out.append(Scale(si, h, w, start, self.rule_widths[si] if self.rule_widths else w))
            start += h * w
        return out

    @property
    def total_tokens(self) -> int:
        return sum(h * w for h, w in self.hws)

    @property
    def rope_grid(self) -> tuple[int, int]:
        """The last grid of the template's '1M' schedule: RoPE positions are normalised to it (spec §5)."""
        return self.rope_hw if self.rope_hw is not None else TEMPLATES[self.template][-1]

    def as_official(self) -> list[tuple[int, int, int]]:
        return [(1, h, w) for h, w in self.hws]


def nearest_template(h_div_w: float) -> float:
    return min(TEMPLATES, key=lambda t: abs(t - h_div_w))


def get_schedule(h_div_w: float = 1.0, pn: str = "1M") -> Schedule:
    """Official schedule for an aspect ratio (nearest template, as the official scripts do) and a preset
    ('2M'/'4M': our extrapolation beyond the official table, see ``EXTRAPOLATED_PN``)."""
    if pn not in PN_TO_NUM_SCALES:
        raise ValueError(f"unknown pn {pn!r}; expected one of {sorted(PN_TO_NUM_SCALES)}")
    t = nearest_template(h_div_w)
    n = PN_TO_NUM_SCALES[pn]
    return Schedule(t, pn, tuple(extrapolated_hws(TEMPLATES[t], n - len(TEMPLATES[t]))
                                 if n > len(TEMPLATES[t]) else TEMPLATES[t][:n]))


def custom_schedule(hws, rule_widths=None) -> Schedule:
    """A non-official schedule from explicit (h, w) grids, coarse to fine; RoPE normalised to the last grid.

    Not one of Infinity's: for models trained by this project only (``conf/model/tiny.yaml``). Methods key their
    official rules by grid width (FastVAR: prune widths 32, 40; skip 48, 64 ...). ``rule_widths`` gives, per scale,
    the official width whose rule applies; ``conf/model/tiny.yaml`` maps by position from the end of the 1:1
    template (its last scale plays the role of width 64), so the official configs act on it unchanged."""
    hws = tuple((int(h), int(w)) for h, w in hws)
    if rule_widths is not None:
        rule_widths = tuple(int(w) for w in rule_widths)
        if len(rule_widths) != len(hws):
            raise ValueError(f"rule_widths needs one width per scale ({len(hws)}), got {len(rule_widths)}")
    if not hws or any(h < 1 or w < 1 for h, w in hws):
        raise ValueError(f"custom schedule needs positive (h, w) grids, got {hws}")
    if any(b[0] < a[0] or b[1] < a[1] for a, b in zip(hws, hws[1:])):
        raise ValueError(f"custom schedule grids must not shrink from one scale to the next: {hws}")
    h, w = hws[-1]
    return Schedule(round(h / w, 3), "custom", hws, rope_hw=(h, w), rule_widths=rule_widths)


def schedule_from_config(s) -> Schedule:
    """``model.schedule`` node: ``{h_div_w, pn}`` (official) or ``{hws: [[h, w], ...]}`` (custom)."""
    if s.get("hws") is not None:
        return custom_schedule(s["hws"], s.get("rule_widths"))
    return get_schedule(float(s.get("h_div_w", 1.0)), str(s["pn"]))


def schedule_from_official(scale_schedule: list) -> Schedule:
    """Recognise an official schedule given as [(1, h, w), ...] (e.g. from a fixture's meta file)."""
    hws = tuple((int(h), int(w)) for _, h, w in scale_schedule)
    for t, tmpl in TEMPLATES.items():
        for pn, n in PN_TO_NUM_SCALES.items():
            if tuple(tmpl[:n]) == hws:
                return Schedule(t, pn, hws)
    raise ValueError(f"{hws} is not an official Infinity schedule: RoPE positions are defined only for those (spec §5)")


def rope_positions(schedule: Schedule) -> torch.Tensor:
    """Integer (row, col) RoPE positions of every token of the schedule, [L, 2], in schedule order.

    Mode 2 of the official code: r = round(i * uph / ph), with the product in float32 and round-half-to-even.
    """
    uph, upw = schedule.rope_grid
    rows = []
    for sc in schedule.scales:
        r = (torch.arange(sc.h) * (uph / sc.h)).round().long()
        c = (torch.arange(sc.w) * (upw / sc.w)).round().long()
        rows.append(torch.stack([r[:, None].expand(sc.h, sc.w), c[None, :].expand(sc.h, sc.w)], -1).reshape(-1, 2))
    return torch.cat(rows, 0)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """cos/sin table for 2-D RoPE, [2, L, head_dim // 2]: 'half' angles from the row, then 'half' from the column.

    inv_freq_i = base^(-2i / (head_dim/2)) for i < head_dim/4 (official ``precompute_rope2d_freqs_grid``).
    """
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))
    ang = torch.cat([positions[:, :1].float() * inv_freq, positions[:, 1:2].float() * inv_freq], dim=-1)
    return torch.stack([ang.cos(), ang.sin()], 0)
