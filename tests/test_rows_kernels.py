"""Row gather / weighted combine kernels against plain torch indexing (exact copies; fp32 sums)."""

import numpy as np
import pytest
import torch
from reference import linear as ref_linear
from reference import rel_err

import kt_jit
from kt_jit.kernels.rows import RowsSpec, get_kernel
from kt_jit.moe.routing import route

pytestmark = pytest.mark.skipif(not kt_jit.cpu_info().avx512_bf16, reason="row kernels use AVX-512 BF16")


@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [32, 96, 2048])
def test_gather_puts_each_token_on_its_rows(src_dtype, cols):
    g = torch.Generator().manual_seed(cols)
    t, k, e = 37, 3, 5
    ids = torch.randint(0, e, (t, k), generator=g)
    r = route(ids, e)
    src = torch.randn(t, cols, generator=g).to(src_dtype)
    dst = torch.full((r.rows, cols), float("nan"), dtype=torch.bfloat16)
    spec = RowsSpec("gather", cols, "bf16" if src_dtype == torch.bfloat16 else "f32", "bf16")
    get_kernel(spec).gather(dst.data_ptr(), src.data_ptr(), r.slot_row.ctypes.data, r.slot_token.ctypes.data,
                            r.slot_row.size)
    rows, tokens = torch.from_numpy(r.slot_row), torch.from_numpy(r.slot_token)
    assert torch.equal(dst[rows], src[tokens].bfloat16())  # fp32 -> bf16 rounds to nearest even


@pytest.mark.parametrize("rank", [16, 32])
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
def test_gather_with_a_products(src_dtype, rank):
    """The gather's fused A-products: h[row] = alpha [x_row a0_e^T | x_row a1_e^T] (bf16) of every
    row it copies, from the bf16 row; padded rows' h untouched. A's expert stride padded."""
    g = torch.Generator().manual_seed(rank)
    t, k, e, cols, alpha = 9, 3, 5, 96, 1.75
    ids = torch.randint(0, e, (t, k), generator=g)
    r = route(ids, e)
    src = torch.randn(t, cols, generator=g).to(src_dtype)
    a0, a1 = (torch.randn(e, rank + 2, cols, generator=g).bfloat16()[:, :rank] for _ in range(2))
    dst = torch.zeros(r.rows, cols, dtype=torch.bfloat16)
    h = torch.full((r.rows, 2 * rank + 16), float("nan"), dtype=torch.bfloat16)
    spec = RowsSpec("gather", cols, "bf16" if src_dtype == torch.bfloat16 else "f32", "bf16", lora_rank=rank)
    assert a0.stride(0) == a1.stride(0)
    get_kernel(spec).gather(dst.data_ptr(), src.data_ptr(), r.slot_row.ctypes.data, r.slot_token.ctypes.data,
                            r.slot_row.size, alpha=alpha, eid=r.slot_expert.ctypes.data, a0=a0.data_ptr(),
                            a1=a1.data_ptr(), astride=a0.stride(0) * 2, h=h.data_ptr(), ldh=h.stride(0) * 2)
    rows, tokens = torch.from_numpy(r.slot_row), torch.from_numpy(r.slot_token)
    ex = torch.from_numpy(r.slot_expert)
    assert torch.equal(dst[rows], src[tokens].bfloat16())
    xb = dst[rows].float()
    for half, a in enumerate((a0, a1)):
        want = alpha * torch.cat([ref_linear(xb[j:j + 1], a[e]) for j, e in enumerate(ex.tolist())])
        assert rel_err(h[rows, half * rank:(half + 1) * rank].float(), want) < 4e-3
    assert torch.isnan(h[rows, 2 * rank:].float()).all()  # nothing past the products
    unrouted = torch.ones(r.rows, dtype=torch.bool)
    unrouted[rows] = False
    assert torch.isnan(h[unrouted].float()).all()


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [32, 96, 2048])
def test_combine_sums_each_tokens_rows(weighted, out_dtype, cols):
    g = torch.Generator().manual_seed(7 + cols)
    t, k, e = 29, 4, 6
    ids = torch.randint(0, e, (t, k), generator=g)
    r = route(ids, e)
    y = torch.randn(r.rows, cols, generator=g)
    w = torch.rand(t, k, generator=g)
    out = torch.full((t, cols), float("nan"), dtype=out_dtype)
    spec = RowsSpec("combine", cols, "f32", "bf16" if out_dtype == torch.bfloat16 else "f32", weighted)
    get_kernel(spec).combine(out.data_ptr(), y.data_ptr(), r.row_of.ctypes.data, w.data_ptr() if weighted else 0,
                             t, k)
    want = (y[torch.from_numpy(r.row_of)] * (w if weighted else torch.ones(t, k)).unsqueeze(-1)).sum(1)
    assert rel_err(out.float(), want) < (1e-6 if out_dtype == torch.float32 else 4e-3)


@pytest.mark.parametrize("t,k,e", [(37, 3, 5), (1, 8, 128), (64, 6, 64), (0, 2, 4), (5, 1, 1)])
def test_route_is_a_stable_sort_by_expert(t, k, e):
    ids = torch.randint(0, e, (t, k), generator=torch.Generator().manual_seed(t + e))
    r = route(ids, e)
    flat = ids.reshape(-1).numpy()
    order = np.argsort(flat, kind="stable")
    assert np.array_equal(r.slot_token * k + r.slot_k, order)
    counts = np.bincount(flat, minlength=e)
    assert np.array_equal(r.experts, np.flatnonzero(counts))
    assert np.array_equal(r.counts, counts[r.experts])
    padded = -(-r.counts // 16) * 16
    assert np.array_equal(r.starts, np.cumsum(padded) - padded)
    assert r.rows == padded.sum()
    within = np.repeat(np.arange(r.experts.size), r.counts)  # segment of each sorted pair
    assert np.array_equal(r.slot_row, r.starts[within] + np.arange(t * k) - (np.cumsum(r.counts) - r.counts)[within])
    assert np.array_equal(r.row_of.reshape(-1)[order], r.slot_row)


@pytest.mark.parametrize("bad", [-1, 4, 1 << 40])
def test_route_refuses_ids_out_of_range(bad):
    ids = torch.tensor([[0, 1], [2, bad], [3, 0]])
    with pytest.raises(ValueError, match=rf"expert ids in \[{min(bad, 0)}, {max(bad, 3)}\].*only 4 experts"):
        route(ids, 4)


def test_row_of_inverts_the_expert_order():
    ids = torch.tensor([[2, 0], [2, 1], [0, 2]])
    r = route(ids, 3)
    for j in range(ids.numel()):
        assert r.row_of[r.slot_token[j], r.slot_k[j]] == r.slot_row[j]


def test_bad_specs_are_rejected():
    with pytest.raises(ValueError, match="multiple of 32"):
        RowsSpec("gather", 48)
    with pytest.raises(ValueError, match="op"):
        RowsSpec("scatter", 64)
    with pytest.raises(ValueError, match="bf16"):
        RowsSpec("gather", 64, "f32", "f32")
    with pytest.raises(ValueError, match="lora_rank"):
        RowsSpec("gather", 64, lora_rank=8)
    with pytest.raises(ValueError, match="lora_rank"):
        RowsSpec("combine", 64, lora_rank=16)


def test_zero_slices_writes_exactly_the_masked_experts():
    """The streaming zero fill (idle experts' LoRA gradients): every byte of every masked expert's
    slice of every tensor, across the work items' expert shares (more experts than SPLIT, not a
    multiple of it, and fewer), and nothing else (the bytes after the tensors, an empty mask); bad
    masks and misaligned tensors are refused."""
    import numpy as np

    from kt_jit.kernels.fill import SPLIT, zero_slices
    from kt_jit.runtime.buffers import aligned_empty

    for experts in (3 * SPLIT + 5, 3):
        bufs = [aligned_empty((experts + 1, 16, 32), torch.bfloat16), aligned_empty((experts + 1, 48), torch.float32)]
        for t in bufs:
            t.fill_(1.0)
        tensors = [t[:experts] for t in bufs]  # (the row after them must stay untouched)
        zero_slices(np.zeros(experts, dtype=np.uint8), tensors)  # nothing masked: nothing written
        assert all((t == 1).all() for t in bufs)
        mask = np.random.default_rng(experts).random(experts) < 0.5
        mask[[0, experts - 1]] = True
        zero_slices(mask, tensors)
        for t in bufs:
            expect = torch.ones_like(t)
            expect[:experts][torch.from_numpy(mask)] = 0
            assert torch.equal(t, expect), experts
    with pytest.raises(ValueError, match="1-D bool or uint8"):
        zero_slices(mask.astype(np.int32), tensors)
    with pytest.raises(ValueError, match="1-D bool or uint8"):
        zero_slices(torch.from_numpy(mask), tensors)
    with pytest.raises(ValueError, match="expert slices"):
        zero_slices(mask[:-1], tensors)
    with pytest.raises(ValueError, match="multiples of 64"):
        zero_slices(mask, [aligned_empty((3, 8), torch.float32)])  # 32-byte slices
    with pytest.raises(ValueError, match="multiples of 64"):
        zero_slices(mask, [aligned_empty((3 * 16 + 1,), torch.float32)[1:].view(3, 16)])
