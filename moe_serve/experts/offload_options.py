"""The offloading store's string options, checked when it is built (each error names its config field)."""
from __future__ import annotations


def check_options(*, host: str, cpu_experts: str, learning: str, prefetch_when: str, admit: str,
                  admit_window: int) -> None:
    if host not in ("copy", "mmap"):
        raise ValueError(f"expert_cache.host_memory must be copy or mmap, got {host!r}")
    if cpu_experts not in ("auto", "on", "off"):
        raise ValueError(f"expert_cache.cpu_experts must be auto, on or off, got {cpu_experts!r}")
    if learning not in ("background", "inline"):
        raise ValueError(f"expert_cache.predictor_learning must be background or inline, got {learning!r}")
    if prefetch_when not in ("always", "idle"):
        raise ValueError(f"expert_cache.prefetch_when must be always or idle, got {prefetch_when!r}")
    if admit not in ("auto", "always", "reuse") or admit_window < 1:
        raise ValueError(f"OffloadExpertStore: admit must be auto, always or reuse (got {admit!r}) and "
                         f"admit_window >= 1 token (got {admit_window})")
