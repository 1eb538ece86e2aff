"""The drop-in optimizers under FSDP2 (fully_shard, DTensor params) and FSDP1 (flat params, and
use_orig_params=True), with torch.distributed.checkpoint: 2 ranks on CPU with gloo, one
process per rank (tests/fsdp_job.py), against torch's AdamW under the same FSDP and against
the same optimizers without FSDP. Every rank trains on the same batch, so the grads are the
same at any world size and the optimizers alone make the differences.

[Note: sharded params] and [Note: sharded state dict] in offload_engine/optim/sharded.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from offload_engine.optim import PagedAdamW, PagedAdamW8bit, record_full_sizes
from offload_engine.optim.sharded import full_numel, mark_full_numel
from offload_engine.quant import FORMATS, codec
from multirank import launch_ranks
from tolerances import STATE_VS_TORCH, STEP_VS_TORCH

HERE = Path(__file__).parent
JOB = HERE / "fsdp_job.py"
LABELS = ("fsdp2", "fsdp1", "fsdp1-orig")  # fully_shard; FSDP1 flat params; FSDP1 use_orig_params=True


def launch(world: int, out: Path, *args) -> list[dict]:
    return launch_ranks(JOB, world, out, *args, python_args=("-W", "ignore"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-rank FSDP runs (saving checkpoints), then the 1-rank resumes and plain runs."""
    tmp = tmp_path_factory.mktemp("fsdp")
    ckpt = str(tmp / "ckpt")
    two = launch(2, tmp / "w2", "--mode", "fsdp", "--ckpt", ckpt)
    one = launch(1, tmp / "w1", "--mode", "resume", "--ckpt", ckpt)[0]
    return two, one


def mean_abs(a: dict, b: dict) -> float:
    """Mean |a - b| over all elements of the params in `a` and `b`."""
    return sum((a[k] - b[k]).abs().sum().item() for k in a) / sum(a[k].numel() for k in a)


def assert_equal_params(got: list, want: list, what: str):
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want), 1):
        assert g.keys() == w.keys()
        for key in w:
            assert torch.equal(g[key], w[key]), f"{what}: {key} after step {step}"


# ---- fp32 state -------------------------------------------------------------------------------
@pytest.mark.parametrize("label", LABELS)
def test_paged_adamw_tracks_torch_adamw(runs, label):
    """Params after every step within 1e-5 relative of torch.optim.AdamW under the same FSDP,
    and the final moments too (gathered through get_state_dict), relative to each tensor's
    largest element (exp_avg crosses zero: the grads differ as slightly as the params)."""
    rank0 = runs[0][0]
    ours, torch_run = rank0[f"{label}/PagedAdamW"], rank0[f"{label}/AdamW"]
    for step, (got, want) in enumerate(zip(ours["params"], torch_run["params"]), 1):
        for key in want:
            STEP_VS_TORCH[torch.float32].check(got[key], want[key], msg=f"{key} after step {step}")
    for name, state in torch_run["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            STATE_VS_TORCH.check(ours["state"][name][key], state[key], scale=state[key].abs().max().item(),
                                 msg=f"{name} {key}")
        assert float(ours["state"][name]["step"]) == float(state["step"]) == 6
    for rank in runs[0]:  # also where the rank's shard is empty (FSDP2: the last layer on rank 1)
        assert {float(s["step"]) for s in rank[f"{label}/PagedAdamW"]["state"].values()} == {6.0}


@pytest.mark.parametrize("label", LABELS)
def test_paged_adamw_under_fsdp_is_the_unsharded_optimizer_bit_for_bit(runs, label):
    """The fp32 update is per element: each rank paging only its shard changes nothing."""
    assert_equal_params(runs[0][0][f"{label}/PagedAdamW"]["params"], runs[1]["plain/PagedAdamW"]["params"], label)


# ---- 8-bit state ------------------------------------------------------------------------------
def test_8bit_formats_are_decided_on_the_whole_param(runs):
    """min_8bit_size counts the whole param: every rank holding a piece of a param keeps it in
    the unsharded optimizer's format, though the 8-bit params' shards are below 4096 elements.
    FSDP1 flat params are one param each (their unsharded size decides)."""
    two, one = runs
    plain = one["plain/PagedAdamW8bit"]["formats"]
    assert plain == {"0.weight": "fp32", "0.bias": "fp32", "2.weight": "int8", "2.bias": "fp32", "4.weight": "fp32",
                     "4.bias": "fp32", "6.weight": "fp32", "6.bias": "fp32"}
    for rank in two:
        assert rank["fsdp2/PagedAdamW8bit"]["formats"] == plain
        orig = {k.replace("_fsdp_wrapped_module.", ""): v for k, v in rank["fsdp1-orig/PagedAdamW8bit"]["formats"].items()}
        assert orig and all(plain[k] == v for k, v in orig.items()), orig
        assert set(rank["fsdp1/PagedAdamW8bit"]["formats"].values()) == {"int8"}
    aligned = {k: v for k, v in one["plain-aligned/PagedAdamW8bit"]["formats"].items() if v == "int8"}
    assert aligned == {"2.weight": "int8", "4.weight": "int8"}  # 4.weight: 6144 elements, shards of 3072
    assert two[0]["fsdp2-aligned/PagedAdamW8bit"]["formats"] == one["plain-aligned/PagedAdamW8bit"]["formats"]


def test_8bit_under_fsdp2_with_block_aligned_shards_is_the_unsharded_optimizer_bit_for_bit(runs):
    """Where every shard is whole quantization blocks, each rank's blocks are the unsharded
    param's: the whole run matches the unsharded PagedAdamW8bit exactly (with blocks or the
    format decided per shard, it would not)."""
    assert_equal_params(runs[0][0]["fsdp2-aligned/PagedAdamW8bit"]["params"],
                        runs[1]["plain-aligned/PagedAdamW8bit"]["params"], "aligned")


@pytest.mark.parametrize("label", LABELS)
def test_8bit_under_fsdp_stays_within_the_8bit_bounds(runs, label):
    """With shards that cut blocks (FSDP2, FSDP1's original params) the blocks start at each
    rank's shard, so the run differs from the unsharded 8-bit one, by less than 8-bit state
    itself differs from fp32 state. FSDP1 flat params hold even small params in 8 bits, so
    that run is held to twice the unsharded 8-bit distance from fp32."""
    two, one = runs
    ours, plain8, plain32 = (r["params"][-1] for r in (two[0][f"{label}/PagedAdamW8bit"], one["plain/PagedAdamW8bit"],
                                                       one["plain/PagedAdamW"]))
    eight_bit_cost = mean_abs(plain8, plain32)
    if label == "fsdp1":
        assert mean_abs(ours, plain32) < 2 * eight_bit_cost
    else:
        assert 0 < mean_abs(ours, plain8) < eight_bit_cost


# ---- torch.distributed.checkpoint ---------------------------------------------------------------
def _state_equal(got: dict, want: dict, what: str):
    assert got.keys() == want.keys(), what
    for name in want:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(got[name][key], want[name][key]), (what, name, key)


@pytest.mark.parametrize("resumed", ["fsdp2 at 2", "fsdp1 at 2", "fsdp1-orig at 2", "fsdp2 at 1", "plain at 1"])
def test_fp32_state_saved_at_2_ranks_reloads_exactly_and_continues_exactly(runs, resumed):
    """DCP save at 2 ranks at step 3; a fresh model and optimizer (no state yet) load it through
    get_state_dict / dcp.load / set_state_dict at 2 ranks, at 1 rank under FSDP2 and into an
    unsharded model: the state equals the saved one and the run continues bit for bit."""
    label, world = resumed.split(" at ")
    saved_by = "fsdp2" if label == "plain" else label
    straight = runs[0][0][f"{saved_by}/PagedAdamW"]
    run = (runs[0][0] if world == "2" else runs[1])[f"{label}/PagedAdamW/resumed"]
    _state_equal(run["loaded_state"], straight["saved_state"], resumed)
    assert_equal_params(run["params"], straight["params"][3:], resumed)


def assert_requantized(loaded: dict, saved: dict, formats: dict, world: int):
    """`loaded` is `saved` encoded into blocks of 256 from each of `world` FSDP2 row shards, as
    the codec does it, for the params held in 8 bits; the same values for the others."""
    assert saved.keys() == loaded.keys()
    for name, state in saved.items():
        assert float(loaded[name]["step"]) == float(state["step"]) == 3
        for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            want = state[key]
            if formats[name] == "int8":
                pieces = []
                for rows in torch.chunk(want, world):
                    codes, absmax = codec.encode_decoded(rows.reshape(-1), FORMATS["int8"], signed, 256)
                    pieces.append(codec.dequantize_blockwise(codes, absmax, FORMATS["int8"], signed, 256,
                                                             rows.numel()).view(rows.shape))
                want = torch.cat(pieces)
            assert torch.equal(loaded[name][key], want), (name, key)


@pytest.mark.parametrize("label", LABELS)
def test_8bit_state_saved_at_2_ranks_reloads_at_2_ranks_exactly_and_continues_exactly(runs, label):
    """The checkpoint holds 8-bit state as fp32 values ([Note: sharded state dict]); loaded at
    the same world size, each block gets back the codes and absmax that decode to them, so the
    state equals the saved one and the run continues bit for bit. (Plain re-quantization would
    not: the signed map has no -1.0, so a block whose largest magnitude is negative would come
    back with a smaller absmax; the check below shows the saved state has such blocks.)"""
    straight = runs[0][0][f"{label}/PagedAdamW8bit"]
    run = runs[0][0][f"{label}/PagedAdamW8bit/resumed"]
    assert run["formats"] == straight["formats"]
    _state_equal(run["loaded_state"], straight["saved_state"], label)
    assert_equal_params(run["params"], straight["params"][3:], label)
    if label == "fsdp2":
        saved = straight["saved_state"]["2.weight"]["exp_avg"]
        plain = []
        for rows in torch.chunk(saved, 2):  # the ranks' shards, as they were quantized
            codes, absmax = codec.quantize_blockwise(rows.reshape(-1), FORMATS["int8"], True, 256)
            plain.append(codec.dequantize_blockwise(codes, absmax, FORMATS["int8"], True, 256, rows.numel()))
        assert not torch.equal(torch.cat(plain), saved.reshape(-1))


def test_8bit_state_saved_at_2_ranks_with_block_aligned_shards_reloads_at_1_rank_exactly(runs):
    """Where every shard boundary is a block boundary, the blocks at 1 rank are the blocks at 2:
    the reload at world 1 is exact too and continues like the uninterrupted 2-rank run."""
    straight = runs[0][0]["fsdp2-aligned/PagedAdamW8bit"]
    run = runs[1]["fsdp2-aligned/PagedAdamW8bit/resumed"]
    assert {"2.weight": "int8", "4.weight": "int8"}.items() <= run["formats"].items()
    _state_equal(run["loaded_state"], straight["saved_state"], "aligned")
    assert_equal_params(run["params"], straight["params"][3:], "aligned")


def test_8bit_state_saved_at_2_ranks_reloads_at_1_rank_within_one_requantization(runs):
    """Where shards cut blocks (53 -> 97 splits its 97 rows 49/48, 2597 elements on rank 0), a
    block at 1 rank mixes two saved blocks: loading encodes the values into the loading blocks,
    exactly as the codec does (blocks that come back whole come back exact), and the continued
    run stays closer to the uninterrupted one than 8-bit state is to fp32 state."""
    two, one = runs
    straight = two[0]["fsdp2/PagedAdamW8bit"]
    run = one["fsdp2/PagedAdamW8bit/resumed"]
    assert run["formats"] == straight["formats"]
    assert_requantized(run["loaded_state"], straight["saved_state"], run["formats"], 1)
    assert not torch.equal(run["loaded_state"]["2.weight"]["exp_avg"], straight["saved_state"]["2.weight"]["exp_avg"])
    fp32_run = two[0]["fsdp2/PagedAdamW"]["params"][-1]
    assert 0 < mean_abs(run["params"][-1], straight["params"][-1]) < mean_abs(straight["params"][-1], fp32_run)


def test_torch_adamw_and_paged_optimizers_load_each_others_dcp_checkpoints(runs):
    """The state_dict has torch AdamW's keys: torch's checkpoint loads into PagedAdamW (exactly)
    and PagedAdamW8bit (quantized), PagedAdamW's into torch's AdamW (exactly); the runs then
    track the uninterrupted ones within 1e-5 relative."""
    rank0 = runs[0][0]
    for saved_by, into in (("AdamW", "PagedAdamW"), ("PagedAdamW", "AdamW")):
        straight, run = rank0[f"fsdp2/{saved_by}"], rank0[f"fsdp2/{saved_by}->{into}/resumed"]
        _state_equal(run["loaded_state"], straight["saved_state"], into)
        for step, (got, want) in enumerate(zip(run["params"], straight["params"][3:]), 4):
            for key in want:
                STEP_VS_TORCH[torch.float32].check(got[key], want[key], msg=f"{key} after step {step}")
    eight = rank0["fsdp2/AdamW->PagedAdamW8bit/resumed"]
    assert_requantized(eight["loaded_state"], rank0["fsdp2/AdamW"]["saved_state"], eight["formats"], 2)


def test_an_unsharded_optimizers_state_dict_loads_into_fsdp2_ranks(runs):
    """optimizer.load_state_dict() of a whole-param state (8-bit codes included): each rank
    takes its shard, fp32 exactly, 8-bit re-quantized into its own blocks."""
    rank0 = runs[0][0]
    fp32 = rank0["plain->fsdp2/PagedAdamW"]
    _state_equal(fp32["loaded_state"], fp32["saved_state"], "PagedAdamW")
    eight = rank0["plain->fsdp2/PagedAdamW8bit"]
    assert_requantized(eight["loaded_state"], eight["saved_state"], eight["formats"], 2)


def test_a_dtensor_param_with_a_plain_grad_is_refused_naming_both(runs):
    assert runs[1]["mixed_grad_error"] == ("PagedAdamW: a param of shape [53, 37] is a DTensor but its grad is a "
                                           "torch.Tensor; both must be sharded alike")


# ---- in this process ----------------------------------------------------------------------------
def test_a_shard_marked_with_its_full_size_takes_the_full_params_format():
    """How the engine's data-parallel shards (and FSDP params) decide min_8bit_size."""
    small = torch.nn.Parameter(torch.randn(1000))
    shard = mark_full_numel(torch.nn.Parameter(torch.randn(1000)), 8192)
    assert full_numel(shard) == 8192
    opt = PagedAdamW8bit([small, shard])
    for p in (small, shard):
        p.grad = torch.randn(1000)
    opt.step()
    assert (opt.state[small]["format"], opt.state[shard]["format"]) == ("fp32", "int8")


def test_fsdp1_original_params_without_a_recorded_size_are_refused_naming_min_8bit_size():
    model = torch.nn.Linear(64, 80)
    for p in model.parameters():
        p._fsdp_flattened = True  # as FSDP1 marks the params it flattened (use_orig_params=True)
    with pytest.raises(ValueError, match=r"min_8bit_size=4096 .* 2 params are FSDP1 shards .*record_full_sizes"):
        PagedAdamW8bit(model.parameters())
    PagedAdamW8bit(model.parameters(), min_8bit_size=0)  # nothing to decide
    PagedAdamW(model.parameters())  # fp32 state: nothing to decide
    with pytest.raises(TypeError, match="record_full_sizes: model must be a torch.nn.Module"):
        record_full_sizes(list(model.parameters()))


def test_paged_state_dict_leaves_the_optimizer_state_alone():
    """state_dict() reads the arrays out of the pages into the dict it returns, not into
    optimizer.state (which would keep a RAM copy of all the state after every checkpoint)."""
    p = torch.nn.Parameter(torch.randn(300))
    opt = PagedAdamW8bit([p], min_8bit_size=0)
    p.grad = torch.randn(300)
    opt.step()
    before = set(opt.state[p])
    sd = opt.state_dict()
    assert set(opt.state[p]) == before == {"step", "format", "block_size"}
    assert {"exp_avg_codes", "exp_avg_absmax"} <= set(sd["state"][0])


# ---- on a GPU ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cuda_runs(tmp_path_factory):
    """One rank with NCCL on the GPU (tests/fsdp_job.py --mode cuda)."""
    from offload_engine import kernels
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here: torch.cuda.is_available() is False")
    if not kernels.cuda_ops_built():
        pytest.skip("the ops were built without CUDA")
    tmp = tmp_path_factory.mktemp("fsdp-cuda")
    return launch(1, tmp / "cuda", "--mode", "cuda", "--ckpt", str(tmp / "ckpt"))[0]


@pytest.mark.cuda
@pytest.mark.parametrize("label", ["fsdp2", "fsdp1-orig"])
def test_on_the_gpu_fsdp_shards_page_through_device_slots_like_the_plain_run(cuda_runs, label):
    """FSDP2 and FSDP1 params on the GPU: the optimizers page their shards' state from pinned
    host pages through device slots, every page every step, and (one rank: the shard is the
    param) match the plain GPU run bit for bit; fp32 state tracks torch AdamW within 1e-5."""
    for name in ("PagedAdamW", "PagedAdamW8bit"):
        run, plain_run = cuda_runs[f"{label}/{name}"], cuda_runs[f"plain/{name}"]
        paging = run["paging"]
        assert paging["store"] == "cpu" and paging["executor"] == "cuda" and paging["device"].startswith("cuda")
        assert paging["device_pool_bytes"] > 0 and paging["bytes_read"] > 0
        assert {k.replace("_fsdp_wrapped_module.", ""): v for k, v in run["formats"].items()} == plain_run["formats"]
        assert_equal_params(run["params"], plain_run["params"], f"{label} {name}")
    for step, (got, want) in enumerate(zip(cuda_runs[f"{label}/PagedAdamW"]["params"],
                                           cuda_runs[f"{label}/AdamW"]["params"]), 1):
        for key in want:
            STEP_VS_TORCH[torch.float32].check(got[key], want[key], msg=f"{key} after step {step}")


@pytest.mark.cuda
@pytest.mark.parametrize("label", ["fsdp2", "fsdp1-orig"])
@pytest.mark.parametrize("name", ["PagedAdamW", "PagedAdamW8bit"])
def test_on_the_gpu_dcp_state_reloads_exactly_and_continues_exactly(cuda_runs, label, name):
    straight, run = cuda_runs[f"{label}/{name}"], cuda_runs[f"{label}/{name}/resumed"]
    _state_equal(run["loaded_state"], straight["saved_state"], f"{label} {name}")
    assert_equal_params(run["params"], straight["params"][3:], f"{label} {name}")
