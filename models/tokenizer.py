"""SD1.5's text tokenizer: CLIP's byte-level BPE with the vocabulary that ``open_clip_torch`` ships (no download).

SD1.5's conventions differ from open_clip's own call: sequences are ``[BOS] tokens [EOS]`` padded to 77 with the EOS
id (49407), not with 0; prompts longer than 75 tokens are cut and still end with EOS.
"""
from __future__ import annotations

import torch

BOS, EOS = 49406, 49407


class Tokenizer:
    def __init__(self, context_length: int = 77):
        from open_clip.tokenizer import SimpleTokenizer  # imported here: open_clip's import is slow

        self._bpe = SimpleTokenizer()  # lower-cases and cleans whitespace as CLIP's tokenizer does
        self.context_length = context_length

    def __call__(self, prompts: list[str] | str) -> torch.Tensor:
        """prompts -> LongTensor (B, 77)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        out = torch.full((len(prompts), self.context_length), EOS, dtype=torch.long)
        for row, text in enumerate(prompts):
            ids = [BOS, *self._bpe.encode(text)[: self.context_length - 2], EOS]
            out[row, : len(ids)] = torch.tensor(ids)
        return out
