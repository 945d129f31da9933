"""What one forward step needs to know: the seam between the engine and the model.

The engine flattens the step's sequences into one token list (N tokens, S sequences): decodes
contribute 1 token each, prefill chunks several. Each sequence owns one KV-cache slot.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ForwardBatch:
    token_ids: torch.Tensor  # long [N]: every sequence's new tokens, concatenated in sequence order
    positions: torch.Tensor  # long [N]: position of each token in its sequence
    slot_ids: list[int]  # [S]: KV-cache slot of each sequence
    query_lens: list[int]  # [S]: new tokens of each sequence in this step (1 for a decode)
    context_lens: list[int]  # [S]: tokens of each sequence already in the KV cache before this step
    seq_ids: list[int] = field(default_factory=list)  # [S]: engine sequence ids (for trace hooks)
    all_logits: bool = False  # return logits of every token [N, V] instead of each sequence's last [S, V]

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return len(self.slot_ids)

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens)

    @staticmethod
    def single(token_ids: list[int], slot: int = 0, context_len: int = 0, all_logits: bool = False) -> "ForwardBatch":
        """One sequence's chunk: handy for tests and references."""
        n = len(token_ids)
        return ForwardBatch(
            token_ids=torch.tensor(token_ids, dtype=torch.long),
            positions=torch.arange(context_len, context_len + n, dtype=torch.long),
            slot_ids=[slot],
            query_lens=[n],
            context_lens=[context_len],
            seq_ids=[slot],
            all_logits=all_logits,
        )
