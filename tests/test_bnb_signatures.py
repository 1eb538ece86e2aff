"""bitsandbytes' constructors, class by class: the positional order and defaults of bitsandbytes
0.50 (recorded in fixtures/bnb_0.50.2_signatures.json, and read from bitsandbytes itself where
it is installed), each argument landing where bitsandbytes puts it, and optim_bits, args,
is_paged and the older percentile_clipping/block_wise keywords with bitsandbytes' meaning or a
ValueError naming them. DeepSpeedCPUAdam's constructor likewise against deepspeed's."""
import argparse
import inspect
import json
import pathlib

import pytest
import torch

import offload_engine.optim as ours

_RECORDED = json.loads((pathlib.Path(__file__).parent / "fixtures" / "bnb_0.50.2_signatures.json").read_text())
_CLASSES = sorted(_RECORDED["classes"])
_PAGED_OPTS = {"page_size_mb": 0.01}  # several pages even for the small params here


def _positional(cls) -> list:
    """[name, default] of the parameters a caller may pass by position, after self."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return [[p.name, None if p.default is inspect.Parameter.empty else
             (list(p.default) if isinstance(p.default, tuple) else p.default)]
            for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]


@pytest.mark.parametrize("name", _CLASSES)
def test_positional_order_and_defaults_are_bitsandbytes_0_50(name):
    assert _positional(getattr(ours, name)) == _RECORDED["classes"][name]


def _installed_bnb():
    try:
        import bitsandbytes
    except Exception:  # not installed, or its native library does not load here
        return None
    return bitsandbytes


@pytest.mark.parametrize("name", _CLASSES)
def test_positional_order_and_defaults_are_the_installed_bitsandbytes(name):
    bnb = _installed_bnb()
    if bnb is None:
        pytest.skip("bitsandbytes is not installed (the recorded 0.50.2 signatures are checked above)")
    assert _positional(getattr(ours, name)) == _positional(getattr(bnb.optim, name))


def _param(n=5000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(n, generator=g) * 0.1)


def _make(cls, params, *args, **kw):
    return cls(params, *args, **({**_PAGED_OPTS, **kw} if cls.__name__.startswith("Paged") else kw))


# One distinct value per bitsandbytes argument that has a setting of ours (the rest stay at the
# defaults that mean "as bitsandbytes by default").
_VALUES = {"lr": 2.5e-3, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.03, "amsgrad": False,
           "optim_bits": 32, "args": None, "min_8bit_size": 1234, "is_paged": False}


@pytest.mark.parametrize("name", _CLASSES)
def test_each_positional_argument_lands_where_bitsandbytes_puts_it(name):
    names = [n for n, _ in _RECORDED["classes"][name][1:]]
    opt = _make(getattr(ours, name), [_param()], *[_VALUES[n] for n in names])
    group = opt.param_groups[0]
    for n in names:
        if n in ("lr", "eps", "weight_decay", "min_8bit_size"):
            assert group[n] == _VALUES[n], n
        elif n == "betas":
            assert tuple(group[n]) == _VALUES[n]
    assert group["state_format"] == ("int8" if "8bit" in name else "fp32")


def _steps(opt, p, steps=4):
    for step in range(steps):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + step))
        opt.step()
    return p.detach().clone()


@pytest.mark.parametrize("name,twin", [("Lion", "Lion8bit"), ("PagedAdam", "PagedAdam8bit"),
                                       ("PagedAdamW", "PagedAdamW8bit"), ("PagedLion", "PagedLion8bit")])
def test_optim_bits_8_is_the_8bit_class(name, twin):
    a, b = _param(), _param()
    opt_a = _make(getattr(ours, name), [a], optim_bits=8, min_8bit_size=0)
    opt_b = _make(getattr(ours, twin), [b], min_8bit_size=0)
    assert opt_a.param_groups[0]["state_format"] == "int8"
    assert torch.equal(_steps(opt_a, a), _steps(opt_b, b))
    sa, sb = opt_a.state_dict()["state"][0], opt_b.state_dict()["state"][0]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))


@pytest.mark.parametrize("name", ["Lion", "PagedAdam", "PagedAdamW", "PagedLion"])
def test_optim_bits_other_than_32_8_4_is_refused_naming_it(name):
    with pytest.raises(ValueError, match=r"optim_bits=16.*32 \(fp32\), 8.*4"):
        _make(getattr(ours, name), [_param()], optim_bits=16)


@pytest.mark.parametrize("name", ["Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit", "Adam4bit"])
def test_a_class_with_its_width_in_the_name_takes_only_optim_bits_32(name):
    cls = getattr(ours, name)
    assert _make(cls, [_param()], optim_bits=32).param_groups[0]["state_format"] in ("int8", "int4")
    with pytest.raises(ValueError, match="optim_bits=8.*only optim_bits=32"):
        _make(cls, [_param()], optim_bits=8)


def test_args_replace_optim_bits_and_min_8bit_size_as_in_bitsandbytes():
    args = argparse.Namespace(optim_bits=32, min_8bit_size=77, percentile_clipping=100, max_unorm=0.0,
                              skip_zeros=False)
    a, b = _param(), _param()
    opt_a = ours.Adam8bit([a], 1e-3, (0.9, 0.999), 1e-8, 0.0, False, 32, args)
    opt_b = ours.CPUAdam([b], lr=1e-3, adamw_mode=False)
    assert opt_a.param_groups[0]["state_format"] == "fp32" and opt_a.param_groups[0]["min_8bit_size"] == 77
    assert torch.equal(_steps(opt_a, a), _steps(opt_b, b))
    opt = ours.PagedAdamW([_param()], args=argparse.Namespace(optim_bits=8), **_PAGED_OPTS)
    assert opt.param_groups[0]["state_format"] == "int8" and opt.param_groups[0]["min_8bit_size"] == 4096


@pytest.mark.parametrize("key,value", [("max_unorm", 1.0), ("skip_zeros", True), ("percentile_clipping", 5),
                                       ("block_wise", False), ("optim_bits", 2)])
def test_args_asking_for_what_we_do_not_do_is_refused_naming_the_attribute(key, value):
    with pytest.raises(ValueError, match=f"args.{key}={value!r}"):
        ours.Lion([_param()], args=argparse.Namespace(**{key: value}))


@pytest.mark.parametrize("name", ["AdamW8bit", "PagedAdamW8bit", "Lion8bit"])
@pytest.mark.parametrize("key,value", [("percentile_clipping", 5), ("block_wise", False)])
def test_older_keywords_take_their_no_op_value_and_refuse_others(name, key, value):
    cls = getattr(ours, name)
    a, b = _param(), _param()
    same = _make(cls, [a], **{key: {"percentile_clipping": 100, "block_wise": True}[key]})
    assert torch.equal(_steps(same, a), _steps(_make(cls, [b]), b))
    with pytest.raises(ValueError, match=f"{name}: {key}={value!r} is not supported"):
        _make(cls, [_param()], **{key: value})


@pytest.mark.parametrize("name", ["Adam8bit", "AdamW8bit", "Lion", "Lion8bit", "PagedAdam", "PagedAdam8bit"])
def test_is_paged_with_cpu_params_changes_nothing(name):
    cls = getattr(ours, name)
    a, b = _param(), _param()
    assert torch.equal(_steps(_make(cls, [a], is_paged=True), a), _steps(_make(cls, [b]), b))


def test_is_paged_not_a_bool_is_refused_naming_it():
    with pytest.raises(ValueError, match="is_paged must be True or False; got is_paged='yes'"):
        ours.AdamW8bit([_param()], is_paged="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA params")
def test_is_paged_with_cuda_params_names_the_paged_class():
    with pytest.raises(ValueError, match="use PagedAdamW8bit"):
        ours.AdamW8bit([torch.nn.Parameter(torch.zeros(10, device="cuda"))], is_paged=True)


def test_cpu_adam_constructor_is_deepspeeds():
    recorded = [["params", None], ["lr", 1e-3], ["bias_correction", True], ["betas", [0.9, 0.999]], ["eps", 1e-8],
                ["weight_decay", 0], ["amsgrad", False], ["adamw_mode", True], ["fp32_optimizer_states", True]]
    sig = _positional(ours.CPUAdam)
    sig[0] = ["params", None]  # DeepSpeed names it model_params
    assert sig == recorded
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except Exception:
        return  # deepspeed is in the test extras; without it the recorded signature stands
    theirs = _positional(DeepSpeedCPUAdam)
    assert theirs[0][0] == "model_params"
    assert sig[1:] == theirs[1:]


def test_fp32_optimizer_states_false_is_the_same_for_fp32_params_and_refused_for_half():
    a, b = _param(), _param()
    opt = ours.CPUAdam([a], 1e-3, True, (0.9, 0.999), 1e-8, 0.01, False, True, False)
    assert torch.equal(_steps(opt, a), _steps(ours.CPUAdam([b], lr=1e-3, weight_decay=0.01), b))
    with pytest.raises(ValueError, match="fp32_optimizer_states=False.*torch.bfloat16"):
        ours.CPUAdam([torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))], fp32_optimizer_states=False)
    opt = ours.CPUAdam([_param()], fp32_optimizer_states=False)
    with pytest.raises(ValueError, match="fp32_optimizer_states=False"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(8, dtype=torch.float16))]})
    assert len(opt.param_groups) == 1
