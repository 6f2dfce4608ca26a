"""GPU checks (issue 26) and the full-size seeded-random model configs.

``gpu``-marked tests need CUDA and skip with a reason elsewhere (collection is cheap: no model is built at import);
``scripts/gpu_check.py`` runs them as ``pytest -m gpu`` on a lent GPU. On CUDA, for every method config on
``tiny_random`` and ``hart_tiny_random``, in bf16 and fp32: the method contract of ``tests/test_methods_contract.py``
(same seed twice -> the same image, token claims = measured tokens, NOOP facts), the peak memory the loop records =
``torch.cuda.max_memory_allocated`` (also written to the JUnit XML as a property); ``compile=true`` on Infinity;
SparVAR's fast kernels (gather+SDPA, FlexAttention BlockMask) against its masked reference kernels; NOVA's folded
lens against the exact head + guide on the same hidden states in a bf16 loop.

Unmarked (CPU) tests: ``infinity_2b_random``, ``infinity_8b_random`` and ``hart_0.7b_random`` have the architecture,
schedule and sampling of their real configs, build through the ordinary loader on the meta device (no weights
allocated) with the official full-size key/shape manifests, and draw their weights where they are built.
"""
import json
import os
import time

import pytest
import torch
from conftest import REPO, compose_method, shared_path
from test_lens import PROMPTS, Counting, _ent
from test_methods_contract import CONFIGS, MODELS, check_contract
from test_sparvar import dense

from baselines.sparvar import (
    SparVAR,
    SparVARConfig,
    cs4a_sparse_gather,
    cs4a_sparse_reference,
    csla_flex,
    csla_reference,
    flex_block_mask,
)
from nova.method import Nova, NovaConfig
from varbench.harness.registry import build_backbone, build_method, method_class
from varbench.loop import generate

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA (torch.cuda.is_available() is False here); "
                                                 "scripts/gpu_check.py runs these on a GPU")
DTYPES = ["bf16", "fp32"]
RANDOM = {  # full-size seeded config -> (real config, transformer manifest, VAE/tokenizer manifest)
    "infinity_2b_random": ("infinity_2b", "infinity/manifest_infinity_2b.json", "infinity/manifest_vae_d32.json"),
    "infinity_8b_random": ("infinity_8b", "infinity/manifest_infinity_8b.json",
                           "infinity/manifest_vae_d56_f8_14_patchify.json"),
    "hart_0.7b_random": ("hart_0.7b", "hart/manifest_hart_0.7b_transformer_assumed.json",
                         "hart/manifest_hart_tokenizer_with_disc.json"),
}


def _cfg(name: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(REPO / f"conf/model/{name}.yaml"), resolve=True)


_CUDA_BACKBONES: dict = {}
BUDGET_SKIP = "out of scripts/gpu_check.py's time budget for this step"


@pytest.fixture(autouse=True)
def _within_budget():
    """scripts/gpu_check.py sets VARBENCH_GPU_DEADLINE (epoch seconds): tests that would start after it are skipped
    with a reason, so pytest ends by itself (its report written) instead of being stopped at the step's limit."""
    deadline = os.environ.get("VARBENCH_GPU_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip(BUDGET_SKIP)


def cuda_backbone(model: str, dtype: str, compile: bool = False):
    key = (model, dtype, compile)
    if key not in _CUDA_BACKBONES:
        _CUDA_BACKBONES[key] = build_backbone(_cfg(model), "cuda", dtype, compile=compile)
    return _CUDA_BACKBONES[key]


def _gen(bb, method, prompt="two green circles", seed=0):
    cond = prompt if bb.spec.conditioning == "text" else 3   # class-conditional backbones (VAR) take a label
    return generate(bb, [cond], method, torch.Generator(device=bb.device).manual_seed(seed))


# ================================================================== GPU (CUDA only)
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", MODELS)
def test_cuda_images_are_deterministic_and_peak_memory_is_recorded(model, dtype):
    """Same seed, same image (twice); another seed, another image; the loop's peak memory is CUDA's
    max_memory_allocated since the start of that generation, and at least the resident weights."""
    bb = cuda_backbone(model, dtype)
    a, b = _gen(bb, None), _gen(bb, None)
    peak = torch.cuda.max_memory_allocated(bb.device)
    c = _gen(bb, None, seed=1)
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)
    assert torch.isfinite(a.images).all()
    assert b.record.peak_memory_kind == "cuda_max_allocated" and b.record.peak_memory_bytes == peak
    assert peak >= sum(p.numel() * p.element_size() for p in bb.model.parameters())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_blocks_on_cuda(dtype):
    """compile=true on tiny_random: the compiled kernels ran, are deterministic, and in fp32 give eager's images to
    float rounding (in bf16 a rounding difference may flip a sampled bit, so only determinism is required there)."""
    import torch._dynamo

    from varbench.backbones.infinity.model import EAGER_KERNELS

    torch._dynamo.reset()
    try:
        eager, comp = cuda_backbone("tiny_random", dtype), build_backbone(_cfg("tiny_random"), "cuda", dtype,
                                                                           compile=True)
        assert all(b.kernels is not EAGER_KERNELS for b in comp.model.blocks)
        for method in (lambda: None, lambda: Nova(NovaConfig(t_star=6))):
            c1, c2 = _gen(comp, method()), _gen(comp, method())
            assert torch.equal(c1.images, c2.images)
            assert torch.isfinite(c1.images).all()
            if dtype == "fp32":
                e = _gen(eager, method())
                assert c1.record.tokens == e.record.tokens
                assert (c1.images - e.images).abs().max() < 1e-3
        assert torch._dynamo.utils.counters["frames"]["ok"] >= 2
    finally:
        torch._dynamo.reset()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sparvar_fast_kernels_equal_masked_reference_on_cuda(dtype):
    """gather+SDPA (CS4A) and the compiled flex_attention with a BlockMask (CSLA) against the masked references, on
    CUDA tensors (tests/test_sparvar.py checks the same identities on the CPU). Values compared in fp32: in bf16 the
    reference kernels return fp32 and the fast ones bf16."""
    g = torch.Generator(device="cuda").manual_seed(0)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    q = torch.randn(2, 2, 100, 16, generator=g, device="cuda", dtype=dtype)
    k = torch.randn(2, 2, 255, 16, generator=g, device="cuda", dtype=dtype)
    v = torch.randn(2, 2, 255, 16, generator=g, device="cuda", dtype=dtype)
    J = torch.rand(2, 2, 2, 255, generator=g, device="cuda").topk(90, -1).indices
    ref = cs4a_sparse_reference(q, k, v, J, 64, 0.5)
    torch.testing.assert_close(cs4a_sparse_gather(q, k, v, J, 64, 0.5).float(), ref.float(), atol=tol, rtol=tol)
    allk = torch.arange(255, device="cuda").expand(2, 2, 2, -1)
    torch.testing.assert_close(cs4a_sparse_reference(q, k, v, allk, 64, 0.5).float(),
                               dense(q.float(), k.float(), v.float(), 0.5), atol=tol, rtol=tol)
    tiles = torch.rand(4, 8, generator=g, device="cuda") < 0.4
    tiles[:, 0] = True
    ref = csla_reference(q, k, v, tiles, 32, 0.5)
    bm = flex_block_mask(tiles, 32, 100, 255, "cuda")
    torch.testing.assert_close(csla_flex(q, k, v, bm, 0.5).float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sparvar_masked_sdpa_on_a_compressed_cache_equals_the_reference_on_cuda(dtype, device="cuda"):
    """SparVAR in a stack with ScaleKV: the masked SDPA kernels (kernel=fast) against the masked references, with
    keys at token positions that differ per row and head (tests/test_sparvar_stack.py: the same on the CPU)."""
    g = torch.Generator(device=device).manual_seed(0)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    q = torch.randn(2, 2, 100, 16, generator=g, device=device, dtype=dtype)
    k = torch.randn(2, 2, 180, 16, generator=g, device=device, dtype=dtype)
    v = torch.randn(2, 2, 180, 16, generator=g, device=device, dtype=dtype)
    pos = torch.rand(2, 2, 255, generator=g, device=device)[..., :155].argsort(-1)[..., :80].sort(-1).values
    pos = torch.cat((pos, torch.arange(155, 255, device=device).expand(2, 2, -1)), -1)   # 80 kept + this scale's 100
    J = torch.cat((torch.rand(2, 2, 2, 155, generator=g, device=device).topk(60, -1).indices,
                   torch.arange(155, 255, device=device).expand(2, 2, 2, -1)), -1)
    ref = cs4a_sparse_reference(q, k, v, J, 64, 0.5, pos)
    torch.testing.assert_close(cs4a_sparse_reference(q, k, v, J, 64, 0.5, pos, None, True), ref, atol=tol, rtol=tol)
    tiles = torch.rand(4, 8, generator=g, device=device) < 0.4
    tiles[:, -1] = True
    ref = csla_reference(q, k, v, tiles, 32, 0.5, pos, 255)
    torch.testing.assert_close(csla_reference(q, k, v, tiles, 32, 0.5, pos, 255, True), ref, atol=tol, rtol=tol)


@pytest.mark.gpu
@needs_cuda
def test_sparvar_fast_kernels_end_to_end_on_cuda():
    """kernel=auto picks the fast kernels on CUDA; they give the masked reference's image (fp32) and key counts."""
    bb = cuda_backbone("tiny_random", "fp32")
    auto, fast, ref = _gen(bb, SparVAR()), _gen(bb, SparVAR(SparVARConfig(kernel="fast"))), \
        _gen(bb, SparVAR(SparVARConfig(kernel="reference")))
    kernels = {"cs4a_decide": "sdpa+colmass", "cs4a": "gather_sdpa", "csla": "flex_attention"}
    assert auto.method_summary["kernels"] == kernels and fast.method_summary["kernels"] == kernels
    assert ref.method_summary["kernels"] == {"cs4a_decide": "reference", "cs4a": "reference", "csla": "reference"}
    assert fast.record.attn_keys == ref.record.attn_keys
    assert torch.allclose(fast.images, ref.images, atol=1e-3)


class PairedLens(Nova):
    """NOVA on the folded lens, also computing the exact lens (head + guide, as sampling does) on the same hidden
    state at every call: the largest and mean |folded - exact| of the statistics map are kept."""

    def reset(self):
        super().reset()
        self.diffs, self.scale_of_stat = [], []

    def _lens(self, lctx, x):
        stat, rank = super()._lens(lctx, x)
        ex, _ = self._maps(*lctx.guide(lctx.head_logits(x)), lctx.scale.spec)
        d = (stat.float() - ex.float().reshape(stat.shape)).abs()
        self.diffs.append((float(d.max()), float(d.mean())))
        self.scale_of_stat.append(float(ex.float().abs().max()))
        return stat, rank


@pytest.mark.gpu
@needs_cuda
def test_nova_folded_lens_in_bf16_agrees_with_the_exact_lens():
    """In a bf16 loop (blocks bf16, autocast) the folded lens (fp32 by construction) and the exact lens (the head
    under autocast, then guide) see the same hidden states: their entropy maps agree to bf16 rounding; the folded lens
    is what the loop used; and the folded lens equals a float64 entropy of the fp32 head + guide."""
    bb = cuda_backbone("tiny_random", "bf16")
    m = PairedLens(NovaConfig(t_star=6))
    out = _gen(bb, m, "a red circle")
    assert m.diffs and torch.isfinite(out.images).all()
    top = max(m.scale_of_stat)
    assert max(d for d, _ in m.diffs) <= 0.03 * top + 1e-3, (m.diffs, top)
    assert sum(mu for _, mu in m.diffs) / len(m.diffs) <= 0.005 * top + 1e-4
    used = Counting(NovaConfig(t_star=6))
    _gen(bb, used, "a red circle")
    assert used.used["folded"] > 0 and used.used["head"] == 0
    cond = bb.condition(PROMPTS)
    g = torch.Generator(device="cuda").manual_seed(0)
    for scale in (bb.scales()[3], bb.scales()[-1]):
        h = torch.randn(cond.rows, scale.n, bb.spec.embed_dim, generator=g, device="cuda") * 3 + 0.5
        with bb.precision():
            got = bb.lens_entropy(h, cond, scale, "guided")
        with torch.autocast("cuda", enabled=False):
            lg = bb.guide(bb.head(h, cond, scale), cond, scale)[2]
        torch.testing.assert_close(got.double(), _ent(lg.float()), rtol=1e-4, atol=1e-4)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.gpu
@needs_cuda
def test_full_size_random_weights_are_drawn_on_the_gpu():
    """infinity_2b_random on CUDA in bf16: every tensor on the GPU, blocks bf16, and the host's resident memory grew
    by far less than the 8.8 GB of fp32 weights (no full-size host copy); hart_0.7b_random drawn twice: the same
    weights (the CUDA generator is seeded)."""
    import gc

    torch.ones(8, 8, device="cuda") @ torch.ones(8, 8, device="cuda")   # CUDA context and cuBLAS loaded first
    before = _rss_bytes()
    bb = build_backbone(_cfg("infinity_2b_random"), "cuda", "bf16")
    grew = _rss_bytes() - before
    assert {t.device.type for t in bb.model.state_dict().values()} == {"cuda"}
    assert {p.dtype for b in bb.model.blocks for p in b.parameters()} == {torch.bfloat16}
    fp32_bytes = 4 * sum(p.numel() for p in bb.model.parameters())
    assert grew < fp32_bytes / 4, (grew, fp32_bytes)
    del bb
    gc.collect()
    torch.cuda.empty_cache()
    a, b = (build_backbone(_cfg("hart_0.7b_random"), "cuda", "bf16") for _ in range(2))
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert {t.device.type for t in sa.values()} == {"cuda"}


# the broad sweep last: under gpu_check's deadline the specific checks above run first
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", CONFIGS)
def test_method_contract_on_cuda(name, model, dtype, record_property):
    """The CPU contract, on the GPU: deterministic for a seed (two runs, the same image), complete records, claimed
    tokens = measured tokens; the peak memory of the run is written to the JUnit XML (scripts/gpu_check.py)."""
    cfg = compose_method(name)
    cls = method_class(cfg.get("family") or cfg["name"])
    bb = cuda_backbone(model, dtype)
    if cls.FAMILIES is not None and bb.spec.family not in cls.FAMILIES:
        pytest.skip(f"{name} declares FAMILIES={cls.FAMILIES} (the runner refuses {bb.spec.family} in one line)")
    check_contract(bb, lambda: build_method(cfg))
    peak = torch.cuda.max_memory_allocated(bb.device)   # since the reset at the start of the contract's last run
    weights = sum(p.numel() * p.element_size() for p in bb.model.parameters())
    assert peak >= weights, (peak, weights)              # the weights are resident during generation
    record_property("peak_memory_bytes", peak)


# ================================================================== full-size seeded configs (CPU, meta device)
@pytest.mark.parametrize("name", sorted(RANDOM))
def test_random_config_has_the_real_architecture_schedule_and_sampling(name):
    real, ours = _cfg(RANDOM[name][0]), _cfg(name)
    keys = ["family", "arch", "vae", "sampling"] + (["schedule"] if real["family"] == "infinity" else ["rule_widths"])
    assert {k: ours[k] for k in keys} == {k: real[k] for k in keys}
    assert ours["files"] is None and ours["init_on_device"] is True and ours["name"] == name


def _layout(module) -> dict:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def _manifest(rel: str) -> dict:
    return json.loads(shared_path("fixtures", *rel.split("/")).read_text())


@pytest.mark.parametrize("name", sorted(RANDOM))
def test_random_full_size_builds_on_meta_with_the_official_layout(name):
    """The ordinary loader, the full-size config, device=meta: every tensor stays on meta (nothing allocated), and
    the transformer's and the VAE's keys and shapes are those of the official checkpoints."""
    tf_man, vae_man = _manifest(RANDOM[name][1]), _manifest(RANDOM[name][2])
    bb = build_backbone(_cfg(name), "meta", "bf16")
    tensors = list(bb.model.state_dict().values()) + list(bb.vae.state_dict().values())
    assert {t.device.type for t in tensors} == {"meta"}
    assert _layout(bb.model) == {k: v["shape"] for k, v in tf_man["keys"].items()}
    assert list(_layout(bb.model)) == list(tf_man["keys"])
    assert sum(p.numel() for p in bb.model.parameters()) == tf_man["num_params"]
    vae_ref = {k: v["shape"] for k, v in vae_man["keys"].items()}
    if bb.spec.family == "hart":   # the tokenizer manifest holds vae.* (inference) and disc.* (training only)
        vae_ref = {k[len("vae."):]: s for k, s in vae_ref.items() if k.startswith("vae.")}
    assert _layout(bb.vae) == vae_ref
    if bb.spec.family == "infinity":   # bf16 blocks as the official inference; the rest fp32
        assert {p.dtype for b in bb.model.blocks for p in b.parameters()} == {torch.bfloat16}
        assert bb.model.head.weight.dtype == torch.float32


@pytest.mark.parametrize("loader,model", [("varbench.backbones.infinity.load", "tiny_random"),
                                          ("varbench.backbones.hart.load", "hart_tiny_random")])
def test_init_on_device_builds_and_draws_where_the_model_lives(loader, model, monkeypatch):
    """With init_on_device the modules are constructed under the target device (no host copy first) and drawn from a
    generator there; on the CPU the numbers are those of the ordinary seeded build."""
    import importlib

    mod = importlib.import_module(loader)
    seen, real = [], mod.new_modules

    def spy(*a, **k):
        seen.append(torch.get_default_device().type)
        return real(*a, **k)

    monkeypatch.setattr(mod, "new_modules", spy)
    cfg = _cfg(model)
    on_meta = build_backbone(dict(cfg, init_on_device=True), "meta", "fp32")
    assert seen == ["meta"] and {p.device.type for p in on_meta.model.parameters()} == {"meta"}
    plain, drawn = build_backbone(cfg, "cpu", "fp32"), build_backbone(dict(cfg, init_on_device=True), "cpu", "fp32")
    assert seen == ["meta", "cpu", "cpu"]
    for part in ("model", "vae"):
        a, b = getattr(plain, part).state_dict(), getattr(drawn, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = build_backbone(dict(cfg, seed=1), "cpu", "fp32")
    assert not torch.equal(next(other.model.parameters()), next(plain.model.parameters()))
