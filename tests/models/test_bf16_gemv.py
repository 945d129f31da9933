"""The AVX-512 bf16 GEMV kernel (models/bf16_gemv.py) against a float64 reference."""
import pytest
import torch

from moe_serve.models import bf16_gemv

pytestmark = pytest.mark.skipif(not bf16_gemv.available(), reason="bf16 GEMV kernel unavailable here "
                                "(needs an AVX-512 CPU and a C++ compiler)")


@pytest.mark.parametrize("experts,rows_out,width,rows", [(8, 64, 96, 2), (3, 13, 37, 5), (1, 5, 16, 1), (2, 4, 7, 3)])
def test_rows_gemv_matches_a_float64_reference(experts, rows_out, width, rows):
    """Odd sizes too: output rows not a multiple of the 4 sharing a load of x, widths not a multiple
    of 16 (the scalar tail); any expert per row, repeats included."""
    g = torch.Generator().manual_seed(rows_out * width)
    w = torch.randn(experts, rows_out, width, generator=g).bfloat16()
    ids = torch.randint(0, experts, (rows,), generator=g)
    x = torch.randn(rows, width, generator=g)
    want = torch.einsum("roi,ri->ro", w[ids].double(), x.double())
    got = bf16_gemv.rows_gemv(w, ids, x)
    assert got.dtype == torch.float32 and got.shape == (rows, rows_out)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("counts,rows_out,width", [([4, 3, 5, 0, 2], 10, 40), ([1], 7, 16), ([0, 9], 4, 33)])
def test_grouped_gemm_matches_a_float64_reference(counts, rows_out, width):
    """Rows grouped by expert, some experts with none; groups that are not a multiple of the 4 rows of
    x a tile takes, output rows not a multiple of 4, widths not a multiple of 16."""
    g = torch.Generator().manual_seed(len(counts) * width)
    w = torch.randn(len(counts), rows_out, width, generator=g).bfloat16()
    x = torch.randn(sum(counts), width, generator=g)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    want = torch.einsum("moi,mi->mo", w[ids].double(), x.double())
    got = bf16_gemv.grouped_gemm(w, x, offsets)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    with pytest.raises(RuntimeError, match="offsets"):
        bf16_gemv.grouped_gemm(w, x, offsets.flip(0))


def test_rows_gemv_refuses_what_it_cannot_read():
    w = torch.zeros(2, 4, 16, dtype=torch.bfloat16)
    x = torch.zeros(1, 16)
    with pytest.raises(RuntimeError, match="not in"):
        bf16_gemv.rows_gemv(w, torch.tensor([2]), x)  # no expert 2
    with pytest.raises(RuntimeError, match="bf16"):
        bf16_gemv.rows_gemv(w.float(), torch.tensor([0]), x)
    with pytest.raises(RuntimeError, match="x: contiguous fp32"):
        bf16_gemv.rows_gemv(w, torch.tensor([0]), torch.zeros(1, 8))
