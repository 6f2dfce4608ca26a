"""Per-query attention entropy, exact and streaming (ToProVAR's "FAE", with the corrected accumulator).

Shannon entropy (natural log) of each query's softmax distribution over the visible keys, without materialising
the [Lq, Lk] probability matrix: an online-softmax pass over key chunks keeping, per query,

    m  running max of the logits z,     l = Σ_j exp(z_j − m),     A = Σ_j exp(z_j − m)·z_j

rescaling l and A (and the output accumulator) by exp(m_old − m_new) when the max moves. At the end
O = acc / l, the log-partition L = m + ln l and H = L − A / l (spec ``shared/specs/toprovar_sparvar.md`` §3.3.1;
the paper's printed Algorithm 2 drops a ln(α)·α·l term when the max changes and returns −H). We keep the shifted
A' = A − m·l = Σ_j exp(z_j − m)·(z_j − m) (update A' ← α·(A' + l·(m_old − m_new)) + tile terms), so that
H = ln l − A'/l: the same identity without the cancellation of m against A/l at large logits.

:func:`streaming_attention_entropy` is the reference the tests hold to :func:`materialised_attention_entropy`;
it chunks over keys (and queries) so that memory stays at [rows, H, q_chunk, k_chunk]. Masked keys (mask False)
take no mass; a query with no visible key gets H = 0 and O = 0.
"""
from __future__ import annotations

import torch


def materialised_attention_entropy(q, k, *, scale: float, mask=None) -> torch.Tensor:
    """H [rows, H, Lq] = −Σ p ln p of softmax(q·kᵀ·scale) over the visible keys (materialised, float64 inside)."""
    s = torch.einsum("bhqc,bhkc->bhqk", q.double(), k.double()) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    logp = s.log_softmax(-1)
    p = logp.exp()
    return -(torch.where(p > 0, p * logp, torch.zeros_like(p))).sum(-1).float()


def streaming_attention_entropy(q, k, v=None, *, scale: float, mask=None, k_chunk: int = 1024,
                                q_chunk: int = 1024, want_output: bool = False):
    """(out or None, H) with H [rows, H, Lq] fp32; out [rows, H, Lq, c] in q's dtype when ``want_output``.

    Streams over key chunks of ``k_chunk`` with the (m, l, A) accumulator; exact up to fp32 rounding."""
    if want_output and v is None:
        raise ValueError("want_output needs v")
    rows, nh, Lq, _ = q.shape
    Lk = k.shape[2]
    ents, outs = [], []
    for q0 in range(0, Lq, q_chunk):
        qc = q[:, :, q0:q0 + q_chunk].float()
        n = qc.shape[2]
        m = torch.full((rows, nh, n), float("-inf"), device=q.device)
        l = torch.zeros(rows, nh, n, device=q.device)
        A = torch.zeros(rows, nh, n, device=q.device)
        acc = torch.zeros(rows, nh, n, v.shape[-1], device=q.device) if want_output else None
        for k0 in range(0, Lk, k_chunk):
            s = torch.einsum("bhqc,bhkc->bhqk", qc, k[:, :, k0:k0 + k_chunk].float()) * scale
            vis = None
            if mask is not None:
                vis = mask[..., q0:q0 + n, k0:k0 + k_chunk].expand_as(s)
                s = s.masked_fill(~vis, float("-inf"))
            m_new = torch.maximum(m, s.amax(-1))
            safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)   # all masked so far
            alpha = torch.exp(m - safe)                   # 0 when m = -inf
            e = torch.exp(s - safe[..., None])            # 0 at masked keys
            ez = torch.where(e > 0, e * (s - safe[..., None]), torch.zeros_like(e))   # avoid (-inf)·0
            shift = torch.where(l > 0, l * (m - safe), torch.zeros_like(l))
            A = alpha * (A + shift) + ez.sum(-1)
            l = l * alpha + e.sum(-1)
            if want_output:
                acc = acc * alpha[..., None] + torch.einsum("bhqk,bhkc->bhqc", e, v[:, :, k0:k0 + k_chunk].float())
            m = m_new
        ok = l > 0
        lsafe = torch.where(ok, l, torch.ones_like(l))
        H = torch.where(ok, torch.log(lsafe) - A / lsafe, torch.zeros_like(l))
        ents.append(H)
        if want_output:
            outs.append((acc / lsafe[..., None]).to(q.dtype))
    H = torch.cat(ents, 2)
    return (torch.cat(outs, 2) if want_output else None), H
