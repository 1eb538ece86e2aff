"""World-size-free engine checkpoints ([Note: world-size-free checkpoints] in engine/reshard.py):
saved at 2 data-parallel ranks (gloo, one process per rank), loaded at 1, 2 and 3 ranks, with
another page size and block size, and the reverse (1 -> 2). The state each rank holds after a
load is compared, element by element, with the state the saving ranks held; the continued runs
with the uninterrupted one."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import offload_engine
from offload_engine.engine import CheckpointError
from offload_engine.engine import reshard
from offload_engine.engine.partition import split_points
from offload_engine.optim import AdamW4bit, AdamW8bit, CPUAdam, Lion8bit, PagedAdamW8bit
from offload_engine.quant import FORMATS, codec
from multirank import launch_ranks
from tolerances import TRAJECTORY_PARAM_MAX_REL, TRAJECTORY_PARAM_MEAN_ABS

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import dp_ckpt_job  # noqa: E402

JOB = HERE / "dp_ckpt_job.py"
SAVE_AT, STEPS = 3, 6


def launch(world: int, out: Path, *args) -> list[dict]:
    """The job at `world` ranks (separate processes, as torchrun starts them); each rank's result."""
    return launch_ranks(JOB, world, out, *args)


def alone(*args) -> dict:
    """The job in this process, without torch.distributed (world 1)."""
    return dp_ckpt_job.run(dp_ckpt_job.parser().parse_args([str(a) for a in args]))


def stitched(ranks: list[dict], when: str) -> dict:
    """{param name: {key: full fp32 tensor}} from the slices the ranks held (`when`: "saved" or
    "loaded"); also checks the slices tile each param and agree on step and format."""
    pieces: dict[str, list] = {}
    for r in ranks:
        for name, state in r[when]["state"].items():
            pieces.setdefault(name, []).append(state)
    out = {}
    for name, held in pieces.items():
        held.sort(key=lambda s: s["range"][0])
        assert [s["range"][0] for s in held[1:]] == [s["range"][1] for s in held[:-1]], name
        assert len({float(s["step"]) for s in held}) == 1, name
        out[name] = {k: torch.cat([s[k] for s in held]) for k in ("exp_avg", "exp_avg_sq")}
        out[name]["step"] = float(held[0]["step"])
    return out


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name]["step"] == b[name]["step"], name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(a[name][key], b[name][key]), (name, key)


def assert_params_close(a: dict, b: dict, rel: float):
    """Every element within `rel` of the reference, relative to that param's largest magnitude."""
    assert a.keys() == b.keys()
    for key, ref in b.items():
        worst = (a[key] - ref).abs().max() / ref.abs().max()
        assert worst <= rel, (key, float(worst))


# ---- the runs (each once per module) ------------------------------------------------------------
@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """PagedAdamW: 6 steps at 2 ranks saving at step 3 (with two save probes at the end), and
    resumes of that checkpoint at 2, 3 and 1 ranks; the 1-rank resume saves at step 4, which
    2 ranks then resume."""
    d = tmp_path_factory.mktemp("fp32")
    runs = {"w2": launch(2, d / "w2", "--save", d / "ckpt", "--save-at", SAVE_AT, "--probe-tags", "--fail-save"),
            "w2 from w2": launch(2, d / "w2r", "--load", d / "ckpt"),
            "w3 from w2": launch(3, d / "w3", "--load", d / "ckpt")}
    runs["w1 from w2"] = [alone("--load", d / "ckpt", "--save", d / "ckpt1", "--save-at", SAVE_AT + 1)]
    runs["w2 from w1"] = launch(2, d / "w2from1", "--load", d / "ckpt1")
    runs["dir"] = d
    return runs


@pytest.fixture(scope="module")
def int8(tmp_path_factory):
    """PagedAdamW8bit (blocks of 256): 6 steps at 2 ranks saving at step 3; resumed at 3 ranks
    with blocks of 128 and twice the page size, and at 1 rank as saved."""
    d = tmp_path_factory.mktemp("int8")
    opt = ("--optimizer", "PagedAdamW8bit")
    return {"w2": launch(2, d / "w2", *opt, "--save", d / "ckpt", "--save-at", SAVE_AT),
            "w3 from w2": launch(3, d / "w3", *opt, "--load", d / "ckpt", "--block-size", 128,
                                 "--page-size-mb", 1 / 16),
            "w1 from w2": [alone(*opt, "--load", d / "ckpt")]}


# ---- fp32 state ---------------------------------------------------------------------------------
def test_the_checkpoint_holds_one_optimizer_file_per_rank_and_the_layout(fp32):
    path = fp32["dir"] / "ckpt" / f"global_step{SAVE_AT}"
    assert sorted(p.name for p in path.iterdir()) == ["engine.pt", "manifest.json", "model.pt",
                                                      "optimizer_rank0_of2.pt", "optimizer_rank1_of2.pt"]
    layout = offload_engine.engine.checkpoint.read_manifest(path)["optimizer"]
    numels = [n for _, n in layout["params"]]
    assert layout["world"] == 2 and layout["split_points"] == split_points(numels, 2)
    one = fp32["dir"] / "ckpt1" / f"global_step{SAVE_AT + 1}"
    assert sorted(p.name for p in one.iterdir()) == ["engine.pt", "manifest.json", "model.pt", "optimizer.pt"]


def test_resuming_at_the_same_world_size_is_bit_exact(fp32):
    straight, resumed = fp32["w2"], fp32["w2 from w2"]
    assert_same_state(stitched(resumed, "loaded"), stitched(straight, "saved"))
    for r in range(2):
        assert resumed[r]["global_steps"] == STEPS and resumed[r]["lr"] == straight[r]["lr"]
        for key, value in straight[r]["params"].items():
            assert torch.equal(resumed[r]["params"][key], value), key


@pytest.mark.parametrize("run", ["w3 from w2", "w1 from w2"])
def test_fp32_state_saved_at_two_ranks_loads_exactly_at_another_world_size(fp32, run):
    """The state the new ranks hold after the load is the saved state, bit for bit; continuing
    matches the uninterrupted 2-rank run within the fp32 trajectory bound (only the grad all-reduce's summation
    order differs between world sizes)."""
    straight, resumed = fp32["w2"], fp32[run]
    assert_same_state(stitched(resumed, "loaded"), stitched(straight, "saved"))
    for r in resumed:
        assert r["loaded"]["global_steps"] == SAVE_AT and r["loaded"]["lr"] == straight[0]["saved"]["lr"]
        assert r["global_steps"] == STEPS and r["lr"] == straight[0]["lr"]
        assert_params_close(r["params"], straight[0]["params"], rel=TRAJECTORY_PARAM_MAX_REL["fp32"])
    if len(resumed) > 1:
        for key, value in resumed[0]["params"].items():
            assert all(torch.equal(r["params"][key], value) for r in resumed), key


def test_a_single_process_checkpoint_loads_at_two_ranks(fp32):
    one, two = fp32["w1 from w2"], fp32["w2 from w1"]
    assert_same_state(stitched(two, "loaded"), stitched(one, "saved"))
    for r in two:
        assert r["loaded"]["global_steps"] == SAVE_AT + 1
        assert_params_close(r["params"], one[0]["params"], rel=TRAJECTORY_PARAM_MAX_REL["fp32"])


def test_ranks_that_disagree_on_the_tag_are_refused_and_a_failed_save_keeps_the_last_good_checkpoint(fp32):
    ranks, save_dir = fp32["w2"], fp32["dir"] / "ckpt"
    for r in ranks:
        assert "every data-parallel rank must pass the same tag; got rank 0: 'rank0', rank 1: 'rank1'" in \
            r["errors"]["tags"]
    # The last rank's optimizer file hit a full disk: that rank raised its OSError, rank 0 an
    # error naming it; the temporary directory is gone and latest still names step 3.
    assert ranks[1]["errors"]["save"] == "OSError: [Errno 28] No space left on device (injected)"
    assert ranks[0]["errors"]["save"].startswith("CheckpointError: save_checkpoint('doomed'): rank 1 of 2 failed: "
                                                 "OSError: [Errno 28] No space left on device (injected)")
    assert sorted(p.name for p in save_dir.iterdir()) == ["global_step3", "latest"]
    assert (save_dir / "latest").read_text() == f"global_step{SAVE_AT}"


def test_a_mismatched_model_is_refused_by_key(fp32):
    save_dir = fp32["dir"] / "ckpt"
    config = dp_ckpt_job.make_config("PagedAdamW", 6)
    engine, *_ = offload_engine.initialize(dp_ckpt_job.make_model(hidden=129), config)
    with pytest.raises(CheckpointError, match=r"model.pt: 0.weight has shape \[257, 33\], the model's is \[129, 33\]"):
        engine.load_checkpoint(save_dir)
    model = dp_ckpt_job.make_model()
    model[2].requires_grad_(False)  # the same shapes, another set of trainable params
    engine, *_ = offload_engine.initialize(model, config)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(CheckpointError, match=r"manifest.json: param group 0 does not match the model's trainable "
                                              r"params \(missing: \[\], unexpected: \['2.bias', '2.weight'\]\)"):
        engine.load_checkpoint(save_dir)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)) and engine.global_steps == 0


# ---- 8-bit state --------------------------------------------------------------------------------
def test_8bit_state_loads_bit_exact_with_the_same_block_size(int8):
    straight, resumed = int8["w2"], int8["w1 from w2"]
    assert_same_state(stitched(resumed, "loaded"), stitched(straight, "saved"))
    # The continued run differs only by the all-reduce's summation order; now and then that
    # flips a code, so the bound is the 8-bit one (tests/test_data_parallel.py).
    for key, value in straight[0]["params"].items():
        assert (resumed[0]["params"][key] - value).abs().mean() < TRAJECTORY_PARAM_MEAN_ABS["int8"], key


def test_8bit_state_loads_at_three_ranks_with_another_block_and_page_size(int8, fp32):
    """Each new rank's state is the saved state encoded in blocks of 128, exactly as the codec's
    encode_decoded does it (a half of a saved block that holds its largest element comes back
    exact; params smaller than min_8bit_size are held in fp32: the saved values). The
    continued run then stays closer to the uninterrupted one than 8-bit state itself is to
    fp32 state."""
    saved = stitched(int8["w2"], "saved")
    for r in int8["w3 from w2"]:
        for name, state in r["loaded"]["state"].items():
            a, b = state["range"]
            for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                want = saved[name][key][a:b]
                if state["format"] != "fp32":
                    f = FORMATS[state["format"]]
                    codes, absmax = codec.encode_decoded(want, f, signed, 128)
                    want = codec.dequantize_blockwise(codes, absmax, f, signed, 128, b - a)
                assert torch.equal(state[key], want), (r["rank"], name, key)
    assert {s["format"] for r in int8["w3 from w2"] for s in r["loaded"]["state"].values()} == {"int8", "fp32"}
    straight, fp32_run = int8["w2"][0]["params"], fp32["w2"][0]["params"]
    for key, value in straight.items():
        resumed = int8["w3 from w2"][0]["params"][key]
        assert (resumed - value).abs().mean() < (value - fp32_run[key]).abs().mean(), key


# ---- the resharding itself, in this process ----------------------------------------------------
SIZES = [8481, 257, 16705, 65, 4096 * 3 + 5, 7]


def _stepped(cls, world: int, steps: int = 3, dtype=torch.float32, **kw) -> list:
    """`world` optimizers, one per partition of SIZES (as the ranks hold it), stepped together
    on the same seeded params and grads; each with its Slices."""
    points = split_points(SIZES, world)
    starts = [sum(SIZES[:i]) for i in range(len(SIZES) + 1)]
    params = [torch.randn(n, generator=torch.Generator().manual_seed(i)).to(dtype) for i, n in enumerate(SIZES)]
    ranks = []
    for r in range(world):
        shards, slices = [], []
        for i, n in enumerate(SIZES):
            a, b = max(points[r], starts[i]) - starts[i], min(points[r + 1], starts[i + 1]) - starts[i]
            if a < b:
                shards.append(torch.nn.Parameter(params[i][a:b].clone()))
                slices.append(reshard.Slice(f"p{i}", a, b, n, (b - a,)))
        ranks.append((cls(shards, lr=1e-2, **kw), shards, slices))
    for step in range(steps):
        grads = [torch.randn(n, generator=torch.Generator().manual_seed(100 * step + i)) for i, n in enumerate(SIZES)]
        for opt, shards, slices in ranks:
            for shard, s in zip(shards, slices):
                shard.grad = grads[int(s.name[1:])][s.start:s.end].to(dtype)
            opt.step()
    return ranks


def _reshard(saved: list, into: list) -> None:
    """The files `saved` ranks would write, loaded into the optimizers of `into`."""
    world = len(saved)
    numels = {f"p{i}": n for i, n in enumerate(SIZES)}
    files = {reshard.file_name(r, world): reshard.named_state(opt.state_dict(), slices)
             for r, (opt, _, slices) in enumerate(saved)}
    lay = reshard.layout(world, split_points(SIZES, world), list(numels.items()), [list(numels)],
                         {reshard.file_name(r, world): [(s.name, s.start, s.end) for s in slices]
                          for r, (_, _, slices) in enumerate(saved)})
    lay = reshard.read_layout({"optimizer": lay}, "manifest.json", numels)
    for opt, _, slices in into:
        wanted = {f: files[f] for f in reshard.files_to_read(lay, slices)}
        ranges = reshard.check_files(Path("ckpt"), lay, wanted, [list(numels)], numels)
        states, top, groups = reshard.assemble(Path("ckpt"), wanted, ranges, slices)
        opt.load_state_dict({**top, "state": {i: s for i, s in enumerate(states) if s is not None},
                             "param_groups": [{**groups[0], "params": list(range(len(slices)))}]})


@pytest.mark.parametrize("cls, kw", [
    (torch.optim.AdamW, {}), (CPUAdam, {}), (AdamW4bit, {"min_8bit_size": 0}), (Lion8bit, {"min_8bit_size": 0}),
    (AdamW8bit, {"min_8bit_size": 0, "block_size": 4096}), (PagedAdamW8bit, {"min_8bit_size": 0, "page_size_mb": 1 / 64}),
    (PagedAdamW8bit, {"min_8bit_size": 0, "master_weights": True, "dtype": torch.bfloat16})],
    ids=["torch-AdamW", "CPUAdam", "AdamW4bit", "Lion8bit", "AdamW8bit-4096", "PagedAdamW8bit", "bf16-masters"])
@pytest.mark.parametrize("worlds", [(2, 3), (3, 1), (1, 4)], ids=lambda w: f"{w[0]}to{w[1]}")
def test_any_partition_reloads_into_any_other_bit_for_bit(cls, kw, worlds):
    """Optimizers stepped at one partition, saved and loaded into fresh optimizers at another,
    hold exactly the state of optimizers stepped at that other partition all along: every
    state tensor, fp32 (also torch's AdamW), 8-bit and 4-bit codes and absmax, Lion's, the
    fp32 masters of bf16 params, paged or not. (min_8bit_size=0: these shards are not marked
    with their param's size, as the engine's are, so with the default a shard's format could
    differ from its param's.)"""
    saved, straight = _stepped(cls, worlds[0], **kw), _stepped(cls, worlds[1], **kw)
    fresh = _stepped(cls, worlds[1], steps=0, **kw)
    _reshard(saved, fresh)
    for (want, _, slices), (got, _, _) in zip(straight, fresh):
        a, b = want.state_dict()["state"], got.state_dict()["state"]
        assert a.keys() == b.keys() == set(range(len(slices)))
        for i in a:
            assert a[i].keys() == b[i].keys(), slices[i]
            for key, value in a[i].items():
                same = torch.equal(value, b[i][key]) if isinstance(value, torch.Tensor) else value == b[i][key]
                assert same, (slices[i], key)
