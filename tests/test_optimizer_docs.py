"""The public optimizers document themselves as torch.optim's do: the update's math, the state,
an Args block with every constructor argument (in order, with its real default) and an example
that runs. The checks read the classes' behaviour (their param-group settings), so a docstring
that names the wrong weight decay or state format fails."""
from __future__ import annotations

import doctest
import inspect
import re

import pytest
import torch

import offload_engine.optim as optim

PUBLIC = [getattr(optim, name) for name in optim.__all__
          if inspect.isclass(getattr(optim, name)) and issubclass(getattr(optim, name), torch.optim.Optimizer)]
ENTRY = re.compile(r"^    (\w+) \(")


def args_block(doc: str) -> dict[str, str]:
    """{argument: its text} from the docstring's Args block, in order."""
    block = doc.split("\nArgs:\n", 1)[1].split("\n\n", 1)[0]
    entries: dict[str, str] = {}
    name = None
    for line in block.splitlines():
        m = ENTRY.match(line)
        if m:
            name = m.group(1)
            entries[name] = line.strip()
        elif name is not None:
            entries[name] += " " + line.strip()
    return entries


def args_problems(cls, doc: str) -> list[str]:
    """What the Args block gets wrong against cls's constructor (empty: nothing)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    entries = args_block(doc)
    problems = []
    if list(entries) != [p.name for p in params]:
        problems.append(f"arguments {list(entries)} != signature {[p.name for p in params]}")
    for p in params:
        if p.default is not inspect.Parameter.empty and p.name in entries \
                and not entries[p.name].endswith(f"(default: {p.default!r})"):
            problems.append(f"{p.name}: default {p.default!r} not stated: {entries[p.name]!r}")
    return problems


def test_every_public_optimizer_is_a_documented_class():
    assert len(PUBLIC) == 13
    for cls in PUBLIC:
        assert cls.__qualname__ == cls.__name__ and cls.__module__.startswith("offload_engine.optim.")
        assert cls.__doc__ and "::\n" in cls.__doc__ and "\nArgs:\n" in cls.__doc__ and "\nExample:\n" in cls.__doc__


@pytest.mark.parametrize("cls", PUBLIC, ids=lambda c: c.__name__)
def test_args_block_matches_the_signature(cls):
    assert args_problems(cls, cls.__doc__) == []


def test_the_args_check_fails_on_a_wrong_docstring():
    """Mutants: an entry dropped, a default changed, an argument added but not documented."""
    cls = optim.PagedAdamW8bit
    doc = cls.__doc__
    dropped = re.sub(r"\n    io_threads \(.*?(?=\n    executor \()", "", doc, flags=re.S)
    assert dropped != doc and any("arguments" in p for p in args_problems(cls, dropped))
    wrong_default = doc.replace("(default: 0.01)", "(default: 0.0)")
    assert wrong_default != doc and any(p.startswith("weight_decay:") for p in args_problems(cls, wrong_default))

    class Grown(cls):
        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                     min_8bit_size=4096, *, block_size=None, maximize=False, store="cpu", nvme_path=None,
                     page_size_mb=16, prefetch_depth=2, io_threads=4, executor="auto", stochastic_rounding=False,
                     master_weights=False, foreach=None):
            super().__init__(params)

    assert args_problems(cls, doc) == [] and any("arguments" in p for p in args_problems(Grown, doc))


def _behaviour(cls) -> dict:
    p = torch.nn.Parameter(torch.zeros(8))
    opt = cls([p])
    group = dict(opt.param_groups[0])
    if hasattr(opt, "close"):
        opt.close()
    return group


@pytest.mark.parametrize("cls", PUBLIC, ids=lambda c: c.__name__)
def test_math_and_state_say_what_the_class_does(cls):
    doc, group = cls.__doc__, _behaviour(cls)
    math = doc.split("::\n", 1)[1].split("\n\n", 1)[0]  # the literal block
    lion = "sign(c)" in math
    assert lion == (group["bias_correction"] is False and group["eps"] == 0.0 and "v = beta2" not in math)
    decoupled = "p = p * (1 - lr * weight_decay)" in math
    l2 = "g = g + weight_decay * p" in math
    if cls is optim.CPUAdam:  # both, chosen by adamw_mode
        assert decoupled and l2 and "adamw_mode" in math
    else:
        assert (decoupled, l2) == (group["adamw_mode"], not group["adamw_mode"])
    bits = {"fp32": "are fp32" if not lion else "is fp32", "int8": "8-bit block-quantized",
            "int4": "4-bit block-quantized"}[group["state_format"]]
    assert bits in " ".join(doc.split())
    paged = cls.__name__.startswith("Paged")
    assert ("page store" in doc) == paged and ("self.state``, per param" in " ".join(doc.split())) != paged


@pytest.mark.parametrize("cls", PUBLIC, ids=lambda c: c.__name__)
def test_the_example_runs(cls):
    tests = doctest.DocTestParser().get_doctest(cls.__doc__, {"torch": torch, cls.__name__: cls},
                                                cls.__name__, None, 0)
    assert tests.examples
    result = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS).run(tests, out=lambda s: None)
    assert result.failed == 0 and result.attempted >= 4
