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


def test_rows_gemv_refuses_what_it_cannot_read():
    w = torch.zeros(2, 4, 16, dtype=torch.bfloat16)
    x = torch.zeros(1, 16)
    with pytest.raises(RuntimeError, match="not in"):
        bf16_gemv.rows_gemv(w, torch.tensor([2]), x)  # no expert 2
    with pytest.raises(RuntimeError, match="bf16"):
        bf16_gemv.rows_gemv(w.float(), torch.tensor([0]), x)
    with pytest.raises(RuntimeError, match="x: contiguous fp32"):
        bf16_gemv.rows_gemv(w, torch.tensor([0]), torch.zeros(1, 8))
