"""Block-sparse attention (the fine stage of VSA-style sparse attention, DESIGN §7) with three backends.

Queries are image tokens in tile order, cut into blocks of ``block_size``. Keys are ``P = dense_prefix``
prefix tokens (text) that every query attends, followed by image tokens in tile order, cut into the same
blocks. ``block_index[b, h, i]`` lists the ``top_k`` distinct image key blocks that query block ``i`` attends
besides the prefix, so query ``r`` of block ``i`` computes

    s_rj = scale · q_r · k_j,    lse_r = log Σ_j exp(s_rj),    o_r = Σ_j exp(s_rj − lse_r) · v_j

over ``j ∈ prefix ∪ ⋃_{n ∈ block_index[b, h, i]} key block n``.

* ``torch``: the correctness oracle and CPU fallback; a dense boolean mask and masked float32 softmax.
* ``triton``: flash-attention-2 style kernels. The forward runs one program per (batch·head, query block),
  streaming key tiles (the prefix in masked chunks, then the selected blocks) through an online softmax:
  keep the running row max ``m`` and sum ``l`` and rescale the float32 accumulator by ``exp(m_old − m_new)``
  when the max grows, so the scores never leave the chip. The backward recomputes probabilities from the
  saved ``lse``: ``dS = P ⊙ (dP − δ)`` with ``δ_r = Σ_d dO_rd O_rd`` (minus the incoming ``∂L/∂lse``). dQ is
  one program per query block over its keys; dK/dV is one program per key tile over the query blocks that
  attend it, read from an inverted index (a CSR list per key block), so nothing needs atomics.
* ``flex``: ``torch.nn.attention.flex_attention`` with a ``BlockMask`` built from ``block_index``.

Triton is imported only when the triton backend runs. Its kernels are built on first use, when
``@triton.jit`` also decides between compiling for the GPU and the CPU interpreter (``TRITON_INTERPRET=1``).
"""

import functools
import math
import os

import torch

BLOCK_SPARSE_BACKENDS = ("auto", "triton", "flex", "torch")
TRITON_HEAD_DIMS = (16, 32, 64, 128)
TRITON_BLOCK_SIZES = (16, 32, 64, 128)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLEX_BLOCK_SIZES = (16, 32, 64, 128)
"""Sparse block sizes the FlexAttention path takes on CUDA (its kernel tiles are set to them below 128)."""


def block_sparse_attention(
    q, k, v, block_index, block_size=64, dense_prefix=0, scale=None, backend="auto", check_index=True
):
    """Returns (out, lse).
    q: [B, H, Lq, D]  image queries in tile order, Lq a multiple of block_size.
    k, v: [B, H, P + Lk, D]  the first P = dense_prefix keys (e.g. text tokens; P arbitrary, not necessarily a
          multiple of block_size) are attended by EVERY query; then Lk image keys in tile order, Lk a multiple
          of block_size.
    block_index: [B, H, Lq // block_size, top_k] integer tensor; for each query block, the indices (in
          [0, Lk//block_size), distinct within a row) of the image key blocks it attends to (in addition to the
          P prefix keys).
    scale: softmax scale, default D ** -0.5.
    out: [B, H, Lq, D] same dtype as q; lse: [B, H, Lq] float32 log-sum-exp of the scaled scores over the
          attended keys.
    backend: "triton" | "flex" | "torch" | "auto" (auto: flex when q is on CUDA and block_size is one of
          FLEX_BLOCK_SIZES; triton when the triton interpreter is active (env TRITON_INTERPRET=1); otherwise torch).
    check_index: check that block_index entries are in range and distinct (one device sync); callers whose
          indices come from ``topk`` over the key blocks may skip it.
    Differentiable w.r.t. q, k, v (not block_index)."""
    _check_inputs(q, k, v, block_index, block_size, dense_prefix, check_index)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = _resolve_backend(backend, q, block_size)
    if backend == "triton":
        _check_triton_inputs(q, block_size)
        return _TritonBlockSparseAttention.apply(q, k, v, block_index, block_size, dense_prefix, scale)
    if backend == "flex":
        return _flex_block_sparse_attention(q, k, v, block_index, block_size, dense_prefix, scale)
    return _reference_block_sparse_attention(q, k, v, block_index, block_size, dense_prefix, scale)


# ----------------------------------------------------------------------------------------------- validation


def _check_inputs(q, k, v, block_index, block_size, dense_prefix, check_index=True):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, L, D]; got shapes {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    batch, heads, q_len, head_dim = q.shape
    if k.shape != v.shape or k.shape[:2] != (batch, heads) or k.shape[3] != head_dim:
        raise ValueError(f"k and v must be [B={batch}, H={heads}, P + Lk, D={head_dim}]; got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == block_index.device):
        raise ValueError(f"q, k, v and block_index must be on one device; got {q.device}, {k.device}, "
                         f"{v.device}, {block_index.device}")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int; got {block_size!r}")
    if not isinstance(dense_prefix, int) or not 0 <= dense_prefix <= k.shape[2]:
        raise ValueError(f"dense_prefix must be an int in [0, {k.shape[2]}] (the key length); got {dense_prefix!r}")
    image_len = k.shape[2] - dense_prefix
    if q_len % block_size:
        raise ValueError(f"query length {q_len} is not a multiple of block_size {block_size}")
    if image_len % block_size:
        raise ValueError(f"image key length {image_len} (keys after the dense prefix of {dense_prefix}) is not a "
                         f"multiple of block_size {block_size}")
    q_blocks, k_blocks = q_len // block_size, image_len // block_size
    if block_index.dim() != 4 or block_index.shape[:3] != (batch, heads, q_blocks):
        raise ValueError(f"block_index must be [B={batch}, H={heads}, Lq // block_size={q_blocks}, top_k]; got "
                         f"{tuple(block_index.shape)}")
    if block_index.dtype.is_floating_point or block_index.dtype.is_complex or block_index.dtype == torch.bool:
        raise ValueError(f"block_index must be an integer tensor; got {block_index.dtype}")
    top_k = block_index.shape[-1]
    if top_k > k_blocks:
        raise ValueError(f"top_k={top_k} exceeds the {k_blocks} image key blocks")
    if top_k == 0 and dense_prefix == 0:
        raise ValueError("nothing to attend: top_k is 0 and there is no dense prefix")
    if check_index:
        _check_index_values(block_index, k_blocks)


def _check_index_values(block_index, k_blocks):
    if block_index.numel() == 0:
        return
    ordered = block_index.sort(dim=-1).values
    out_of_range = ((ordered[..., 0] < 0) | (ordered[..., -1] >= k_blocks)).any()
    repeated = (ordered[..., 1:] == ordered[..., :-1]).any()
    out_of_range, repeated = torch.stack([out_of_range, repeated]).tolist()  # one device sync for both
    if out_of_range:
        raise ValueError(f"block_index has entries out of range [0, {k_blocks}) (the number of image key blocks)")
    if repeated:
        raise ValueError("block_index rows must hold distinct key blocks; found a repeated index")


def _check_triton_inputs(q, block_size):
    head_dim = q.shape[-1]
    if head_dim not in TRITON_HEAD_DIMS:
        raise ValueError(f"the triton backend supports head dim D in {TRITON_HEAD_DIMS}; got {head_dim}")
    if block_size not in TRITON_BLOCK_SIZES:
        raise ValueError(f"the triton backend supports block_size in {TRITON_BLOCK_SIZES}; got {block_size}")
    if q.dtype not in TRITON_DTYPES:
        raise ValueError(f"the triton backend supports dtypes {TRITON_DTYPES}; got {q.dtype}")
    if not q.is_cuda and not _triton_interpreting():
        raise ValueError("the triton backend needs CUDA tensors, or the triton interpreter (TRITON_INTERPRET=1 "
                         "set before the first triton call) for CPU tensors")


def _resolve_backend(backend, q, block_size=64):
    """``auto``: FlexAttention on CUDA for the block sizes its kernel takes (the Triton kernels lost to dense SDPA
    at image sizes on an H200, BENCHMARKS.md), the Triton kernels under the interpreter (CPU tests), else torch."""
    if backend not in BLOCK_SPARSE_BACKENDS:
        raise ValueError(f"unknown block-sparse attention backend {backend!r}; expected one of "
                         f"{list(BLOCK_SPARSE_BACKENDS)}")
    if backend != "auto":
        return backend
    if q.is_cuda:
        return "flex" if block_size in FLEX_BLOCK_SIZES else "torch"
    return "triton" if _triton_interpreting() else "torch"


def _triton_interpreting():
    """Whether ``@triton.jit`` would build interpreter kernels now (triton reads TRITON_INTERPRET itself)."""
    if "TRITON_INTERPRET" not in os.environ:
        return False
    import triton

    return bool(triton.knobs.runtime.interpret)


# ---------------------------------------------------------------------------------------- torch reference


def _dense_mask(block_index, block_size, dense_prefix, q_len, image_len):
    """[B, H, Lq, P + Lk] boolean: which keys each query attends."""
    batch, heads, q_blocks, _ = block_index.shape
    k_blocks = image_len // block_size
    selected = torch.zeros(batch, heads, q_blocks, k_blocks, dtype=torch.bool, device=block_index.device)
    selected.scatter_(-1, block_index.long(), True)
    image = selected.repeat_interleave(block_size, dim=2).repeat_interleave(block_size, dim=3)
    prefix = image.new_ones(batch, heads, q_len, dense_prefix)
    return torch.cat([prefix, image], dim=-1)


def _reference_block_sparse_attention(q, k, v, block_index, block_size, dense_prefix, scale):
    mask = _dense_mask(block_index, block_size, dense_prefix, q.shape[2], k.shape[2] - dense_prefix)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.softmax(scores, dim=-1) @ v.float()
    return out.to(q.dtype), lse


# ------------------------------------------------------------------------------------------ FlexAttention


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_block_mask(block_index, block_size, dense_prefix, image_len):
    """BlockMask over keys reordered as [image blocks | prefix]: image tiles then sit on block boundaries and the
    prefix fills the last ``ceil(P / block_size)`` key blocks (the last one ragged, which flex handles).

    Every attended block is attended in full, so all go in the ``full`` lists (the fused kernel then never calls
    ``mask_mod``); the ``mask_mod`` still states the exact pattern, because flex's unfused path uses only it."""
    from torch.nn.attention.flex_attention import BlockMask

    batch, heads, q_blocks, _ = block_index.shape
    columns = image_len // block_size + _cdiv(dense_prefix, block_size)
    attended = torch.zeros(batch, heads, q_blocks, columns, dtype=torch.bool, device=block_index.device)
    attended.scatter_(-1, block_index.long(), True)
    attended[..., image_len // block_size:] = True

    def mask_mod(b, h, q_idx, kv_idx):
        return attended[b, h, q_idx // block_size, kv_idx // block_size]

    # flex's ordered layout: per query block, the attended columns first (ascending), then the rest as padding
    order = torch.argsort(attended.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    counts = attended.sum(dim=-1, dtype=torch.int32)
    return BlockMask.from_kv_blocks(
        torch.zeros_like(counts), torch.zeros_like(order),
        full_kv_num_blocks=counts, full_kv_indices=order,
        BLOCK_SIZE=block_size, mask_mod=mask_mod,
        seq_lengths=(q_blocks * block_size, image_len + dense_prefix),
    )


def _flex_block_sparse_attention(q, k, v, block_index, block_size, dense_prefix, scale):
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    image_len = k.shape[2] - dense_prefix
    block_mask = _flex_block_mask(block_index, block_size, dense_prefix, image_len)
    k = torch.cat([k[:, :, dense_prefix:], k[:, :, :dense_prefix]], dim=2)
    v = torch.cat([v[:, :, dense_prefix:], v[:, :, :dense_prefix]], dim=2)
    if q.is_cuda:
        # flex's default 128-token tiles cannot serve smaller sparse blocks (DESIGN §6). The backward's tiles are
        # set too: torch 2.11 does not shrink them itself and then finds no valid backward kernel (H200, 2026-11-28)
        options = None
        if block_size < 128:
            half = max(16, block_size // 2)
            options = {"fwd_BLOCK_M": block_size, "fwd_BLOCK_N": block_size,
                       "bwd_BLOCK_M1": half, "bwd_BLOCK_N1": block_size,
                       "bwd_BLOCK_M2": block_size, "bwd_BLOCK_N2": half}
        out, aux = _compiled_flex_attention()(q, k, v, block_mask=block_mask, scale=scale,
                                               kernel_options=options, return_aux=AuxRequest(lse=True))
    else:
        # Unfused (dense scores) without compile: fine for small shapes. torch has no flex backward on CPU and
        # refuses inputs that require grad even under no_grad, where nothing will be differentiated anyway.
        if not torch.is_grad_enabled():
            q, k, v = q.detach(), k.detach(), v.detach()
        out, aux = flex_attention(q, k, v, block_mask=block_mask, scale=scale, return_aux=AuxRequest(lse=True))
    return out, aux.lse.float()


# ------------------------------------------------------------------------------------------------- triton


def _tile_config(block_size, dtype):
    """Tile sizes and launch settings. Key tiles of at most 64 rows (32 in dQ, 32-query sub-tiles in dK/dV)
    keep the float32 accumulators of a 128-wide head in registers, as in flash-attention 2 on Hopper (checked
    by compiling for sm_90: no spills in bf16/fp16). float32 is the exactness path, not the fast one: its tiles
    are four times larger, so it is not software-pipelined, to stay within shared memory."""
    warps = 8 if block_size > 64 else 4
    pipelined = dtype != torch.float32
    return {
        "fwd": {"BLOCK_N": min(block_size, 64), "num_warps": warps, "num_stages": 3 if pipelined else 1},
        "dq": {"BLOCK_N": min(block_size, 32), "num_warps": warps, "num_stages": 2 if pipelined else 1},
        "dkdv": {"BLOCK_N": min(block_size, 64), "BLOCK_M": min(block_size, 32), "num_warps": 8,
                 "num_stages": 2 if pipelined else 1},
    }


def _key_block_rows(index, q_blocks, k_blocks, prefix_columns):
    """Inverted index, CSR per batch·head: for each key column (``prefix_columns`` prefix chunks, then the image
    key blocks), the query blocks that attend it. Returns ``rows [BH, nnz]``, ``starts``, ``counts [BH, C]``.

    Prefix chunks are attended by every query block; an image block's rows come from a stable sort of the
    flattened ``block_index`` by key block, so each list is in ascending query-block order."""
    bh, _, top_k = index.shape
    flat = index.reshape(bh, q_blocks * top_k).long()
    image_rows = torch.argsort(flat, dim=1, stable=True) // max(top_k, 1)
    image_counts = torch.zeros(bh, k_blocks, dtype=torch.long, device=index.device)
    image_counts.scatter_add_(1, flat, torch.ones_like(flat))
    prefix_rows = torch.arange(q_blocks, device=index.device).repeat(prefix_columns).expand(bh, -1)
    prefix_counts = torch.full((bh, prefix_columns), q_blocks, dtype=torch.long, device=index.device)
    rows = torch.cat([prefix_rows, image_rows], dim=1)
    counts = torch.cat([prefix_counts, image_counts], dim=1)
    starts = counts.cumsum(dim=1) - counts
    return rows.to(torch.int32).contiguous(), starts.to(torch.int32), counts.to(torch.int32)


def _cdiv(a, b):
    return -(-a // b)


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _rows_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


class _TritonBlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_index, block_size, dense_prefix, scale):
        q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
        batch, heads, q_len, head_dim = q.shape
        index = block_index.to(torch.int32).reshape(batch * heads, q_len // block_size, -1).contiguous()
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty(batch, heads, q_len, dtype=torch.float32, device=q.device)
        kernels, config = _triton_kernels(_triton_interpreting()), _tile_config(block_size, q.dtype)["fwd"]
        grid = (q_len // block_size, batch * heads)
        kernels.forward[grid](
            q, k, v, out, lse, index, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            heads, dense_prefix, _cdiv(dense_prefix, config["BLOCK_N"]), index.shape[-1], scale * math.log2(math.e),
            BLOCK=block_size, BLOCK_N=config["BLOCK_N"], HEAD_DIM=head_dim, PRECISION=_dot_precision(q.dtype),
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )
        ctx.save_for_backward(q, k, v, out, lse, index)
        ctx.set_materialize_grads(False)  # an unused output's gradient then arrives as None, not zeros
        ctx.block_size, ctx.dense_prefix, ctx.scale = block_size, dense_prefix, scale
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse, index = ctx.saved_tensors
        block_size, dense_prefix, scale = ctx.block_size, ctx.dense_prefix, ctx.scale
        batch, heads, q_len, head_dim = q.shape
        q_blocks, top_k = index.shape[1], index.shape[2]
        k_blocks = (k.shape[2] - dense_prefix) // block_size
        prefix_columns = _cdiv(dense_prefix, block_size)
        d_out = torch.zeros_like(out) if d_out is None else _rows_contiguous(d_out)
        kernels, config = _triton_kernels(_triton_interpreting()), _tile_config(block_size, q.dtype)
        common = {"HEAD_DIM": head_dim, "PRECISION": _dot_precision(q.dtype)}
        qk_scale = scale * math.log2(math.e)

        delta = torch.empty_like(lse)
        kernels.delta[(q_blocks, batch * heads)](
            out, d_out, delta, *_strides(out), *_strides(d_out), heads, BLOCK=block_size, HEAD_DIM=head_dim,
        )
        if d_lse is not None:  # ∂lse_r/∂s_rj = p_rj, which enters dS exactly like −δ_r
            delta = (delta - d_lse.float()).contiguous()

        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        kernels.dq[(q_blocks, batch * heads)](
            q, k, v, d_out, dq, lse, delta, index,
            *_strides(q), *_strides(k), *_strides(v), *_strides(d_out), *_strides(dq),
            heads, dense_prefix, _cdiv(dense_prefix, config["dq"]["BLOCK_N"]), top_k, scale, qk_scale,
            BLOCK=block_size, BLOCK_N=config["dq"]["BLOCK_N"], **common,
            num_warps=config["dq"]["num_warps"], num_stages=config["dq"]["num_stages"],
        )

        rows, starts, counts = _key_block_rows(index, q_blocks, k_blocks, prefix_columns)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        dkdv = config["dkdv"]
        # batch·head on the fast grid axis, so all the long prefix programs are scheduled first
        grid = (batch * heads, (prefix_columns + k_blocks) * (block_size // dkdv["BLOCK_N"]))
        kernels.dkdv[grid](
            q, k, v, d_out, dk, dv, lse, delta, rows, starts, counts,
            *_strides(q), *_strides(k), *_strides(v), *_strides(d_out), *_strides(dk), *_strides(dv),
            heads, q_len, dense_prefix, prefix_columns, prefix_columns + k_blocks, rows.shape[1], scale, qk_scale,
            BLOCK=block_size, BLOCK_M=dkdv["BLOCK_M"], BLOCK_N=dkdv["BLOCK_N"], **common,
            num_warps=dkdv["num_warps"], num_stages=dkdv["num_stages"],
        )
        return dq, dk, dv, None, None, None, None


def _dot_precision(dtype):
    # float32 callers expect float32 products, not TF32; the half types ignore the setting
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _triton_kernels(interpret):
    """The kernels, built once per mode: ``interpret`` only keys the cache, since ``@triton.jit`` reads the
    TRITON_INTERPRET setting itself at decoration time.

    ``triton`` and ``tl`` are bound as module globals (not closure variables) because the interpreter re-executes
    each kernel's source against its module's globals. For the same reason the kernels call no helper kernels
    and avoid tuple assignments, which the interpreter's rewriting does not handle."""
    global triton, tl
    import types

    import triton
    import triton.language as tl

    @triton.jit
    def _forward_kernel(Q, K, V, Out, LSE, IDX,
                        stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                        stride_vb, stride_vh, stride_vl, stride_ob, stride_oh, stride_ol,
                        H, n_prefix, prefix_tiles, top_k, qk_scale,
                        BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                        PRECISION: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :])
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        idx_row = IDX + (pid_bh * tl.num_programs(0) + pid_m) * top_k
        m_i = tl.full([BLOCK], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK], tl.float32)
        acc = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
        # one flat loop over key tiles: the prefix in ragged chunks, then each selected block's tiles
        for t in range(prefix_tiles + top_k * (BLOCK // BLOCK_N)):
            u = tl.maximum(t - prefix_tiles, 0)
            key_block = tl.load(idx_row + u // (BLOCK // BLOCK_N), mask=t >= prefix_tiles, other=0)
            first_key = tl.where(t < prefix_tiles, t * BLOCK_N,
                                 n_prefix + key_block * BLOCK + (u % (BLOCK // BLOCK_N)) * BLOCK_N)
            keys = first_key + offs_n
            valid = (keys < n_prefix) | (t >= prefix_tiles)
            k = tl.load(k_base + keys[:, None] * stride_kl + offs_d[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(v_base + keys[:, None] * stride_vl + offs_d[None, :], mask=valid[:, None], other=0.0)
            # scores in log2 units (qk_scale includes log2 e), so exp2 does the exponentials
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :],
                 out.to(Out.dtype.element_ty))
        q_len = tl.num_programs(0) * BLOCK
        tl.store(LSE + pid_bh.to(tl.int64) * q_len + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453)

    @triton.jit
    def _delta_kernel(Out, DO, DELTA, stride_ob, stride_oh, stride_ol, stride_db, stride_dh, stride_dl, H,
                      BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, HEAD_DIM)
        o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :])
        do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dl + offs_d[None, :])
        q_len = tl.num_programs(0) * BLOCK
        tl.store(DELTA + pid_bh.to(tl.int64) * q_len + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1))

    @triton.jit
    def _dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, IDX,
                   stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                   stride_vb, stride_vh, stride_vl, stride_db, stride_dh, stride_dl,
                   stride_gb, stride_gh, stride_gl,
                   H, n_prefix, prefix_tiles, top_k, sm_scale, qk_scale,
                   BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :])
        do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dl + offs_d[None, :])
        q_len = tl.num_programs(0) * BLOCK
        lse2 = tl.load(LSE + pid_bh.to(tl.int64) * q_len + offs_m) * 1.4426950408889634
        delta = tl.load(DELTA + pid_bh.to(tl.int64) * q_len + offs_m)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        idx_row = IDX + (pid_bh * tl.num_programs(0) + pid_m) * top_k
        dq = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
        for t in range(prefix_tiles + top_k * (BLOCK // BLOCK_N)):  # the forward's key tiles
            u = tl.maximum(t - prefix_tiles, 0)
            key_block = tl.load(idx_row + u // (BLOCK // BLOCK_N), mask=t >= prefix_tiles, other=0)
            first_key = tl.where(t < prefix_tiles, t * BLOCK_N,
                                 n_prefix + key_block * BLOCK + (u % (BLOCK // BLOCK_N)) * BLOCK_N)
            keys = first_key + offs_n
            valid = (keys < n_prefix) | (t >= prefix_tiles)
            k = tl.load(k_base + keys[:, None] * stride_kl + offs_d[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(v_base + keys[:, None] * stride_vl + offs_d[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.where(valid[None, :], tl.exp2(s - lse2[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        tl.store(DQ + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gl + offs_d[None, :],
                 (dq * sm_scale).to(DQ.dtype.element_ty))

    @triton.jit
    def _dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, ROWS, STARTS, COUNTS,
                     stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                     stride_vb, stride_vh, stride_vl, stride_db, stride_dh, stride_dl,
                     stride_gkb, stride_gkh, stride_gkl, stride_gvb, stride_gvh, stride_gvl,
                     H, q_len, n_prefix, prefix_columns, n_columns, rows_per_head, sm_scale, qk_scale,
                     BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
        pid_bh = tl.program_id(0)
        pid_t = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        # this program's key tile: tile (pid_t mod split) of key column pid_t // split, where the columns are
        # the prefix chunks followed by the image key blocks
        column = pid_t // (BLOCK // BLOCK_N)
        column_start = tl.where(column < prefix_columns, column * BLOCK,
                                n_prefix + (column - prefix_columns) * BLOCK)
        keys = column_start + (pid_t % (BLOCK // BLOCK_N)) * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = (keys < n_prefix) | (column >= prefix_columns)
        offs_d = tl.arange(0, HEAD_DIM)
        k = tl.load(K + b * stride_kb + h * stride_kh + keys[:, None] * stride_kl + offs_d[None, :],
                    mask=valid[:, None], other=0.0)
        v = tl.load(V + b * stride_vb + h * stride_vh + keys[:, None] * stride_vl + offs_d[None, :],
                    mask=valid[:, None], other=0.0)
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_db + h * stride_dh
        lse_base = LSE + pid_bh.to(tl.int64) * q_len
        delta_base = DELTA + pid_bh.to(tl.int64) * q_len
        rows = ROWS + pid_bh.to(tl.int64) * rows_per_head + tl.load(STARTS + pid_bh * n_columns + column)
        count = tl.load(COUNTS + pid_bh * n_columns + column)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        for t in range(count * (BLOCK // BLOCK_M)):
            q_block = tl.load(rows + t // (BLOCK // BLOCK_M))
            offs_m = q_block * BLOCK + (t % (BLOCK // BLOCK_M)) * BLOCK_M + tl.arange(0, BLOCK_M)
            q = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d[None, :])
            do = tl.load(do_base + offs_m[:, None] * stride_dl + offs_d[None, :])
            lse2 = tl.load(lse_base + offs_m) * 1.4426950408889634
            delta = tl.load(delta_base + offs_m)
            # transposed tiles ([keys, queries]) so dK and dV accumulate without transposing back
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
            p_t = tl.where(valid[:, None], tl.exp2(s_t - lse2[None, :]), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
        tl.store(DK + b * stride_gkb + h * stride_gkh + keys[:, None] * stride_gkl + offs_d[None, :],
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=valid[:, None])
        tl.store(DV + b * stride_gvb + h * stride_gvh + keys[:, None] * stride_gvl + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=valid[:, None])

    return types.SimpleNamespace(forward=_forward_kernel, delta=_delta_kernel, dq=_dq_kernel, dkdv=_dkdv_kernel)
