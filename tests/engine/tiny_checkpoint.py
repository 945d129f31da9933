"""Tiny random Hugging Face MoE checkpoints with a real byte-level BPE tokenizer, for engine tests.

The weights come from transformers' own random init (saved with `save_pretrained`), the tokenizer
is trained with `tokenizers` on a few sentences, so text prompts, detokenization and stop strings
run on the real code paths. The init is wider than the default (initializer_range) so the logits
of the random model are peaked: greedy decoding then has no near-ties that would make batch-size-
dependent rounding flip a token.
"""
from __future__ import annotations

from pathlib import Path

import torch

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture-of-experts models route every token to a few experts.",
    "Once upon a time there was a small model that served requests.",
    "def add(a, b):\n    return a + b\n",
    "Continuous batching lets new requests join a running batch.",
    "Héllo wörld, naïve café: unicode text ✓ 日本語 too.",
]


def train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 20, trainer=trainer)
    return tok


def make_tiny_checkpoint(out: Path, family: str = "mixtral", vocab_size: int = 384, dtype=torch.float32,
                         num_layers: int = 2, num_experts: int = 4, top_k: int = 2, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(vocab_size)
    tok.save(str(out / "tokenizer.json"))
    common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3,
                  eos_token_id=tok.token_to_id("<|endoftext|>"), bos_token_id=None, tie_word_embeddings=False)
    if family == "mixtral":
        cfg = MixtralConfig(intermediate_size=96, num_local_experts=num_experts, num_experts_per_tok=top_k, **common)
    elif family == "qwen3_moe":
        cfg = Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=48, num_experts=num_experts,
                             num_experts_per_tok=top_k, head_dim=16, norm_topk_prob=True, **common)
    else:
        raise ValueError(f"family must be mixtral or qwen3_moe, got {family!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    model.save_pretrained(out)
    return out
