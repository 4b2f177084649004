"""SD1.5's text tokenizer: CLIP's byte-level BPE with the vocabulary that ``open_clip_torch`` ships (no download).

SD1.5's conventions differ from open_clip's own call: sequences are ``[BOS] tokens [EOS]`` padded to 77 with the EOS
id (49407), not with 0; prompts longer than 75 tokens are cut and still end with EOS.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

BOS, EOS = 49406, 49407


def _open_clip_tokenizer():
    """open_clip's ``tokenizer`` module, without importing the ``open_clip`` package, whose ``__init__`` loads its
    models and with them torchvision and timm: seconds of a one-shot run's start for one BPE file.  The module only
    imports ftfy, regex, numpy and torch, and finds its vocabulary beside itself."""
    if "open_clip.tokenizer" in sys.modules:
        return sys.modules["open_clip.tokenizer"]
    spec = importlib.util.find_spec("open_clip")  # locates the package without running it
    folders = spec.submodule_search_locations if spec else None
    path = Path(folders[0]) / "tokenizer.py" if folders else None
    if path is None or not path.is_file():
        from open_clip import tokenizer

        return tokenizer
    name = "_magicstyle_open_clip_tokenizer"
    if name not in sys.modules:
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


class Tokenizer:
    def __init__(self, context_length: int = 77):
        self._bpe = _open_clip_tokenizer().SimpleTokenizer()  # lower-cases and cleans whitespace as CLIP's does
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
