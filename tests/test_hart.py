"""HART backbone: fixture exactness, state-dict layout against the official manifests, one-line missing weights,
the tiny seeded model, and the official sampling rules (stale last-scale CFG ratio, hard-coded top-k, guided
distribution = what the sampler draws from)."""
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, compose_method, shared_path

from varbench.backbones.hart.check_config import compare_layout, layout, meta_modules
from varbench.backbones.hart.check_config import main as check_config_main
from varbench.backbones.hart.load import TF_DEFAULTS, TF_FIXED, TF_KEYS, VAE_FIXED, VAE_KEYS, config_mismatches
from varbench.backbones.hart.model import image_coords, rope_1d, rope_2d
from varbench.errors import MissingWeights
from varbench.harness.registry import build_backbone, build_method
from varbench.hooks import Method
from varbench.kvcache import KVCache
from varbench.loop import generate


def _model_cfg(name: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(REPO / f"conf/model/{name}.yaml"), resolve=True)


@pytest.fixture(scope="module")
def tiny():
    return build_backbone(_model_cfg("hart_tiny_random"), "cpu", "fp32")


def _gen(bb, prompts=("two green circles",), method=None, seed=0):
    return generate(bb, list(prompts), method, torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- faithfulness
@pytest.mark.slow
def test_fixture_every_tensor_within_tolerance():
    from varbench.harness.fixtures_hart import check_hart_fixture

    checks = check_hart_fixture(shared_path("fixtures", "hart", "tiny_hart_meta.json"))
    bad = [(c.name, c.max_abs_diff, c.tol) for c in checks if not c.ok]
    assert not bad, bad
    assert len(checks) >= 40


@pytest.mark.parametrize("manifest,part", [("manifest_hart_0.7b_transformer_assumed.json", "transformer"),
                                           ("manifest_hart_tokenizer_with_disc.json", "tokenizer")])
def test_meta_device_state_dicts_equal_the_official_manifests(manifest, part):
    man = json.loads(shared_path("fixtures", "hart", manifest).read_text())
    m = _model_cfg("hart_0.7b")
    tf, tok = meta_modules(m["arch"], m["vae"])
    mod = tf if part == "transformer" else tok
    ref = {k: tuple(v["shape"]) for k, v in man["keys"].items()}
    ours = layout(mod)
    assert compare_layout(ours, ref, manifest) == []
    assert list(ours) == list(ref)                                   # order
    assert {k: str(v.dtype).replace("torch.", "") for k, v in mod.state_dict().items()} == \
        {k: v["dtype"] for k, v in man["keys"].items()}
    if part == "transformer":
        assert sum(p.numel() for p in tf.parameters()) == man["num_params"] == 729_665_664
        assert sum(p.numel() for p in tf.diffloss.parameters()) == man["num_params_diffloss"]
    else:
        assert sum(p.numel() for p in tok.vae.parameters()) == man["num_params_vae"]
        assert sum(p.numel() for p in tok.disc.parameters()) == man["num_params_disc"]


def test_missing_weights_is_one_line_naming_every_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    cfg = _model_cfg("hart_0.7b")
    cfg["weights_dir"] = str(tmp_path / "w")
    with pytest.raises(MissingWeights) as e:
        build_backbone(cfg, "cpu", "fp32")
    msg = str(e.value)
    assert "\n" not in msg
    for name in ("llm", "tokenizer", "Qwen2-VL-1.5B-Instruct", "huggingface.co/mit-han-lab/hart-0.7b-1024px"):
        assert name in msg


def test_llm_folder_without_ema_weights_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg = _model_cfg("hart_0.7b")
    cfg["weights_dir"] = str(tmp_path)
    for d in ("hart-0.7b-1024px/llm", "hart-0.7b-1024px/tokenizer", "Qwen2-VL-1.5B-Instruct"):
        (tmp_path / d).mkdir(parents=True)
    with pytest.raises(MissingWeights, match="llm/ema_model.bin.*tokenizer/model.safetensors"):
        build_backbone(cfg, "cpu", "fp32")


def test_config_check_names_a_differing_absent_or_unsupported_value(tmp_path, capsys):
    m = _model_cfg("hart_0.7b")
    official = {**{k: m["arch"][v] for k, v in TF_KEYS.items()}, **TF_FIXED}
    assert config_mismatches(m["arch"], official, TF_KEYS, TF_FIXED, "arch", TF_DEFAULTS) == []
    del official["use_context_norm"]            # absent from config.json: HARTForT2IConfig's default (False)
    official.update(attn_l2_norm=False, attn_type="gpt2")
    bad = config_mismatches(m["arch"], official, TF_KEYS, TF_FIXED, "arch", TF_DEFAULTS)
    assert "arch.use_context_norm: config omits it: default False, ours True" in bad
    assert "arch.attn_l2_norm: config says False, ours True" in bad and any("attn_type" in b for b in bad)
    (tmp_path / "llm").mkdir()
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "llm" / "config.json").write_text(json.dumps(official))
    tok = {**{k: m["vae"][v] for k, v in VAE_KEYS.items()}, **VAE_FIXED}
    (tmp_path / "tokenizer" / "config.json").write_text(json.dumps(tok))
    assert check_config_main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "arch.attn_l2_norm: config says False, ours True" in out and "DIFFER" in out and "vae" not in out
    official.update(use_context_norm=True, attn_l2_norm=True, attn_type="llama")
    (tmp_path / "llm" / "config.json").write_text(json.dumps(official))
    assert check_config_main([str(tmp_path)]) == 0
    assert "MATCH" in capsys.readouterr().out


# ---------------------------------------------------------------- the tiny model and the loop
def test_tiny_random_runs_deterministically_with_hart_shapes(tiny):
    a, b = _gen(tiny, ("a", "two blue squares")), _gen(tiny, ("a", "two blue squares"))
    assert torch.equal(a.images, b.images)
    assert a.images.shape == (2, 3, 64, 64) and torch.isfinite(a.images).all()
    assert a.record.scale_n[0] == 16 and a.record.scale_n[1:] == [p * p for p in tiny.model.patch_nums[1:]]
    assert [i.shape[1] for i in a.state.idx] == [1] + [p * p for p in tiny.model.patch_nums[1:]]
    assert not torch.equal(a.images[0], a.images[1])


def test_guided_logits_use_the_stale_ratio_at_the_last_scale_and_scale0_samples_one_token(tiny):
    seen = {}

    class Spy(Method):
        def after_logits(self, sctx, lc, lu, lg):
            seen[sctx.si] = (lc.clone(), lu.clone(), lg.clone())

    _gen(tiny, method=Spy())
    S, cfg = len(tiny.scales()), tiny.sampling.cfg
    assert seen[0][2].shape[1] == 1                                  # last context position only
    for si, (lc, lu, lg) in seen.items():
        t = cfg * min(si, S - 2) / (S - 1)                           # 12/13-style stale ratio at the last scale
        assert torch.allclose(lg, (1 + t) * lc - t * lu, atol=1e-5), si
    assert tiny.ratio(S - 1) == tiny.ratio(S - 2)


def test_top_k_is_hard_coded_per_stage_and_ignores_nothing_else(tiny):
    assert [tiny.top_k(si) for si in range(10)] == [600] * 7 + [300] * 3
    x = torch.randn(1, 5, 1024)
    f = tiny.filter_logits(x, 0)
    assert (torch.isfinite(f).sum(-1) == 600).all() and torch.equal(f[torch.isfinite(f)], x[torch.isfinite(f)])


def test_diffusion_noise_comes_from_the_generation_rng_by_default(tiny):
    """Default ``rng``: the image depends on the generator only (not on torch's global RNG state)."""
    torch.manual_seed(1)
    a = _gen(tiny)
    torch.manual_seed(2)
    b = _gen(tiny)
    assert torch.equal(a.images, b.images)


def test_fastvar_hart_config_prunes_48_and_64_in_every_block_with_the_36_cache(tiny):
    cfg = compose_method("fastvar_hart")
    m = build_method(cfg)
    out = _gen(tiny, method=m)
    rw = [s.rule_w for s in tiny.scales()]
    for si, w in enumerate(rw):
        n = out.record.scale_n[si]
        want = {48: n - int(n * 0.5), 64: n - int(n * 0.75)}.get(w, n)
        assert out.record.tokens[si] == [float(want)] * tiny.spec.depth, (si, w)
    assert out.record.skipped_scales == []
    assert {k[0] for k in m.cache.data} == set(range(tiny.spec.depth))


def test_a_batch_with_one_generator_per_image_draws_what_single_runs_draw(tiny):
    """The runner's per-image RNGs: tokens, Gumbel noise and diffusion noise per image, as in a batch of one."""
    prompts = ("a red circle", "two blue squares")
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    both = generate(tiny, list(prompts), None, gens)
    for b, (p, s) in enumerate(zip(prompts, (3, 4))):
        one = generate(tiny, [p], None, torch.Generator().manual_seed(s))
        assert all(torch.equal(x[b:b + 1], y) for x, y in zip(both.state.idx, one.state.idx)), b
        # same draws; batched matmuls differ by float noise (~1e-6) that the low-temperature Gumbel softmax of
        # more_smooth amplifies, so the images agree to ~1e-4, not bitwise (a different draw would differ by ~1)
        assert (both.images[b:b + 1] - one.images).abs().max() < 5e-2, b


@pytest.mark.slow
def test_fixture_check_fails_when_the_last_scale_uses_the_fresh_ratio(monkeypatch):
    """The checker can fail: with t = cfg·(SN−1)/(SN−1) at the last scale (not the official stale ratio) the
    diffusion's CFG scale, its steps, the residual, f_hat and the image all leave tolerance."""
    from varbench.backbones.hart.backbone import HARTBackbone
    from varbench.harness.fixtures_hart import check_hart_fixture

    monkeypatch.setattr(HARTBackbone, "ratio", lambda self, si: si / (self.num_scales - 1))
    bad = {c.name for c in check_hart_fixture(shared_path("fixtures", "hart", "tiny_hart_meta.json")) if not c.ok}
    assert {"diffusion cfg scale", "diff_out_scaled", "f_hat_final", "image_01"} <= bad
    assert not any(n.startswith("logits_raw") for n in bad)   # raw logits do not depend on the CFG ratio


@torch.no_grad()
def _official_style_fastvar_generate(bb, prompt: str, seed: int, prune: dict, cache_w: int):
    """HART's scale loop written the way the official HARTForT2I + FastVAR-HART blocks compose it (independent of
    varbench/loop.py and baselines/fastvar.py): per block and per sub-block, FastVAR's merge (keep the N − int(N·r)
    tokens farthest from the mean, descending), attention/FFN on the kept tokens with gathered RoPE and a K/V cache of
    kept tokens only, unmerge into the area-resized output cached at the cache scale, residual add."""
    m, rng = bb.model, torch.Generator().manual_seed(seed)
    cond = bb.condition([prompt])
    kvs = [KVCache() for _ in m.blocks]
    prev = {}
    state = bb.init_state(cond)
    if True:
        for scale in bb.scales():
            si, pn = scale.si, scale.h
            if si == 0:
                x = cond.ctx + m.lvl_embed.weight[0]
                cos, sin = rope_1d(cond.pos_ids, m.head_dim)
            else:
                z = F.interpolate(state.f_hat, size=(pn, pn), mode="area").flatten(2).transpose(1, 2)
                x = (m.word_embed(z) + m.lvl_embed.weight[si]).repeat(2, 1, 1)
                cos, sin = rope_2d(image_coords(pn, m.patch_nums[-1])[None] + cond.pos_ids[:, -1][:, None, None],
                                   m.head_dim)
            ratio = prune.get(scale.rule_w)
            for li, blk in enumerate(m.blocks):
                for name in ("sa", "ffn"):
                    if ratio is None:
                        keep, xm, cs = None, x, (cos, sin)
                    else:
                        mean = x.mean(1, keepdim=True)
                        score = ((x - mean) ** 2).sum(-1, keepdim=True)
                        keep = score.argsort(1, descending=True)[:, : x.shape[1] - int(x.shape[1] * ratio)]
                        xm = x.gather(1, keep.expand(-1, -1, x.shape[-1]))
                        cs = tuple(t.gather(1, keep.expand(-1, -1, t.shape[-1])) for t in (cos, sin))
                    out = blk.branch(name, xm, cos_sin=cs, kv=kvs[li])
                    if keep is not None:
                        c = prev[(li, name)].view(2, cache_w, cache_w, -1).permute(0, 3, 1, 2)
                        full = F.interpolate(c, size=(pn, pn), mode="area").permute(0, 2, 3, 1).reshape(2, pn * pn, -1)
                        out = full.scatter(1, keep.expand(-1, -1, out.shape[-1]), out)
                    if scale.rule_w == 36:
                        prev[(li, name)] = out
                    x = x + out
            logits = bb.head(x, cond, scale)
            _, _, guided = bb.guide(logits, cond, scale)
            state = bb.update(state, bb.sample(guided, x, cond, scale, rng), scale)
    return bb.decode(state), state


@pytest.mark.slow
def test_fastvar_hart_matches_an_official_style_composition_of_the_hart_blocks(tiny):
    """FastVAR's HART schedule through our loop + the generic FastVAR class == the official block composition."""
    ours = generate(tiny, ["a red circle"], build_method(compose_method("fastvar_hart")), torch.Generator().manual_seed(7))
    img, st = _official_style_fastvar_generate(tiny, "a red circle", 7, {48: 0.5, 64: 0.75}, 10)
    assert all(torch.equal(a, b) for a, b in zip(st.idx, ours.state.idx))
    # float noise only (the cache is stored as (x+out)−x, the mean by adaptive pooling; ~1e-6 relative, amplified
    # by more_smooth's low-temperature Gumbel softmax): 1e-4 seen on f_hat values of ~5; a wrong rule differs by ~1
    assert (st.f_hat - ours.state.f_hat).abs().max() < 1e-3
    assert (img - ours.images).abs().max() < 1e-3
    none = generate(tiny, ["a red circle"], None, torch.Generator().manual_seed(7))
    assert (none.images - ours.images).abs().max() > 1e-2       # pruning did act


def test_qwen_text_encoder_prepends_the_system_prompt_and_keeps_the_prompt_positions():
    """encode_prompts semantics with stand-ins for the tokenizer and the LLM: each prompt padded to max_length on
    its own, mask = id != pad, position ids = cumsum(mask) − 1, system tokens (mask 1) prepended, and only the
    prompt positions of the last hidden state kept."""
    from types import SimpleNamespace

    from varbench.backbones.hart.text import QwenTextEncoder

    PAD = 0

    class Tok:
        pad_token_id = PAD

        def __call__(self, text, return_tensors, padding, max_length, truncation):
            ids = [ord(c) for c in text][:max_length]
            if padding == "max_length":
                ids = ids + [PAD] * (max_length - len(ids))
            return SimpleNamespace(input_ids=torch.tensor([ids]))

    seen = {}

    def llm(ids, attention_mask, output_hidden_states):
        seen["ids"], seen["mask"] = ids, attention_mask
        h = torch.stack([ids.float(), attention_mask.float()], -1)            # [B, S, 2]: the token and its mask
        return SimpleNamespace(hidden_states=[None, h])

    enc = object.__new__(QwenTextEncoder)
    enc.tok, enc.model, enc.max_length, enc.system_prompt, enc.device = Tok(), llm, 6, "SYS", torch.device("cpu")
    ctx, mask, pos = enc(["ab", "abcdefgh"])
    assert ctx.shape == (2, 6, 2) and ctx.dtype == torch.float32
    assert mask.tolist() == [[1, 1, 0, 0, 0, 0], [1] * 6]
    assert pos.tolist() == [[0, 1, 1, 1, 1, 1], [0, 1, 2, 3, 4, 5]]
    assert seen["ids"].shape == (2, 9) and seen["ids"][:, :3].tolist() == [[ord(c) for c in "SYS"]] * 2
    assert seen["mask"][:, :3].all() and seen["mask"][0, 3:].tolist() == [1, 1, 0, 0, 0, 0]
    assert ctx[0, :, 0].tolist() == [ord("a"), ord("b"), 0, 0, 0, 0]                # prompt positions only


def test_an_unknown_sampling_option_is_a_one_line_user_error():
    from varbench.errors import UserError

    cfg = _model_cfg("hart_tiny_random")
    cfg["sampling"]["top_k"] = 900          # Infinity's option: HART hard-codes its top-k
    with pytest.raises(UserError, match="top_k.*top_k_early"):
        build_backbone(cfg, "cpu", "fp32")


def test_the_unverified_switches_change_the_layout_as_the_official_classes_do():
    """attn_l2_norm off: no scale_mul_1H11 (softmax scale 0.25/√c); use_context_norm off: no context_norm.weight."""
    cfg = _model_cfg("hart_tiny_random")
    cfg["arch"].update(attn_l2_norm=False, use_context_norm=False)
    bb = build_backbone(cfg, "cpu", "fp32")
    keys = set(bb.model.state_dict())
    assert not any(k.endswith("scale_mul_1H11") for k in keys) and "context_norm.weight" not in keys
    assert bb.model.blocks[0].attn.scale == 0.25 / (128 // 2) ** 0.5
    assert torch.isfinite(_gen(bb).images).all()


# ---------------------------------------------------------------- issue 25 item 8 (fail-first on the old code)
HART_FIXTURE_FILES = ("meta.json", "transformer_weights.safetensors", "tokenizer_vae_weights.safetensors",
                      "tensors.safetensors")


def _renamed_copy(tmp_path, prefix: str):
    import shutil

    src = shared_path("fixtures", "hart", "tiny_hart_meta.json").parent
    for f in HART_FIXTURE_FILES:
        shutil.copy(src / f"tiny_hart_{f}", tmp_path / f"{prefix}{f}")
    return tmp_path / f"{prefix}meta.json"


def test_fixture_file_names_come_from_the_meta_files_name(tmp_path):
    """``<tag>_meta.json`` -> ``<tag>_transformer_weights.safetensors`` etc. beside it (the Infinity checker's rule);
    a missing file is a one-line UserError naming it."""
    from varbench.errors import UserError
    from varbench.harness.fixtures_hart import fixture_files

    meta = _renamed_copy(tmp_path, "other_hart_")
    files = fixture_files(meta)
    assert files == {"transformer": tmp_path / "other_hart_transformer_weights.safetensors",
                     "vae": tmp_path / "other_hart_tokenizer_vae_weights.safetensors",
                     "tensors": tmp_path / "other_hart_tensors.safetensors"}
    (tmp_path / "other_hart_tensors.safetensors").unlink()
    from varbench.harness.fixtures_hart import build_from_meta

    with pytest.raises(UserError, match="other_hart_tensors.safetensors") as e:
        build_from_meta(meta)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_a_renamed_fixture_is_checked(tmp_path):
    from varbench.harness.fixtures import check_fixture

    checks = check_fixture(_renamed_copy(tmp_path, "renamed_"))
    assert len(checks) >= 40 and all(c.ok for c in checks), [(c.name, c.max_abs_diff, c.tol) for c in checks if not c.ok]


def test_free_running_diffusion_steps_are_judged_relative_to_their_scale():
    """A free-running step (its input is our previous step's output) may amplify 1e-6 rounding: 1.3e-3 on a step
    whose values reach 174 is 7.5e-6 of its scale and passes; the same 1.3e-3 on a step of scale 3.6, and any
    teacher-forced step beyond the absolute 1e-4, fail."""
    from varbench.harness.checks import TOL
    from varbench.harness.fixtures_hart import free_running_check

    big = torch.zeros(2, 8)
    big[0, 0] = 173.9
    assert free_running_check("s6", big + 1.3e-3, big).ok
    assert free_running_check("s6", big + 1.3e-3, big).tol == pytest.approx(TOL["codes"] * 173.9)
    small = torch.full((2, 8), 3.6)
    assert not free_running_check("s3", small + 1.3e-3, small).ok
    assert free_running_check("s3", small + 3e-4, small).ok                      # 3e-4 <= 1e-4 x 3.6
    tiny = torch.full((2, 8), 0.01)                                              # never stricter than 1e-4 absolute
    assert free_running_check("s7", tiny + 9e-5, tiny).ok and not free_running_check("s7", tiny + 2e-4, tiny).ok
    assert free_running_check("s", big[:1], big).max_abs_diff == float("inf")   # a shape mismatch fails
