"""The ops loader and the info command, each in a fresh process: prebuilt module, JIT build,
and the PyTorch reference fallback (with one warning)."""
import os
import subprocess
import sys
import textwrap

import pytest

# Makes `import offload_engine._C` fail, as on a machine where the prebuilt module is missing.
_HIDE_PREBUILT = "import sys; sys.modules['offload_engine._C'] = None\n"

_CHECK_KERNEL = textwrap.dedent("""
    import warnings, torch
    from offload_engine import kernels, reference
    from offload_engine._native import native_ops
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            p, g = torch.randn(1001).to(torch.bfloat16), torch.randn(1001)
            m, v = torch.zeros(1001), torch.zeros(1001)
            p2, m2, v2 = p.clone(), m.clone(), v.clone()
            kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=1, stochastic_rounding=True, seed=3)
            kernels.adam_step_(p, g, m, v, **kw)
            reference.adam_step_(p2, g, m2, v2, **kw)
            assert torch.equal(p.view(torch.int16), p2.view(torch.int16)) and torch.equal(m, m2) and torch.equal(v, v2)
    ops = native_ops()
    print("KIND", ops.kind, "PATH", kernels.simd_path(), "WARNINGS", sum("PyTorch reference" in str(w.message) for w in caught))
""")


def _run(code, **env):
    full_env = {**os.environ, **env}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_info_reports_build_and_forced_path(native):
    out = subprocess.run([sys.executable, "-m", "offload_engine.info"], capture_output=True, text=True,
                         env={**os.environ, "OFFLOAD_ENGINE_SIMD": "scalar"}, check=True).stdout
    assert "ops build" in out and "aot" in out
    assert any(line.split()[:3] == ["simd", "path", "scalar"] for line in out.splitlines()), out
    assert "threads" in out and "torch" in out


def test_info_rejects_unknown_path_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "offload_engine.info"], capture_output=True, text=True,
                          env={**os.environ, "OFFLOAD_ENGINE_SIMD": "sse9"})
    assert proc.returncode == 2
    assert "OFFLOAD_ENGINE_SIMD" in proc.stderr and "allowed" in proc.stderr


def test_prebuilt_module_is_used(native):
    assert "KIND aot" in _run(_CHECK_KERNEL)


def test_reference_fallback_warns_once_and_matches(tmp_path):
    """No prebuilt module and a JIT build that cannot compile: the reference runs, warned once."""
    out = _run(_HIDE_PREBUILT + _CHECK_KERNEL, CXX="false", OFFLOAD_ENGINE_JIT_DIR=str(tmp_path))
    assert "KIND reference PATH reference WARNINGS 1" in out, out


def test_explicit_reference_mode_is_silent():
    out = _run(_CHECK_KERNEL, OFFLOAD_ENGINE_OPS="reference")
    assert "KIND reference PATH reference WARNINGS 0" in out, out


@pytest.mark.slow
def test_jit_build_when_prebuilt_is_missing(tmp_path):
    """Compiles ops/csrc with torch.utils.cpp_extension.load (about a minute on 2 cores)."""
    out = _run(_HIDE_PREBUILT + _CHECK_KERNEL, OFFLOAD_ENGINE_JIT_DIR=str(tmp_path))
    assert "KIND jit" in out and "WARNINGS 0" in out, out


_CHECK_BLOCKWISE_FALLBACK = textwrap.dedent("""
    import torch
    from offload_engine import kernels
    from offload_engine.quant import codec, FORMATS
    n, block = 300, 256
    f = FORMATS["int8"]
    mc, ma = codec.quantize_blockwise(torch.randn(n) * 1e-2, f, True, block)
    vc, va = codec.quantize_blockwise(torch.rand(n) * 1e-4, f, False, block)
    p, g = torch.randn(n), torch.randn(n)
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    kernels.adam_step_blockwise_(p, g, mc, ma, vc, va, fmt="int8", block=block, **hyper)
    kernels.lion_step_blockwise_(p, g, mc, ma, fmt="int8", block=block, lr=1e-3, beta1=0.9, beta2=0.99,
                                 weight_decay=0.0)
    p0, refused = p.clone(), 0
    for bad in ((mc, ma.double(), vc, va), (mc, ma, vc, torch.zeros(1).expand(2)), (mc[:-1], ma, vc, va)):
        try:
            kernels.adam_step_blockwise_(p, g, *bad, fmt="int8", block=block, **hyper)
        except (TypeError, ValueError) as exc:
            refused += "adam_step_blockwise_" in str(exc)
    assert torch.equal(p, p0)
    print("REFUSED", refused)
""")


def test_reference_fallback_checks_quantized_state():
    """Without native ops, bad codes/absmax are refused by name before anything is written."""
    assert "REFUSED 3" in _run(_CHECK_BLOCKWISE_FALLBACK, OFFLOAD_ENGINE_OPS="reference")
