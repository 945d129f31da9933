import pytest
import torch

from moe_serve.engine.sampler import make_generator, sample
from moe_serve.engine.sampling_params import SamplingParams


@pytest.mark.parametrize("kw, field", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(max_tokens=0), "max_tokens"), (dict(seed=-1), "seed"),
    (dict(n=0), "n"), (dict(n=True), "n"), (dict(stop=[""]), "stop"), (dict(stop_token_ids=[-3]), "stop_token_ids"),
    # not a list at all: these raised TypeError from list(), naming nothing
    (dict(stop=5), "stop"), (dict(stop_token_ids=12), "stop_token_ids"),
    # booleans are ints to Python, but True is no temperature, token count or seed
    (dict(temperature=True), "temperature"), (dict(max_tokens=True), "max_tokens"), (dict(seed=False), "seed"),
])
def test_impossible_params_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} must be"):
        SamplingParams(**kw)


def test_stop_forms():
    assert SamplingParams(stop="x").stop_list == ["x"]
    assert SamplingParams(stop=["a", "bc"]).stop_list == ["a", "bc"]
    with pytest.raises(ValueError, match="stop_token_ids must be < vocab size 10"):
        SamplingParams(stop_token_ids=[12]).check_vocab(10)


def _logits(S=4, V=50, seed=0):
    return torch.randn(S, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    x = _logits()
    assert sample(x, [SamplingParams(temperature=0)] * 4, [None] * 4) == x.argmax(-1).tolist()


def test_top_k_1_and_tiny_top_p_are_greedy():
    x = _logits()
    gens = [make_generator(i) for i in range(4)]
    assert sample(x, [SamplingParams(temperature=1.0, top_k=1)] * 4, gens) == x.argmax(-1).tolist()
    assert sample(x, [SamplingParams(temperature=1.0, top_p=1e-6)] * 4, gens) == x.argmax(-1).tolist()


def test_seeded_rows_do_not_depend_on_the_batch():
    x = _logits(S=3)
    p = SamplingParams(temperature=1.0, seed=7)
    alone = [sample(x[1:2], [p], [make_generator(7)])[0] for _ in range(1)]
    mixed = sample(x, [SamplingParams(temperature=0), p, SamplingParams(temperature=0.5)],
                   [None, make_generator(7), make_generator(3)])
    assert mixed[1] == alone[0]
    assert mixed[0] == int(x[0].argmax())


def test_top_k_restricts_the_support_and_follows_the_distribution():
    x = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    g = make_generator(0)
    draws = [sample(x, [SamplingParams(temperature=1.0, top_k=2)], [g])[0] for _ in range(2000)]
    assert set(draws) <= {0, 1}
    p0 = draws.count(0) / len(draws)
    expected = float(torch.softmax(torch.tensor([2.0, 1.0]), 0)[0])
    assert abs(p0 - expected) < 0.05


def test_top_p_keeps_the_smallest_set_reaching_p():
    x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = make_generator(1)
    draws = {sample(x, [SamplingParams(temperature=1.0, top_p=0.75)], [g])[0] for _ in range(500)}
    assert draws == {0, 1}


def test_top_k_beyond_the_vocabulary_keeps_every_token():
    """A top_k larger than the vocabulary means no cut, even past int64 (it used to overflow the
    sampler's tensor, and the exception stopped the server's engine for every request)."""
    x = _logits(S=2)
    for k in (51, 2**63 - 1, 2**63, 10**30):
        p = SamplingParams(temperature=1.0, top_k=k, seed=5)
        no_cut = SamplingParams(temperature=1.0, top_k=-1, seed=5)
        assert sample(x, [p, p], [make_generator(5), make_generator(6)]) == \
            sample(x, [no_cut, no_cut], [make_generator(5), make_generator(6)])


def test_top_p_below_float32_range_is_greedy():
    """top_p=1e-300 is valid (in (0, 1]) but is 0 in float32: every token was then cut, the empty
    distribution's search fell to its end, and the request sampled the *least* likely token."""
    x = _logits()
    gens = [make_generator(i) for i in range(4)]
    for top_p in (1e-300, 5e-324):
        assert sample(x, [SamplingParams(temperature=1.0, top_p=top_p)] * 4, gens) == x.argmax(-1).tolist()


def test_numpy_numbers_are_taken_as_pythons():
    """max_tokens = context - ids.size (np.int64), a temperature from np.float32, stop ids from an array:
    refused with 'max_tokens must be >= 1 (or None), got np.int64(5)', a limit the value meets. numpy's
    integers and reals are taken as Python's (prompts' token ids already were); bools stay refused."""
    import numpy as np

    p = SamplingParams(temperature=np.float32(0.5), top_p=np.float64(0.9), top_k=np.int64(5), max_tokens=np.int64(5),
                       seed=np.uint32(7), logprobs=np.int8(2), presence_penalty=np.float32(0.5),
                       repetition_penalty=np.float16(1.5), stop_token_ids=np.array([3, 4]))
    assert p == SamplingParams(temperature=0.5, top_p=0.9, top_k=5, max_tokens=5, seed=7, logprobs=2,
                               presence_penalty=0.5, repetition_penalty=1.5, stop_token_ids=[3, 4])
    assert [type(v) for v in (p.temperature, p.top_k, p.max_tokens, p.seed, p.stop_token_ids[0])] == [
        float, int, int, int, int]
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=np.int64(0))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=np.bool_(True))
