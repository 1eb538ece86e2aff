"""offload-plan probe (offload_engine/plan/probe.py, cli.py): every figure is measured and
positive, the disk is probed where the NVMe store would write, the cache round-trips, and bad
input gets an error naming what is wrong. No timing is asserted."""
from __future__ import annotations

import json
import math

import pytest
import torch

from offload_engine.plan import MachineProbe, load_cached, probe_machine, save_cache
from offload_engine.plan import cli, probe as probe_mod


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> MachineProbe:
    return probe_machine(str(tmp_path_factory.mktemp("disk")), threads=(1,), page_sizes_mb=(1,))


def test_every_figure_is_measured(measured, tmp_path_factory):
    assert measured.host_ram_available > 0 and measured.cores >= 1 and measured.torch == torch.__version__
    assert measured.host_copy_gbps > 0 and math.isfinite(measured.host_copy_gbps)
    disk = measured.disk
    assert isinstance(disk["direct_io"], bool) and list(disk["by_page_mb"]) == ["1"]
    assert all(disk["by_page_mb"]["1"][k] > 0 for k in ("write_gbps", "read_gbps", "both_gbps"))
    assert set(measured.update) == {"fp32", "int8", "fp32+master", "int8+master"}
    for fmt, by_page in measured.update.items():
        assert list(by_page) == ["1"] and list(by_page["1"]) == ["1"] and by_page["1"]["1"] > 0, fmt
    assert set(measured.param_overhead_s) == {"fp32", "int8", "fp32+master", "int8+master"}
    assert (measured.gpu is None) == (not torch.cuda.is_available())
    assert not list(tmp_path_factory.getbasetemp().glob("disk*/.offload_engine_disk_probe_*"))  # no file left


def test_the_update_probe_runs_the_paged_step(monkeypatch):
    """The rate is the paged optimizer's own step: one that updates nothing is seen."""
    from offload_engine import optim
    calls = []
    step = optim.PagedAdamW8bit.step

    def counted(self, *a, **k):
        calls.append(sum(p.numel() for g in self.param_groups for p in g["params"]))
        return step(self, *a, **k)
    monkeypatch.setattr(optim.PagedAdamW8bit, "step", counted)
    assert probe_mod.update_rate("int8", 1) > 0
    assert calls and all(n == probe_mod._UPDATE_NUMEL for n in calls)


def test_the_cache_round_trips(measured, tmp_path):
    path = save_cache(measured, str(tmp_path / "sub" / "probe.json"))
    assert load_cached(path) == measured
    with pytest.raises(FileNotFoundError, match="no cached probes at .*offload-plan probe"):
        load_cached(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_cached(str(tmp_path / "bad.json"))
    (tmp_path / "old.json").write_text(json.dumps({"host": "x"}))
    with pytest.raises(ValueError, match="without .*'update'.*probe again"):
        load_cached(str(tmp_path / "old.json"))


def test_bad_input_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="nvme_path=.*cannot be written"):
        probe_machine(str(blocker / "under"), threads=(1,))
    with pytest.raises(ValueError, match="threads must be positive"):
        probe_machine(None, threads=(0,))
    with pytest.raises(ValueError, match=r"state format must be one of \['fp32', 'int8'\].*'int3'"):
        probe_mod.update_rate("int3", 1)


def test_the_cli_end_to_end(tmp_path, capsys):
    cache = str(tmp_path / "probe.json")
    assert cli.main(["probe", "--cache", cache, "--threads", "1", "--page-sizes", "1", "--nvme-path",
                     str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "host copy" in out.out and f"disk at {tmp_path}" in out.out and "int8+master state" in out.out
    assert f"cached in {cache}" in out.err
    assert cli.main(["probe", "--cache", cache, "--no-probe", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == load_cached(cache).to_json()
    assert cli.main(["probe", "--cache", str(tmp_path / "none.json"), "--no-probe"]) == 2
    assert "no cached probes" in capsys.readouterr().err
    assert cli.main(["probe", "--cache", cache, "--threads", "one"]) == 2
    assert "--threads takes comma-separated numbers" in capsys.readouterr().err
    assert cli.main(["probe", "--cache", cache, "--no-probe", "--no-disk"]) == 2
    assert "--no-probe measures nothing" in capsys.readouterr().err
