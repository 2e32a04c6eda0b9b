"""Block-sparse attention: the torch reference is dense attention when every block is selected and gathered
attention per query block otherwise; the Triton kernels (run by Triton's CPU interpreter in a subprocess) and
the FlexAttention path match the reference, forward and backward; bad inputs raise ValueErrors.

The Triton checks run in a child process because ``@triton.jit`` picks interpreter or GPU compilation from
TRITON_INTERPRET when the kernels are built, which must not depend on what other test modules did first.
Run this file as a script (``TRITON_INTERPRET=1 python tests/test_block_sparse_kernels.py``) to see them
directly."""

import json
import math
import os
import subprocess
import sys
import traceback

import pytest
import torch
import torch.nn.functional as F

from tempflow.attention.block_sparse_kernels import _flex_block_mask, _resolve_backend, block_sparse_attention


def _inputs(batch, heads, q_blocks, k_blocks, prefix, head_dim, block_size, seed=0, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_blocks * block_size, head_dim, generator=generator)
    k = torch.randn(batch, heads, prefix + k_blocks * block_size, head_dim, generator=generator)
    v = torch.randn(batch, heads, prefix + k_blocks * block_size, head_dim, generator=generator)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _random_index(batch, heads, q_blocks, k_blocks, top_k, seed=0):
    """Distinct key blocks per row, in random order."""
    scores = torch.rand(batch, heads, q_blocks, k_blocks, generator=torch.Generator().manual_seed(seed))
    return scores.argsort(dim=-1)[..., :top_k]


def _grads(out, lse, inputs, seed=1):
    """Gradients of a random linear function of both outputs (so the lse path is checked too)."""
    generator = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=generator)).sum()
    loss = loss + (lse * torch.randn(lse.shape, generator=generator)).sum()
    return torch.autograd.grad(loss, inputs)


def _assert_close(actual, expected, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------------ torch reference


@pytest.mark.parametrize("prefix", [0, 5])
def test_reference_with_every_block_selected_is_dense_attention(prefix):
    block_size, q_blocks, k_blocks = 8, 3, 4
    q, k, v = _inputs(2, 2, q_blocks, k_blocks, prefix, 16, block_size)
    index = _random_index(2, 2, q_blocks, k_blocks, top_k=k_blocks)  # all blocks, shuffled
    out, lse = block_sparse_attention(q, k, v, index, block_size, prefix, backend="torch")

    _assert_close(out, F.scaled_dot_product_attention(q, k, v))
    _assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) / 16**0.5, dim=-1))
    assert out.shape == q.shape and out.dtype == q.dtype and lse.dtype == torch.float32


def test_reference_attends_the_prefix_and_the_selected_blocks_only():
    block_size, q_blocks, k_blocks, prefix, scale = 4, 3, 5, 3, 0.3
    q, k, v = _inputs(1, 2, q_blocks, k_blocks, prefix, 8, block_size)
    index = _random_index(1, 2, q_blocks, k_blocks, top_k=2)
    out, lse = block_sparse_attention(q, k, v, index, block_size, prefix, scale=scale, backend="torch")

    for h in range(2):
        for i in range(q_blocks):
            rows = slice(i * block_size, (i + 1) * block_size)
            keys = [*range(prefix)] + [prefix + n * block_size + j for n in index[0, h, i].tolist()
                                       for j in range(block_size)]
            q_i, k_i, v_i = q[0, h, rows], k[0, h, keys], v[0, h, keys]
            _assert_close(out[0, h, rows], F.scaled_dot_product_attention(q_i, k_i, v_i, scale=scale))
            _assert_close(lse[0, h, rows], torch.logsumexp(q_i @ k_i.T * scale, dim=-1))


# ------------------------------------------------------------------------------------------------- triton


def _check_triton_matches_reference(batch, heads, q_blocks, k_blocks, top_k, prefix, head_dim, block_size):
    q, k, v = _inputs(batch, heads, q_blocks, k_blocks, prefix, head_dim, block_size, requires_grad=True)
    index = _random_index(batch, heads, q_blocks, k_blocks, top_k)
    expected = block_sparse_attention(q, k, v, index, block_size, prefix, backend="torch")
    actual = block_sparse_attention(q, k, v, index, block_size, prefix, backend="triton")
    for a, e in zip(actual, expected):
        _assert_close(a, e)
    for a, e in zip(_grads(*actual, (q, k, v)), _grads(*expected, (q, k, v))):
        _assert_close(a, e)


def _check_triton_sparse_matches_reference():
    _check_triton_matches_reference(batch=2, heads=2, q_blocks=2, k_blocks=4, top_k=2, prefix=5, head_dim=16,
                                    block_size=16)


def _check_triton_every_block_is_dense_sdpa():
    # q, k, v in the [B, L, H, D] memory layout a transformer produces: the kernels see non-contiguous strides
    q, k, v = _inputs(1, 2, q_blocks=2, k_blocks=3, prefix=5, head_dim=32, block_size=16)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v))
    index = _random_index(1, 2, 2, 3, top_k=3)
    out, lse = block_sparse_attention(q, k, v, index, 16, 5, backend="triton")
    _assert_close(out, F.scaled_dot_product_attention(q, k, v))
    _assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) / 32**0.5, dim=-1))
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    expected = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), d_out)
    for a, e in zip(torch.autograd.grad(out, (q, k, v), d_out), expected):
        _assert_close(a, e)


def _check_triton_large_blocks_split_into_tiles():
    # 128-token blocks are processed in sub-tiles: 64 keys (forward, dK/dV), 32 keys (dQ), 32 queries (dK/dV);
    # the 70 prefix keys leave ragged last tiles in each
    _check_triton_matches_reference(batch=1, heads=1, q_blocks=2, k_blocks=2, top_k=1, prefix=70, head_dim=16,
                                    block_size=128)


def _check_triton_without_prefix_or_without_blocks():
    _check_triton_matches_reference(batch=1, heads=1, q_blocks=2, k_blocks=2, top_k=1, prefix=0, head_dim=16,
                                    block_size=16)
    _check_triton_matches_reference(batch=1, heads=1, q_blocks=2, k_blocks=2, top_k=0, prefix=7, head_dim=16,
                                    block_size=16)


TRITON_CHECKS = {
    "sparse_matches_reference": _check_triton_sparse_matches_reference,
    "every_block_is_dense_sdpa": _check_triton_every_block_is_dense_sdpa,
    "large_blocks_split_into_tiles": _check_triton_large_blocks_split_into_tiles,
    "without_prefix_or_without_blocks": _check_triton_without_prefix_or_without_blocks,
}


def _run_triton_checks():
    """Child-process entry point: one JSON line per check, "ok" or the traceback."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    for name, check in TRITON_CHECKS.items():
        try:
            check()
            result = "ok"
        except Exception:
            result = traceback.format_exc()
        print(json.dumps({"check": name, "result": result}), flush=True)


@pytest.fixture(scope="module")
def triton_results():
    pytest.importorskip("triton")
    process = subprocess.run(
        [sys.executable, __file__], env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True, text=True, timeout=600,
    )
    results = {}
    for line in process.stdout.splitlines():
        if line.startswith('{"check"'):
            record = json.loads(line)
            results[record["check"]] = record["result"]
    for name in TRITON_CHECKS:  # a crash (e.g. an out-of-bounds access) stops the child mid-way
        results.setdefault(name, f"no report (child exit {process.returncode}):\n{process.stderr[-4000:]}")
    return results


@pytest.mark.parametrize("check", list(TRITON_CHECKS))
def test_triton_kernels_in_the_interpreter(triton_results, check):
    assert triton_results[check] == "ok", triton_results[check]


def test_auto_backend_is_flex_on_cuda_and_triton_only_under_the_interpreter(monkeypatch):
    q = torch.zeros(1, 1, 16, 16)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _resolve_backend("auto", q) == "torch"
    assert _resolve_backend("flex", q) == "flex"
    with monkeypatch.context() as cuda:
        cuda.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # q as a CUDA tensor would resolve
        assert _resolve_backend("auto", q, block_size=64) == "flex"
        assert _resolve_backend("auto", q, block_size=4) == "torch"  # below flex's smallest kernel tile
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _resolve_backend("auto", q) == "triton"


# --------------------------------------------------------------------------------------------------- flex


def test_flex_block_mask_lists_the_selected_blocks_then_the_prefix():
    index = torch.tensor([[[[2, 0], [1, 3]]]])  # B=1, H=1, two query blocks of four key blocks
    mask = _flex_block_mask(index, block_size=16, dense_prefix=20, image_len=64)  # prefix: 2 blocks
    expected = torch.tensor([[1, 0, 1, 0, 1, 1], [0, 1, 0, 1, 1, 1]], dtype=torch.int32)
    assert torch.equal(mask.to_dense()[0, 0].int(), expected)
    assert mask.seq_lengths == (32, 84)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_matches_reference():
    """Forward only: torch 2.14 has no FlexAttention backward on CPU (it raises NotImplementedError)."""
    q, k, v = _inputs(1, 2, q_blocks=3, k_blocks=4, prefix=5, head_dim=16, block_size=16)
    index = _random_index(1, 2, 3, 4, top_k=2)
    expected = block_sparse_attention(q, k, v, index, 16, 5, backend="torch")
    with torch.no_grad():
        actual = block_sparse_attention(q, k, v, index, 16, 5, backend="flex")
    for a, e in zip(actual, expected):
        _assert_close(a, e)


# ------------------------------------------------------------------------------------------------ validation


def _valid_call():
    q, k, v = _inputs(1, 2, q_blocks=2, k_blocks=3, prefix=5, head_dim=16, block_size=16)
    return {"q": q, "k": k, "v": v, "block_index": _random_index(1, 2, 2, 3, top_k=2), "block_size": 16,
            "dense_prefix": 5, "backend": "torch"}


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c.update(q=c["q"][:, :, :-1]), "query length 31 is not a multiple of block_size 16"),
    (lambda c: c.update(dense_prefix=4), "image key length 49 .* not a multiple of block_size 16"),
    (lambda c: c.update(dense_prefix=60), "dense_prefix must be an int in \\[0, 53\\]"),
    (lambda c: c.update(block_index=c["block_index"][:, :, :1]), "block_index must be \\[B=1, H=2, .*=2, top_k\\]"),
    (lambda c: c["block_index"].__setitem__((0, 0, 0, 0), 3), "out of range \\[0, 3\\)"),
    (lambda c: c["block_index"].__setitem__((0, 1, 1, 0), -1), "out of range"),
    (lambda c: c["block_index"].__setitem__((0, 0, 1), torch.tensor([2, 2])), "distinct"),
    (lambda c: c.update(block_index=c["block_index"].float()), "integer tensor"),
    (lambda c: c.update(block_index=_random_index(1, 2, 2, 3, top_k=0), dense_prefix=0,
                        k=c["k"][:, :, 5:], v=c["v"][:, :, 5:]), "nothing to attend"),
    (lambda c: c.update(v=c["v"][..., :8]), "k and v must be"),
    (lambda c: c.update(k=c["k"].double()), "share a dtype"),
    (lambda c: c.update(backend="cuda"), "unknown block-sparse attention backend 'cuda'"),
    (lambda c: c.update(backend="triton", q=c["q"].repeat(1, 1, 1, 2)[..., :24],
                        k=c["k"].repeat(1, 1, 1, 2)[..., :24], v=c["v"].repeat(1, 1, 1, 2)[..., :24]),
     "supports head dim D in \\(16, 32, 64, 128\\); got 24"),
    (lambda c: c.update(backend="triton"), "needs CUDA tensors"),
])
def test_bad_inputs_raise_value_errors(monkeypatch, change, message):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    call = _valid_call()
    block_sparse_attention(**call)  # the unchanged call is valid
    change(call)
    with pytest.raises(ValueError, match=message):
        block_sparse_attention(**call)


if __name__ == "__main__":
    _run_triton_checks()


def test_tile_selection_and_the_flex_block_mask_need_no_host_sync(monkeypatch):
    """Selection (tile means, scores, top-k), the fine stage's mask and the packed record of the selection stay on
    the device: no ``.item()``, ``.tolist()``, ``.cpu()`` or truth test of a tensor, which would stall a GPU's queue
    on every transformer call."""
    from tempflow.attention.block_sparse import BlockSparse, sparse_image_attention

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 64, 16, generator=generator) for _ in range(3))
    text_k, text_v = (torch.randn(2, 2, 5, 16, generator=generator) for _ in range(2))
    index = torch.stack([torch.randperm(4, generator=generator)[:2] for _ in range(2 * 2 * 4)]).view(2, 2, 4, 2)

    def host_sync(name):
        def refuse(*args, **kwargs):
            raise AssertionError(f"Tensor.{name} synchronises with the host")
        return refuse

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_sync(name))
    out = sparse_image_attention(q, k, v, text_k, text_v, (8, 8), BlockSparse(0.5, (4, 4), kernel="torch"))
    mask = _flex_block_mask(index, block_size=16, dense_prefix=5, image_len=64)
    monkeypatch.undo()
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert mask.kv_indices.shape[:3] == (2, 2, 4)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("grid, tile, text", [((8, 8), (4, 4), 5), ((4, 4, 8), (2, 2, 4), 0), ((4, 4, 8), (2, 2, 4), 7)],
                         ids=["image-with-text", "video", "video-with-text"])
def test_flex_block_sparse_attention_equals_the_dense_reference_under_the_same_tiles(grid, tile, text):
    """The whole sparse image attention (tile order, selection, fine stage, text keys dense) with FlexAttention as
    the fine stage equals the PyTorch reference of the same selection within 1e-5, for 2-D image tiles and Wan's 3-D
    tiles, with and without text keys. Forward only on the CPU: torch 2.14 has no FlexAttention backward there (the
    GPU suite's kernel tests check it compiled, forward and backward)."""
    from tempflow.attention.block_sparse import BlockSparse, sparse_image_attention

    generator = torch.Generator().manual_seed(1)
    tokens = math.prod(grid)
    q, k, v = (torch.randn(2, 2, tokens, 16, generator=generator) for _ in range(3))
    text_k, text_v = ((torch.randn(2, 2, text, 16, generator=generator) for _ in range(2)) if text else (None, None))
    results = {}
    with torch.no_grad():
        for kernel in ("torch", "flex"):
            results[kernel] = sparse_image_attention(q, k, v, text_k, text_v, grid, BlockSparse(0.5, tile, kernel=kernel))
    torch.testing.assert_close(results["flex"], results["torch"], atol=1e-5, rtol=1e-5)
