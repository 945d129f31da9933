"""`attention.sdpa`: torch's attention without cuDNN's kernel on CUDA (a plan built per new sequence
length, ~40 ms each on an H100), and the batch-1 dispatch ordered on the host on a GPU."""
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from moe_serve.models.attention import sdpa
from moe_serve.models.moe import LocalDispatcher, MoERuntime

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_sdpa_on_cpu_is_torchs_call():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 16, generator=g), torch.randn(1, 2, 9, 16, generator=g),
               torch.randn(1, 2, 9, 16, generator=g))
    mask = (torch.arange(9) < 7)[None]  # [1, S]: broadcast over query rows
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    assert torch.equal(sdpa(q, k, v, attn_mask=mask, scale=0.3), want)


@cuda
@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_on_cuda_skips_cudnn_and_restores_the_switch(masked):
    dev = torch.device("cuda")
    g = torch.Generator(dev).manual_seed(0)
    q = torch.randn(1, 8, 4, 128, generator=g, device=dev, dtype=torch.bfloat16)  # decode: G query rows per KV head
    k, v = (torch.randn(1, 8, 37, 128, generator=g, device=dev, dtype=torch.bfloat16) for _ in range(2))
    mask = (torch.arange(37, device=dev) < 30)[None] if masked else None
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        out = sdpa(q, k, v, attn_mask=mask, scale=0.1)
        torch.cuda.synchronize()
    names = " ".join(e.key for e in prof.key_averages()).lower()
    assert "cudnn" not in names and "attention" in names
    assert torch.backends.cuda.cudnn_sdp_enabled()  # the process-wide switch is back
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=0.1)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    with pytest.raises(RuntimeError):
        sdpa(q, k[..., :64], v, scale=0.1)  # a failing call restores it too
    assert torch.backends.cuda.cudnn_sdp_enabled()


class _Store:
    def __init__(self, counts_on_host):
        self.counts_on_host = counts_on_host


@cuda
def test_one_token_is_ordered_on_the_host_on_cuda_when_the_store_reads_counts_there():
    """Same bits as the device path (sort, bincount, gather, scatter), with the counts as a host list."""
    dev = torch.device("cuda")
    g = torch.Generator(dev).manual_seed(0)
    x = torch.randn(1, 64, generator=g, device=dev, dtype=torch.bfloat16)
    ids = torch.tensor([[5, 1, 3]], device=dev)
    w = torch.rand(1, 3, generator=g, device=dev)
    on_host = LocalDispatcher(MoERuntime(store=_Store(True)))
    on_device = LocalDispatcher(MoERuntime(store=_Store(False)))
    xs_h, counts_h, state_h = on_host.dispatch(x, ids, w, 8)
    xs_d, counts_d, state_d = on_device.dispatch(x, ids, w, 8)
    assert counts_h == counts_d.tolist() == [0, 1, 0, 1, 0, 1, 0, 0]
    assert torch.equal(xs_h, xs_d)
    y_sorted = torch.randn(3, 64, generator=g, device=dev, dtype=torch.bfloat16)  # rows in expert order
    assert torch.equal(on_host.combine(y_sorted, state_h, x.dtype), on_device.combine(y_sorted, state_d, x.dtype))
