"""`python -m offload_engine.train`: train a small character-level transformer with CPUAdam and
print its loss. Runs in under a minute on 2 CPU cores with the defaults; no downloads (the
text is generated here, and is learnable: a deterministic grammar of short sentences).
"""
from __future__ import annotations

import argparse
import random
import sys
import time

import torch
from torch import nn

from .optim import CPUAdam

_SUBJECTS = ["the pager", "a kernel", "the host", "each rank", "the store", "a page", "the pool", "the engine"]
_VERBS = ["moves", "reads", "writes", "updates", "streams", "keeps", "frees", "checks"]
_OBJECTS = ["the state", "a slot", "its moments", "the weights", "one block", "every page", "the file", "the grads"]


def make_corpus(n_sentences: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}." for _ in range(n_sentences))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, context: int, dim: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(context, dim))
        block = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos[:t]
        x = self.blocks(x, mask=self.causal[:t, :t], is_causal=True)
        return self.head(self.norm(x))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.context < 2:
        print("train: --steps and --batch must be >= 1 and --context >= 2", file=sys.stderr)
        return 2

    torch.manual_seed(args.seed)
    text = make_corpus(4000, args.seed)
    chars = sorted(set(text))
    data = torch.tensor([chars.index(ch) for ch in text], dtype=torch.long)
    model = TinyGPT(len(chars), args.context)
    opt = CPUAdam(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"train: {n_params / 1e6:.2f}M params, {len(text)} chars, vocab {len(chars)}, CPUAdam "
          f"(kernel: {_kernel_name()}), {args.steps} steps")

    t0, first = time.perf_counter(), None
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, len(data) - args.context - 1, (args.batch,))
        x = torch.stack([data[s:s + args.context] for s in starts])
        y = torch.stack([data[s + 1:s + args.context + 1] for s in starts])
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        first = loss.item() if first is None else first
        if step == 1 or step % 20 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.4f}  lr {sched.get_last_lr()[0]:.2e}")
    elapsed = time.perf_counter() - t0
    print(f"train: loss {first:.4f} -> {loss.item():.4f} in {elapsed:.1f}s "
          f"({args.steps * args.batch * args.context / elapsed:.0f} tokens/s)")
    return 0


def _kernel_name() -> str:
    from .kernels import simd_path

    return simd_path()


if __name__ == "__main__":
    sys.exit(main())
