"""VAR backbone: fixture exactness, state-dict layout against every official manifest, strict loading and one-line
errors, class-label conditions (and prompts refused), the CFG ramp, and the two paths (block-causal teacher forcing
and the K/V-cached loop) agreeing on the seeded tiny model."""
import json

import pytest
import torch
from conftest import REPO, shared_path

from varbench.backbones.var.load import new_modules, seeded_init_
from varbench.errors import MissingWeights, UserError
from varbench.harness.registry import build_backbone
from varbench.hooks import Method
from varbench.loop import generate
from varbench.sampling import top_k_top_p


def _model_cfg(name: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(REPO / f"conf/model/{name}.yaml"), resolve=True)


@pytest.fixture(scope="module")
def tiny():
    return build_backbone(_model_cfg("var_tiny_random"), "cpu", "fp32")


def _gen(bb, labels=(3,), method=None, seed=0):
    return generate(bb, list(labels), method, torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def ref(tiny):
    """The image of label 3, seed 0 (computed once: CPU time is shared)."""
    return _gen(tiny).images


# ---------------------------------------------------------------- faithfulness
@pytest.mark.parametrize("tag", ["tiny", "tiny_saln"])
def test_fixture_every_tensor_within_tolerance(tag):
    from varbench.harness.fixtures import check_fixture

    checks = check_fixture(shared_path("fixtures", "var", f"{tag}_meta.json"))
    bad = [f"{c.name}: {c.max_abs_diff:.3g} > {c.tol:g}" for c in checks if not c.ok]
    assert not bad, bad
    names = " ".join(c.name for c in checks)
    for part in ("tf_logits_cond", "tf_logits_uncond", "KV-cached loop", "f_hat_final", "g_seed"):
        assert part in names
    if tag == "tiny":
        assert "image_01" in names and "enc_idx" in names and "enc_recon" in names


MANIFESTS = {"var_d16": "manifest_var_d16.json", "var_d20": "manifest_var_d20.json",
             "var_d24": "manifest_var_d24.json", "var_d30": "manifest_var_d30.json",
             "var_d36_512": "manifest_var_d36_512_saln.json"}


def _layout(module: torch.nn.Module) -> dict:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
            for k, v in module.state_dict().items()}


@pytest.mark.parametrize("model", sorted(MANIFESTS))
def test_state_dict_equals_the_official_manifest(model):
    """Every key, shape and dtype of the official checkpoint (buffers included), and the parameter count."""
    man = json.loads(shared_path("fixtures", "var", MANIFESTS[model]).read_text())
    cfg = _model_cfg(model)
    with torch.device("meta"):
        tf, vae = new_modules(cfg["arch"], cfg["vae"])
    ours = _layout(tf)
    assert ours == man["keys"]
    assert list(ours) == list(man["keys"])            # the official state_dict order too
    assert sum(p.numel() for p in tf.parameters()) == man["num_params"]
    assert man["checkpoint"] == cfg["files"]["transformer"]["file"]


def test_vqvae_state_dict_equals_the_official_manifest():
    man = json.loads(shared_path("fixtures", "var", "manifest_vqvae_ch160v4096z32.json").read_text())
    cfg = _model_cfg("var_d16")
    with torch.device("meta"):
        _, vae = new_modules(cfg["arch"], cfg["vae"])
    assert _layout(vae) == man["keys"]                 # same keys, shapes, dtypes (registration order differs)
    assert man["checkpoint"] == cfg["files"]["vae"]["file"]


# ---------------------------------------------------------------- loading
def test_missing_weights_is_one_line_naming_every_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    cfg = _model_cfg("var_d30")
    cfg["weights_dir"] = str(tmp_path / "w")
    with pytest.raises(MissingWeights) as e:
        build_backbone(cfg, "cpu", "fp32")
    msg = str(e.value)
    assert "\n" not in msg
    for name in ("vae_ch160v4096z32.pth", "var_d30.pth", "huggingface.co/FoundationVision/var", str(tmp_path / "w")):
        assert name in msg


def _tiny_with_files(tmp_path, tf_sd, vae_sd) -> dict:
    torch.save(tf_sd, tmp_path / "var_tiny.pth")
    torch.save(vae_sd, tmp_path / "vae_tiny.pth")
    cfg = _model_cfg("var_tiny_random")
    cfg["weights_dir"] = str(tmp_path)
    cfg["files"] = {"vae": {"file": "vae_tiny.pth", "url": "u"}, "transformer": {"file": "var_tiny.pth", "url": "u"}}
    return cfg


def test_official_format_files_load_strictly_and_generate_the_same(tmp_path, tiny, ref):
    cfg = _tiny_with_files(tmp_path, tiny.model.state_dict(), tiny.vae.state_dict())
    loaded = build_backbone(cfg, "cpu", "fp32")
    assert torch.equal(_gen(loaded).images, ref)


def test_checkpoint_of_another_architecture_is_one_line(tmp_path, tiny):
    sd = dict(tiny.model.state_dict())
    sd["head.weight"] = sd["head.weight"][:, :64]
    sd.pop("blocks.0.attn.q_bias")
    cfg = _tiny_with_files(tmp_path, sd, tiny.vae.state_dict())
    with pytest.raises(UserError) as e:
        build_backbone(cfg, "cpu", "fp32")
    msg = str(e.value)
    assert "\n" not in msg and "var_tiny.pth" in msg and "blocks.0.attn.q_bias" in msg and "head.weight" in msg


def test_ema_statistics_of_another_schedule_are_replaced_as_official(tmp_path, tiny):
    vsd = dict(tiny.vae.state_dict())
    vsd["quantize.ema_vocab_hit_SV"] = torch.ones(5, vsd["quantize.ema_vocab_hit_SV"].shape[1])
    loaded = build_backbone(_tiny_with_files(tmp_path, tiny.model.state_dict(), vsd), "cpu", "fp32")
    assert loaded.vae.quantize.ema_vocab_hit_SV.shape[0] == 10


# ---------------------------------------------------------------- conditions
def test_class_labels_and_the_unconditional_label_are_conditions(tiny):
    a = _gen(tiny, (3, 7, 10))
    assert a.images.shape == (3, 3, 64, 64) and torch.isfinite(a.images).all()
    assert a.state.idx[0].shape == (3, 1) and a.record.text_len == [0, 0, 0]
    cond = tiny.condition([3, 7, 10])
    assert cond.labels.tolist() == [3, 7, 10, 10, 10, 10] and (cond.batch, cond.rows) == (3, 6)


@pytest.mark.parametrize("bad", ["a red circle", 11, -1, True, 2.0])
def test_anything_but_a_label_is_refused_in_one_line(tiny, bad):
    with pytest.raises(UserError) as e:
        _gen(tiny, (3, bad))
    assert "\n" not in str(e.value) and "class label" in str(e.value) and repr(bad) in str(e.value)


def test_text_backbones_refuse_class_labels_in_one_line(tiny_backbone):
    with pytest.raises(UserError) as e:
        generate(tiny_backbone, [3], None, torch.Generator().manual_seed(0))
    assert "\n" not in str(e.value) and "prompt" in str(e.value)
    assert tiny_backbone.spec.conditioning == "text"


def test_spec_says_class_conditioned_categorical(tiny):
    s = tiny.spec
    assert (s.family, s.conditioning, s.head_type, s.head_dim_out, s.cross_attn) == ("var", "class", "categorical",
                                                                                      4096, False)


# ---------------------------------------------------------------- sampling rules
def test_cfg_ramps_linearly_from_zero_to_cfg(tiny):
    cond = tiny.condition([3])
    lc, lu = torch.randn(1, 4, 4096), torch.randn(1, 4, 4096)
    for s in tiny.scales():
        _, _, g = tiny.guide(torch.cat((lc, lu)), cond, s)
        t = tiny.sampling.cfg * s.si / (len(tiny.scales()) - 1)
        assert torch.allclose(g, (1 + t) * lc - t * lu)
    _, _, g0 = tiny.guide(torch.cat((lc, lu)), cond, tiny.scales()[0])
    assert torch.equal(g0, lc)


def test_top_k_top_p_leave_the_guided_logits_untouched():
    x = torch.randn(2, 3, 4096)
    before = x.clone()
    f = top_k_top_p(x, 900, 0.96)
    assert torch.equal(x, before)
    kept = torch.isfinite(f).sum(-1)
    assert (kept <= 900).all() and (kept >= 1).all()


def test_a_batch_with_one_generator_per_image_draws_what_single_runs_draw(tiny):
    gens = [torch.Generator().manual_seed(s) for s in (4, 5)]
    both = generate(tiny, [3, 7], None, gens)
    for i, (lab, s) in enumerate(((3, 4), (7, 5))):
        one = _gen(tiny, (lab,), seed=s)
        assert all(torch.equal(x[i:i + 1], y) for x, y in zip(both.state.idx, one.state.idx)), i
        # same draws; batched matmuls/convolutions differ by float noise, so the images agree to rounding only
        assert (both.images[i] - one.images[0]).abs().max() < 1e-4, i


def test_more_smooth_changes_the_embedding_only_when_on(tiny, ref):
    assert torch.equal(_gen(tiny).images, ref)    # deterministic for a seed
    tiny.sampling.more_smooth = True
    try:
        smooth = _gen(tiny).images
    finally:
        tiny.sampling.more_smooth = False
    assert not torch.equal(smooth, ref)


# ---------------------------------------------------------------- the two paths
def test_teacher_forced_logits_equal_the_kv_cached_loop_on_the_tiny_model(tiny):
    """The block-causal forward on the loop's own sampled indices gives the loop's per-scale logits."""
    tiny.record_logits = {}
    try:
        out = _gen(tiny, (3, 7), seed=1)
        raw = tiny.record_logits
    finally:
        tiny.record_logits = None
    m = tiny.model
    x_in = tiny.vae.idx_to_var_input(out.state.idx, m.patch_nums)
    with torch.no_grad():
        lc = m.teacher_forced_logits(torch.tensor([3, 7]), x_in)
        lu = m.teacher_forced_logits(torch.tensor([10, 10]), x_in)
    for si, (b, e) in enumerate(m.begin_ends):
        assert (raw[si][:2] - lc[:, b:e]).abs().max() < 1e-4
        assert (raw[si][2:] - lu[:, b:e]).abs().max() < 1e-4
    assert torch.allclose(tiny.vae.idx_to_fhat(out.state.idx, m.patch_nums), out.state.f_hat, atol=1e-5)


def test_method_noop_is_the_backbone_itself(tiny, ref):
    assert torch.equal(_gen(tiny, method=Method()).images, ref)


def test_seeded_init_is_deterministic():
    cfg = _model_cfg("var_tiny_random")
    a, _ = new_modules(cfg["arch"], cfg["vae"])
    b, _ = new_modules(cfg["arch"], cfg["vae"])
    seeded_init_(a, 0)
    seeded_init_(b, 0)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_skipvar_refuses_var_in_one_line():
    """SkipVAR's decision model is Infinity's (FAMILIES = ('infinity',)): the run stops before loading anything."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "run.py", "model=var_tiny_random", "method=skipvar"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "skipvar" in lines[0] and "infinity" in lines[0] and "var" in lines[0]


def _nats(logits):
    """Entropy of softmax(logits) in nats, float64, written here (independent of varbench.entropy)."""
    lp = logits.double().log_softmax(-1)
    return -torch.where(lp.isfinite(), lp.exp() * lp, torch.zeros_like(lp)).sum(-1)


def test_nova_reads_the_categorical_entropy_of_the_guided_distribution_over_4096_codes(tiny):
    """NOVA on VAR (as on HART): H̄_t = mean entropy (nats) of softmax over the 4096 codes of the guided logits
    (t = cfg·si/(T−1), before top-k/top-p), and the per-layer lens the same of block j's input through the head."""
    from test_nova import Probe

    from nova.method import NovaConfig

    m = Probe(NovaConfig(t_star=len(tiny.scales()) - 2))
    out = _gen(tiny, method=m)
    s = out.method_summary
    H = s["entropy_per_scale"]
    assert len(H) == len(m.final) == len(tiny.scales())
    for si, (lc, lu, lg) in m.final.items():
        assert lg.shape[-1] == 4096
        assert H[si] == pytest.approx(_nats(lg)[0].mean().item(), rel=1e-5), si
        assert 0 <= H[si] <= torch.tensor(4096.0).log().item() + 1e-6
    cond, checked = tiny.condition([3]), 0
    for (si, li), (x, _sel, _) in m.seen.items():
        if str(si) in s["layer_entropy"]:
            scale = tiny.scales()[si]
            lens = _nats(tiny.guide(tiny.head(x, cond, scale), cond, scale)[2])[0]
            assert s["layer_entropy"][str(si)][li] == pytest.approx(lens.mean().item(), rel=1e-5), (si, li)
            checked += 1
    assert checked


def test_fastvar_var_prunes_the_last_two_scales_and_refuses_other_widths_in_one_line(tiny, tiny_backbone):
    """fastvar_var (our GUESS): 13² keeps 169 − ⌊169·0.5⌋ = 85 tokens, 16² keeps 256 − ⌊256·0.75⌋ = 64, in every block;
    on a schedule without the 10² cache scale it stops with FastVAR's one-line error."""
    from conftest import compose_method

    from varbench.harness.registry import build_method

    m = build_method(compose_method("fastvar_var"))
    out = _gen(tiny, method=m)
    D = tiny.spec.depth
    assert out.record.tokens[8] == [85.0] * D and out.record.tokens[9] == [64.0] * D
    assert all(t == [float(h * w)] * D for t, (h, w) in zip(out.record.tokens[:8], out.record.scale_hw[:8]))
    with pytest.raises(UserError, match="made for this model") as e:
        generate(tiny_backbone, ["a red circle"], build_method(compose_method("fastvar_var")), torch.Generator().manual_seed(0))
    assert "\n" not in str(e.value)
