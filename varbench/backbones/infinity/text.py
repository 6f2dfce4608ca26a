"""Text conditioning for Infinity: a T5 encoder from ``transformers`` (spec infinity.md §2).

Official behaviour reproduced: tokenise with ``max_length=text_maxlen``, ``padding='max_length'``, truncation,
T5's ``</s>`` counted in the length; run the encoder with the attention mask; keep ``last_hidden_state`` in fp32;
compact the valid rows of every prompt (``kv_compact`` [sum(lens), Ct5], ``lens``).

``ByteTokenizer`` + a tiny seeded ``T5EncoderModel`` give the same code path with no download (model=tiny).
"""
from __future__ import annotations

import torch

PAD, EOS, UNK = 0, 1, 2


class ByteTokenizer:
    """UTF-8 bytes shifted by 3 (0 pad, 1 ``</s>``, 2 unk); appends ``</s>`` like T5. Vocabulary 259."""

    vocab_size = 259

    def __call__(self, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(prompts), max_length), PAD, dtype=torch.long)
        for i, p in enumerate(prompts):
            toks = [b + 3 for b in p.encode("utf-8")][: max_length - 1] + [EOS]
            ids[i, : len(toks)] = torch.tensor(toks)
        return ids, (ids != PAD).long()


class HFTokenizer:
    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path, legacy=True)

    def __call__(self, prompts, max_length):
        enc = self.tok(prompts, max_length=max_length, padding="max_length", truncation=True, return_tensors="pt")
        return enc.input_ids, enc.attention_mask


class T5TextEncoder:
    """prompts -> (kv_compact [sum(lens), Ct5] fp32, lens)."""

    def __init__(self, tokenizer, encoder, max_length: int, device="cpu"):
        self.tokenizer, self.encoder, self.max_length = tokenizer, encoder.eval().to(device), max_length
        self.device = torch.device(device)
        self.channels = encoder.config.d_model

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, list[int]]:
        """``__call__`` with autograd on (scripts/train_tiny.py trains the tiny encoder)."""
        ids, mask = self.tokenizer(prompts, self.max_length)
        ids, mask = ids.to(self.device), mask.to(self.device)
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        lens = mask.sum(1).tolist()
        return torch.cat([h[i, :n] for i, n in enumerate(lens)], 0), lens

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, list[int]]:
        return self.encode(prompts)

    @staticmethod
    def from_pretrained(path: str, max_length: int, device="cpu", dtype=torch.float32) -> T5TextEncoder:
        from transformers import T5EncoderModel

        enc = T5EncoderModel.from_pretrained(path, dtype=dtype)
        return T5TextEncoder(HFTokenizer(path), enc, max_length, device)

    @staticmethod
    def tiny(d_model: int = 64, layers: int = 2, heads: int = 2, max_length: int = 32, seed: int = 0,
             device="cpu") -> T5TextEncoder:
        """A small T5 encoder with weights drawn from ``seed`` and the byte tokenizer: no download."""
        from transformers import T5Config, T5EncoderModel

        cfg = T5Config(vocab_size=ByteTokenizer.vocab_size, d_model=d_model, d_kv=d_model // heads,
                       d_ff=2 * d_model, num_layers=layers, num_heads=heads, dropout_rate=0.0,
                       feed_forward_proj="gated-gelu", pad_token_id=PAD, eos_token_id=EOS)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            enc = T5EncoderModel(cfg)
        return T5TextEncoder(ByteTokenizer(), enc, max_length, device)
