"""The README says only what is true today: its status paragraph names nothing as coming that
the package already exports."""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import torch

import offload_engine
import offload_engine.optim

README = Path(__file__).resolve().parents[1] / "README.md"
FUTURE = re.compile(r"\b(next|coming|planned|not yet|will be|to come|later)\b", re.I)
# What the package has, by the words a status sentence would use for it.
LANDED = ["checkpoint", "FSDP", "launcher", "torchrun", "mpirun", "data parallel", "data-parallel", "NVMe",
          "8-bit", "4-bit", "CUDA", "bf16", "fp16", "Pager", "overlap", *offload_engine.optim.__all__,
          *getattr(offload_engine, "__all__", [])]


def status_sentences(text: str) -> list[str]:
    """The sentences before the quick start."""
    head = text.split("\n## Quick start", 1)[0]
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(head.split())) if s.strip()]


def promised_but_landed(sentences: list[str]) -> list[str]:
    return [f"{word!r} in: {s}" for s in sentences if FUTURE.search(s)
            for word in LANDED if word.lower() in s.lower()]


def test_the_status_names_nothing_landed_as_coming():
    assert promised_but_landed(status_sentences(README.read_text())) == []


def test_the_check_catches_a_stale_sentence():
    stale = "Under torch.distributed each rank keeps its partition; distributed checkpoints, FSDP and launchers are next."
    found = promised_but_landed(status_sentences(stale + "\n## Quick start\n"))
    assert any("'checkpoint'" in f for f in found) and any("'FSDP'" in f for f in found)


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


class _TokenModel(torch.nn.Module):
    """A model as the README's engine example assumes: token ids in, an output with .loss."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(64, 32), torch.nn.Linear(32, 64)

    def forward(self, ids):
        logits = self.head(self.embed(ids[:, :-1])).float()
        return SimpleNamespace(loss=torch.nn.functional.cross_entropy(logits.reshape(-1, 64), ids[:, 1:].reshape(-1)))


def test_the_readme_examples_run_as_written(tmp_path, monkeypatch):
    """Each python block of the README, run in a fresh directory with a small model: the
    optimizers' example keeps its NVMe directory under the working directory (no path at the
    filesystem root), and the engine's example trains on its config, bf16 included."""
    use, engine_example = python_blocks(README.read_text())
    monkeypatch.chdir(tmp_path)
    exec(use, {"model": torch.nn.Linear(300, 7)})
    assert (tmp_path / "offload_state").is_dir()
    gen = torch.Generator().manual_seed(0)
    dataset = [torch.randint(0, 64, (12,), generator=gen) for _ in range(64)]
    code = engine_example.replace('"configs/', f'"{README.parent}/configs/')
    scope = {"model": _TokenModel(), "dataset": dataset}
    exec(code, scope)
    assert scope["engine"].global_steps == 1 and scope["engine"].precision == "bf16"
    assert (tmp_path / "checkpoints" / "latest").is_file()


def test_no_doc_calls_a_landed_feature_the_next_issue():
    stale = [f"{p.name}: {line.strip()}" for p in sorted((README.parent / "docs").glob("*.md"))
             for line in p.read_text().splitlines() if re.search(r"\(next issue\)|\bnext issue\)", line)]
    assert stale == []
