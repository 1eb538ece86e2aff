"""The models `offload-train` can train: built-in GPT-style decoders of a few sizes (byte-level,
no downloads), or a local Hugging Face model (a model directory, or a transformers config to
initialize from) when transformers is installed."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

BYTE_VOCAB = 256  # the built-in models read UTF-8 bytes: no tokenizer to ship or download


@dataclasses.dataclass(frozen=True)
class GPTSize:
    dim: int
    layers: int
    heads: int
    context: int

    def describe(self) -> str:
        return f"{self.layers} layers, width {self.dim}, {self.heads} heads, context {self.context}"


SIZES = {
    "tiny": GPTSize(dim=32, layers=1, heads=2, context=32),       # tests: a step takes milliseconds
    "small": GPTSize(dim=128, layers=4, heads=4, context=128),    # the default: minutes on 2 CPU cores
    "medium": GPTSize(dim=256, layers=6, heads=8, context=256),
    "large": GPTSize(dim=512, layers=8, heads=8, context=512),
    "base": GPTSize(dim=768, layers=12, heads=12, context=1024),  # GPT-2 small's shape, byte vocabulary
}


class ModelChoiceError(ValueError):
    """--model names nothing this job can build."""


class _Block(nn.Module):
    def __init__(self, size: GPTSize):
        super().__init__()
        self.heads = size.heads
        self.ln1 = nn.LayerNorm(size.dim)
        self.qkv = nn.Linear(size.dim, 3 * size.dim)
        self.proj = nn.Linear(size.dim, size.dim)
        self.ln2 = nn.LayerNorm(size.dim)
        self.up = nn.Linear(size.dim, 4 * size.dim)
        self.down = nn.Linear(4 * size.dim, size.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class GPT(nn.Module):
    """A pre-LayerNorm causal decoder with learned positions and the embedding tied to the
    output layer (GPT-2's layout). forward(idx [batch, time]) -> logits [batch, time, vocab]."""

    def __init__(self, size: GPTSize, vocab: int = BYTE_VOCAB):
        super().__init__()
        if size.dim % size.heads:
            raise ValueError(f"GPT: width {size.dim} is not a multiple of {size.heads} heads")
        self.size = size
        self.tok = nn.Embedding(vocab, size.dim)
        self.pos = nn.Embedding(size.context, size.dim)
        self.blocks = nn.ModuleList(_Block(size) for _ in range(size.layers))
        self.ln = nn.LayerNorm(size.dim)
        self.head = nn.Linear(size.dim, vocab, bias=False)
        self.head.weight = self.tok.weight
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                # GPT-2's init: residual projections shrink with depth so the stream's variance stays put.
                std = 0.02 / math.sqrt(2 * size.layers) if name.endswith(("proj.weight", "down.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.size.context:
            raise ValueError(f"GPT: sequence of {t} tokens is longer than the context {self.size.context}")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


@dataclasses.dataclass
class LoadedModel:
    module: nn.Module
    description: str
    context: int               # longest sequence the model takes
    vocab: int
    tokenizer: object | None   # a Hugging Face tokenizer, or None: UTF-8 bytes
    hf: bool                   # forward returns an output object with .logits


def build_model(choice: str, context: int | None = None) -> LoadedModel:
    """`choice`: a built-in size name, a local Hugging Face model directory, or a transformers
    config.json (a fresh model of that architecture). Raises ModelChoiceError otherwise."""
    if choice in SIZES:
        size = SIZES[choice]
        if context is not None:
            size = dataclasses.replace(size, context=context)
        module = GPT(size)
        return LoadedModel(module, f"built-in {choice} GPT ({size.describe()})", size.context, BYTE_VOCAB, None,
                           hf=False)
    path = Path(choice)
    if not path.exists():
        raise ModelChoiceError(f"unknown --model {choice!r}: built-in sizes are {', '.join(SIZES)}; or give a local "
                               "Hugging Face model directory or a transformers config.json")
    return _build_hf(path, context)


def _build_hf(path: Path, context: int | None) -> LoadedModel:
    try:
        import transformers
    except ImportError:
        raise ModelChoiceError(f"--model {str(path)!r} is a path, and loading a Hugging Face model needs "
                               "transformers: pip install transformers") from None
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise ModelChoiceError(f"--model {str(path)!r}: no config.json there (a Hugging Face model directory or a "
                               "transformers config.json is expected)")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path if path.is_dir() else config_file))
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise ModelChoiceError(f"--model {str(path)!r}: not a transformers config ({_first_line(e)})") from None
    weights = path.is_dir() and any(path.glob("*.safetensors")) or path.is_dir() and any(path.glob("*.bin"))
    try:
        if weights:
            module = transformers.AutoModelForCausalLM.from_pretrained(str(path))
        else:
            module = transformers.AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as e:
        raise ModelChoiceError(f"--model {str(path)!r}: transformers cannot build a causal LM from it "
                               f"({_first_line(e)})") from None
    module = module.float()  # the engine casts to the config's precision; fp32 is its starting point
    tokenizer = None
    if path.is_dir() and any((path / f).is_file() for f in _TOKENIZER_FILES):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError, KeyError, TypeError):
            tokenizer = None  # no tokenizer files: bytes, which needs a vocabulary of at least 256
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if tokenizer is None and vocab < BYTE_VOCAB:
        raise ModelChoiceError(f"--model {str(path)!r}: no tokenizer beside it and a vocabulary of {vocab} < 256, "
                               "too small to train on bytes")
    longest = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 1024
    ctx = min(context or 128, int(longest))
    kind = "pretrained" if weights else "freshly initialized"
    return LoadedModel(module, f"{kind} {type(module).__name__} from {path}", ctx, vocab, tokenizer, hf=True)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def logits(loaded: LoadedModel, idx: torch.Tensor) -> torch.Tensor:
    out = loaded.module(idx)
    return out.logits if loaded.hf else out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
