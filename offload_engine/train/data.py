"""The text `offload-train` learns: the corpus that ships with the package (original prose,
about 32 KB) or a file given with --corpus, as a token tensor, and a seeded sampler of
(input, target) batches whose state goes into the checkpoint, so a resumed run draws the
batches the uninterrupted one would have drawn."""
from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path

import torch

BUILTIN_CORPUS = "built-in corpus"


class CorpusError(ValueError):
    """The corpus cannot be read, or is too short for the model's context."""


@dataclasses.dataclass
class Corpus:
    name: str
    tokens: torch.Tensor  # int64, 1-D

    def __len__(self) -> int:
        return self.tokens.numel()


def load_corpus(path: str | None, tokenizer=None) -> Corpus:
    """UTF-8 bytes of the text (or the tokenizer's ids when the model brings one)."""
    if path is None:
        text = resources.files(__package__).joinpath("data", "corpus.txt").read_text(encoding="utf-8")
        name = BUILTIN_CORPUS
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CorpusError(f"--corpus {path!r}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise CorpusError(f"--corpus {path!r}: cannot read it as UTF-8 text ({e})") from None
        name = str(path)
    if tokenizer is None:
        tokens = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    else:
        tokens = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    return Corpus(name, tokens)


class BatchSampler:
    """Random windows of `context + 1` tokens: inputs are the first `context`, targets the same
    shifted by one. Its own generator keeps the batch order independent of the model's RNG use."""

    def __init__(self, corpus: Corpus, batch: int, context: int, seed: int):
        if len(corpus) < context + 1:
            raise CorpusError(f"{corpus.name} has {len(corpus):,} tokens, fewer than the context length + 1 "
                              f"({context + 1:,}) a training window needs; give a longer --corpus or a smaller "
                              "--context")
        self.tokens = corpus.tokens
        self.batch = batch
        self.context = context
        self.generator = torch.Generator().manual_seed(seed)

    def next(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.tokens) - self.context, (self.batch,), generator=self.generator)
        windows = torch.stack([self.tokens[s:s + self.context + 1] for s in starts.tolist()])
        return windows[:, :-1].to(device), windows[:, 1:].to(device)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
