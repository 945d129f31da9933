import pytest

from tests.engine.tiny_checkpoint import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Mixtral checkpoint (fp32) with a trained byte-level BPE tokenizer."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_mixtral"))


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_qwen3"), family="qwen3_moe", num_experts=8, top_k=2)
