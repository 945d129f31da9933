"""Fitting or loading a predictor leaves torch's global random generator where it was: a library call
must not reseed the caller's random stream (an mlp's init seeded it to its own seed, 0 by default)."""
import torch

from predictors.registry import load_predictor, make_predictor
from tests.predictors.synth import layer_map_trace


def _draws_after(action) -> torch.Tensor:
    torch.manual_seed(123)
    torch.rand(2)
    action()
    return torch.rand(4)


def test_fit_and_load_leave_the_global_rng_alone(tmp_path):
    trace = layer_map_trace(tokens=120, L=3, E=8, K=2, seqs=3)
    want = _draws_after(lambda: None)
    path = tmp_path / "p.safetensors"
    for name in ("mlp", "mlp_online"):
        pred = make_predictor(name, 3, 8, 2, 1, epochs=1, dim=8)
        assert torch.equal(_draws_after(lambda: pred.fit([trace])), want), f"{name}.fit reseeded torch's global RNG"
        pred.save(path)
        assert torch.equal(_draws_after(lambda: load_predictor(path)), want), f"loading {name} reseeded torch's global RNG"


def test_fit_is_the_same_whatever_the_global_rng():
    trace = layer_map_trace(tokens=120, L=3, E=8, K=2, seqs=3)
    fits = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        fits.append(make_predictor("mlp", 3, 8, 2, 1, epochs=1, dim=8).fit([trace]).arrays())
    assert all(torch.equal(fits[0][k], fits[1][k]) for k in fits[0])
