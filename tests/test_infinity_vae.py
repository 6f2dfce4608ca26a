"""BSQ-VAE: official key/shape manifests, and key spellings (numerics are in the fixture checks)."""
import json

import pytest
import torch
from conftest import shared_path

from varbench.backbones.infinity.vae import BSQVAE, VAE_CONFIGS, bits_to_codes, bsq_quantize, load_vae_state_dict

MANIFESTS = {"vae_d32": "manifest_vae_d32.json", "vae_d56_f8_14_patchify": "manifest_vae_d56_f8_14_patchify.json"}


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_official_vae_state_dict_matches_manifest(name):
    man = json.loads(shared_path("fixtures", "infinity", MANIFESTS[name]).read_text())
    with torch.device("meta"):
        vae = BSQVAE(**VAE_CONFIGS[name])
    ours = {k: list(v.shape) for k, v in vae.state_dict().items()}
    theirs = {k: v["shape"] for k, v in man["keys"].items()}
    assert list(ours) == list(theirs), "key order or names differ"
    assert ours == theirs
    assert sum(p.numel() for p in vae.parameters()) == man["num_params"]


def test_flux_key_spelling_loads_identically():
    torch.manual_seed(0)
    a = BSQVAE(8, 32, (1, 2, 2), 1, 4)
    sd = a.state_dict()
    flux = {k.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias")
            .replace(".norm.weight", ".weight").replace(".norm.bias", ".bias"): v for k, v in sd.items()}
    assert set(flux) != set(sd)
    b = BSQVAE(8, 32, (1, 2, 2), 1, 4)
    load_vae_state_dict(b, flux)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in sd.items())
    with pytest.raises(ValueError, match="missing"):
        load_vae_state_dict(b, {k: v for k, v in sd.items() if "decoder.conv_out" not in k})


def test_codes_are_unit_vectors_and_bsq_is_sign():
    bits = torch.randint(0, 2, (2, 1, 3, 3, 8))
    codes = bits_to_codes(bits, 8)
    assert codes.shape == (2, 8, 1, 3, 3)
    assert torch.allclose(codes.norm(dim=1), torch.ones(2, 1, 3, 3))
    assert torch.equal(codes > 0, bits.permute(0, 4, 1, 2, 3).bool())
    z = torch.randn(5, 8)
    assert torch.equal(bsq_quantize(z) > 0, z > 0)
