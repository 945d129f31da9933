"""Expert weights: the store interface and the resident store (see store.py for the contract)."""
from moe_serve.experts.store import (ExpertSource, ExpertStore, ResidentExpertStore, expert_forward,
                                     resident_store_factory)

__all__ = ["ExpertSource", "ExpertStore", "ResidentExpertStore", "expert_forward", "resident_store_factory"]
