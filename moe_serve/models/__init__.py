"""Model families, the lean MoE model and its loader."""
from moe_serve.models.batch import ForwardBatch
from moe_serve.models.checkpoint import CheckpointError
from moe_serve.models.loader import load_model
from moe_serve.models.model import MoEModel
from moe_serve.models.spec import ModelSpec, UnsupportedModelError

__all__ = ["CheckpointError", "ForwardBatch", "ModelSpec", "MoEModel", "UnsupportedModelError", "load_model"]
