"""The backend dispatcher: declared support, 'auto' fallback, errors that list every backend's reasons."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import mplug_kernels
from mplug_kernels.backends import BACKENDS, AttentionCall, select_backend
from attention_testing import DEVICE, make_mask, random_tensor


def _qkv(dtype=torch.float32, head_dim=32, requires_grad=False):
    generator = torch.Generator().manual_seed(0)
    make = lambda length: random_tensor(2, length, 2, head_dim, dtype=dtype, generator=generator, requires_grad=requires_grad)
    return make(5), make(9), make(9)


def test_auto_picks_a_backend_that_supports_the_call():
    q, k, v = _qkv()
    for return_lse in (False, True):
        call = AttentionCall.of(q, [k], [v], [None], return_lse)
        chosen = select_backend("auto", call)
        assert chosen.reasons(call) == []
        better = [b for b in BACKENDS.values() if b.rank(call) < chosen.rank(call)]
        assert all(b.reasons(call) for b in better), "auto skipped a better-ranked backend that supports the call"


def test_auto_falls_back_when_lse_is_requested():
    q, k, v = _qkv()
    call = AttentionCall.of(q, [k], [v], [None], return_lse=True)
    assert "cannot return lse" in BACKENDS["sdpa"].reasons(call)
    out, lse = mplug_kernels.co_attention(q, k, v, return_lse=True)
    ref, ref_lse = mplug_kernels.co_attention(q, k, v, return_lse=True, backend="reference")
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


def test_auto_falls_back_for_float64():
    q, k, v = _qkv(torch.float64)
    call = AttentionCall.of(q, [k], [v], [None], return_lse=True)
    assert select_backend("auto", call).name == "reference"


def test_unsupported_backend_error_lists_every_backend():
    q, k, v = _qkv()
    with pytest.raises(ValueError) as error:
        mplug_kernels.co_attention(q, k, v, return_lse=True, backend="sdpa")
    message = str(error.value)
    assert "cannot return lse" in message
    for name in BACKENDS:
        assert f"  {name}:" in message


def test_unknown_backend_name():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        mplug_kernels.co_attention(q, k, v, backend="fastest")
    with pytest.raises(TypeError, match="backend must be a str"):
        mplug_kernels.co_attention(q, k, v, backend=3)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_named_backends_agree_with_reference(backend):
    generator = torch.Generator().manual_seed(3)
    q, k, v = _qkv(requires_grad=True)
    mask = make_mask("one_row_fully_masked", 2, 9, generator)
    out = mplug_kernels.co_attention(q, k, v, mask, backend=backend)
    expected = mplug_kernels.co_attention(q, k, v, mask, backend="reference")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _bad_inputs():
    q, k, v = _qkv()
    mask = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    return [
        ("q must have rank 4", ValueError, dict(q=q[0])),
        ("k must have rank 4", ValueError, dict(k=k.flatten(2))),
        ("k must be \\[B=2", ValueError, dict(k=k[:1], v=v[:1])),
        ("v has 1 key/value heads but an earlier key/value tensor has 2", ValueError, dict(v=v[:, :, :1])),
        ("k must be \\[B=2, Lk, Hkv, D=32\\]", ValueError, dict(k=torch.randn(2, 9, 2, 16), v=torch.randn(2, 9, 2, 16))),
        ("differ in length", ValueError, dict(v=v[:, :4])),
        ("k has dtype torch.float16 but q has torch.float32", TypeError, dict(k=k.half())),
        ("unsupported dtype torch.int64", TypeError, dict(q=q.long())),
        ("head dim 12", ValueError, dict(q=q[..., :12], k=k[..., :12], v=v[..., :12])),
        ("head dim 136", ValueError, dict(q=torch.randn(2, 5, 2, 136), k=torch.randn(2, 9, 2, 136), v=torch.randn(2, 9, 2, 136))),
        ("key_padding_mask must have dtype torch.bool", TypeError, dict(key_padding_mask=mask.float())),
        ("key_padding_mask must have shape \\[B, Lk\\]", ValueError, dict(key_padding_mask=mask[:, :4])),
        ("q must be a torch.Tensor", TypeError, dict(q=[1.0])),
        ("softmax_scale must be a float", TypeError, dict(softmax_scale="0.1")),
        ("softmax_scale must be a float or None, got bool True", TypeError, dict(softmax_scale=True)),
        ("softmax_scale must be finite, got nan", ValueError, dict(softmax_scale=float("nan"))),
        ("softmax_scale must be finite, got inf", ValueError, dict(softmax_scale=float("inf"))),
    ]


@pytest.mark.parametrize("match,error_type,overrides", _bad_inputs(), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_input_raises_clear_error(match, error_type, overrides):
    q, k, v = _qkv()
    args = dict(q=q, k=k, v=v, key_padding_mask=None)
    scale = overrides.pop("softmax_scale", None)
    args.update(overrides)
    with pytest.raises(error_type, match=match):
        mplug_kernels.co_attention(args["q"], args["k"], args["v"], args["key_padding_mask"], softmax_scale=scale)


def test_devices_that_differ():
    q, k, v = _qkv()
    meta_k = torch.empty(k.shape, device="meta")
    with pytest.raises(ValueError, match="k is on meta but q is on"):
        mplug_kernels.co_attention(q, meta_k, v)


def test_info_lists_every_backend():
    result = subprocess.run([sys.executable, "-m", "mplug_kernels.info"], capture_output=True, text=True, check=True)
    for name in BACKENDS:
        assert name in result.stdout


@pytest.mark.parametrize("triton_version, numpy_version, refused", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.6", False), ("3.10.1", "3.0.0", False),
])
def test_triton_interpreter_refuses_numpy_its_version_cannot_run(monkeypatch, triton_version, numpy_version, refused):
    """Triton 3.6's CPU interpreter fails inside our kernels with NumPy >= 2.4: the backend says so instead."""
    numpy = pytest.importorskip("numpy")
    triton = pytest.importorskip("triton")
    from mplug_kernels.backends import triton as triton_backend

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    triton_backend._interpreter_reason.cache_clear()
    try:
        q, k, v = _qkv()
        reasons = BACKENDS["triton"].reasons(AttentionCall.of(q, [k], [v], [None], return_lse=True))
    finally:
        triton_backend._interpreter_reason.cache_clear()
    assert any("pip install 'numpy<2.4'" in reason for reason in reasons) == refused
