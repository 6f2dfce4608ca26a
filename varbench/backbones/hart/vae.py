"""HART's tokenizer: VAR's VQVAE (``HARTAutoEncoder``, quantizer ``var_hybrid``) and the decode path, written
from ``shared/specs/hart_var.md`` (Part B VQVAE, Part A "Tokenizer decode").

Key names and order are the official ones (mit-han-lab/hart @e28a41fe ``hart/modules/networks/basic_vae.py``,
``hart/modules/models/autoencoder/{hart_autoencoder,quantize/var_quantize_multiple_res}.py``) so that the
``tokenizer/`` checkpoint loads strictly (``vae.*``; ``disc.*`` is held by :class:`Discriminator`, never run).

Inference uses: the codebook (``quantize.embedding``), Phi_k(h) = (1−r)·h + r·conv3×3_k(h) with k chosen by the
tick argmin on si/(SN−1), and ``decoder(post_quant_conv(f_hat)).clamp(−1, 1)``. The VQVAE itself is VAR's and lives
in ``varbench/msvq.py`` (shared with the VAR backbone); this module adds the discriminator's layout.
"""
from __future__ import annotations

import torch.nn as nn

from varbench.msvq import VQVAE

__all__ = ["VQVAE", "Discriminator", "TokenizerWithDisc"]


class Discriminator(nn.Module):
    """Parameter layout of the tokenizer folder's ``disc`` (a PatchGAN; never run here, kept for strict loading)."""

    def __init__(self, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2 if n < n_layers else 1, 1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)


class TokenizerWithDisc(nn.Module):
    """``HARTAutoEncoderWithDisc``: ``vae`` + ``disc`` (the layout of the official tokenizer checkpoint)."""

    def __init__(self, vae: VQVAE, disc: Discriminator | None = None):
        super().__init__()
        self.vae = vae
        self.disc = disc if disc is not None else Discriminator()
