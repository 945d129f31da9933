"""The AVX-512 bf16 kernel (models/bf16_gemv.py) against a float64 reference."""
import pytest
import torch

from moe_serve.models import bf16_gemv

pytestmark = pytest.mark.skipif(not bf16_gemv.available(), reason="bf16 GEMV kernel unavailable here "
                                "(needs an AVX-512 CPU and a C++ compiler)")


@pytest.mark.parametrize("counts,rows_out,width", [([4, 3, 5, 0, 2], 10, 40), ([1], 7, 16), ([0, 9], 4, 33),
                                                   ([1, 0, 1], 64, 96), ([2], 5, 7)])
def test_grouped_gemm_matches_a_float64_reference(counts, rows_out, width):
    """Rows grouped by expert, some experts with none, one row each (a batch-1 decode); groups that are
    not a multiple of the 4 rows of x a tile takes, output rows not a multiple of the 4 weight rows,
    widths not a multiple of 16 (the scalar tail)."""
    g = torch.Generator().manual_seed(len(counts) * width)
    w = torch.randn(len(counts), rows_out, width, generator=g).bfloat16()
    x = torch.randn(sum(counts), width, generator=g)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    want = torch.einsum("moi,mi->mo", w[ids].double(), x.double())
    got = bf16_gemv.grouped_gemm(w, x, offsets)
    assert got.dtype == torch.float32 and got.shape == (sum(counts), rows_out)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_grouped_gemm_refuses_what_it_cannot_read():
    w = torch.zeros(2, 4, 16, dtype=torch.bfloat16)
    x = torch.zeros(3, 16)
    with pytest.raises(RuntimeError, match="offsets: from 0 to the rows of x"):
        bf16_gemv.grouped_gemm(w, x, torch.tensor([0, 1, 2]))  # 2 rows of 3
    with pytest.raises(RuntimeError, match="offsets: not ascending at expert 1"):
        bf16_gemv.grouped_gemm(w, x, torch.tensor([0, 4, 3]))
    with pytest.raises(RuntimeError, match="offsets: long"):
        bf16_gemv.grouped_gemm(w, x, torch.tensor([0, 3]))  # E + 1 = 3 entries
    with pytest.raises(RuntimeError, match="w: contiguous bf16"):
        bf16_gemv.grouped_gemm(w.float(), x, torch.tensor([0, 1, 3]))
    with pytest.raises(RuntimeError, match=r"x: fp32 \[M, I\]"):
        bf16_gemv.grouped_gemm(w, torch.zeros(3, 8), torch.tensor([0, 1, 3]))
