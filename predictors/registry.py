"""Predictor names -> classes, and loading a saved predictor (safetensors + JSON header, no pickle)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from safetensors import safe_open

from predictors.base import FORMAT_VERSION, Predictor
from predictors.baselines import PopularityPredictor, PrevTokenPredictor, TransitionPredictor
from predictors.ensemble import EnsemblePredictor
from predictors.mlp import MLPPredictor
from predictors.online import OnlineMLPPredictor
from predictors.router import HiddenLinearPredictor, RouterPredictor
from predictors.sklearn_models import LogRegPredictor, SGDPredictor

REGISTRY: dict[str, type[Predictor]] = {
    cls.name: cls
    for cls in (
        PopularityPredictor, TransitionPredictor, PrevTokenPredictor, RouterPredictor, HiddenLinearPredictor,
        LogRegPredictor, SGDPredictor, MLPPredictor, OnlineMLPPredictor, EnsemblePredictor,
    )
}


def make_predictor(name: str, num_layers: int, num_experts: int, top_k: int, lookahead: int = 1, **params) -> Predictor:
    """A new, unfitted predictor; `params` are its own (`REGISTRY[name].accepted_params()`), any other key
    is a ValueError naming it and the accepted ones."""
    if name not in REGISTRY:
        raise ValueError(f"predictor must be one of {sorted(REGISTRY)}, got {name!r}")
    return REGISTRY[name](num_layers, num_experts, top_k, lookahead, **params)


def from_config(config: dict, arrays: dict) -> Predictor:
    """Rebuild a fitted predictor from its JSON config and arrays (used by load and by ensembles)."""
    if not isinstance(config, dict):  # a list or null (or an ensemble member's): config.get was an AttributeError
        raise TypeError(f"a JSON {type(config).__name__}, not an object")
    if int(config.get("format_version", -1)) != FORMAT_VERSION:
        raise ValueError(f"predictor file: format_version must be {FORMAT_VERSION}, got {config.get('format_version')}")
    params = dict(config.get("params", {}))
    if config["predictor"] in REGISTRY:
        # a file fitted before unknown parameters were refused may carry one: it was never read, so it
        # is dropped (with a warning) rather than making the file unloadable
        accepted = REGISTRY[config["predictor"]].accepted_params()
        ignored = sorted(k for k in params if k not in accepted)
        if ignored:
            warnings.warn(f"predictor file: {config['predictor']} does not take parameter(s) {ignored}, saved with "
                          f"it; they had no effect and are dropped", stacklevel=2)
            params = {k: v for k, v in params.items() if k in accepted}
    pred = make_predictor(
        config["predictor"], config["num_layers"], config["num_experts"], config["top_k"], config["lookahead"], **params,
    )
    pred.check_arrays(arrays)
    try:
        pred.load_arrays(arrays)
    except RuntimeError as exc:  # torch's load_state_dict: an array its net does not have
        raise ValueError(f"{pred.name}: its arrays do not load ({' '.join(str(exc).split())})") from exc
    return pred


def load_predictor(path: str | Path) -> Predictor:
    """Load what `Predictor.save` wrote. Safetensors holds only arrays and strings: no code runs."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"predictor file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors' own errors name neither the file nor what was expected
        raise ValueError(f"predictor file {path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    if "predictor" not in meta:
        raise ValueError(f"predictor file {path}: no 'predictor' JSON in the safetensors header")
    try:
        config = json.loads(meta["predictor"])
        return from_config(config, arrays)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"predictor file {path}: its 'predictor' header is not a predictor's config "
                         f"({type(exc).__name__}: {exc})") from exc
    except ValueError as exc:  # the config's values, or arrays that do not match it: which file?
        raise ValueError(f"predictor file {path}: {exc}") from exc
