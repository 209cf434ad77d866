"""bertfast twins of transformers models, and the BERT family's registry: Hugging Face `model_type`s
and class names -> bertfast's.

    MODEL_TYPES["roberta"]          -> RobertaConfig
    CLASSES["RobertaForMaskedLM"]   -> bertfast's RobertaForMaskedLM (same name, same module tree)
    BASE_MODELS["electra"]          -> ElectraModel (the bare encoder of each model_type)
    model_class(hf_model_or_name)   -> the bertfast class, or a TypeError naming what is supported
    config_from_hf(hf_config)       -> the bertfast config of the same model_type
    from_hf(hf_model)               -> the bertfast twin: same weights, device, dtype, train/eval mode
    from_pretrained(folder)         -> a checkpoint folder loaded as the class its config.json names

Imports go config <- hub (checkpoint files) <- _engine (execution) <- bert (modules) <- heads <-
roberta/distilbert/electra <- convert: hub never needs the model classes, so no module of this package
imports one that imports it back.
"""
from __future__ import annotations

import json
import os

from . import distilbert, electra, heads, roberta
from .config import BertConfig
from .distilbert import DistilBertConfig
from .electra import ElectraConfig
from .hub import load_state
from .roberta import RobertaConfig, XLMRobertaConfig

MODEL_TYPES = {cfg.model_type: cfg for cfg in (BertConfig, RobertaConfig, XLMRobertaConfig, DistilBertConfig,
                                               ElectraConfig)}
CLASSES = {**heads.HEADS, **roberta.HEADS, **distilbert.HEADS, **electra.HEADS}
# the bare encoder of each model_type (what a checkpoint loads as when its config names no head)
BASE_MODELS = {cls.config_class.model_type: cls for cls in CLASSES.values() if cls.__name__.endswith("Model")}


def model_class(hf):
    """The bertfast class for a transformers model (instance or class) or a class name."""
    name = hf if isinstance(hf, str) else (hf.__name__ if isinstance(hf, type) else type(hf).__name__)
    if name not in CLASSES:
        raise TypeError(f"hf_model must be one of {sorted(CLASSES)} from transformers, got {name}")
    return CLASSES[name]


def config_from_hf(hf_config) -> BertConfig:
    """A transformers config (or its to_dict()) as the bertfast config of its model_type."""
    d = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    model_type = d.get("model_type", "bert")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"config model_type must be one of {sorted(MODEL_TYPES)}, got {model_type!r}")
    return MODEL_TYPES[model_type].from_dict({k: v for k, v in d.items() if not k.startswith("_")})


def from_hf(hf_model):
    """The bertfast twin of a transformers model of the BERT family: same class name, same weights
    (loaded strictly: every tensor must find its place), same device, dtype and train/eval mode."""
    cls = model_class(hf_model)
    model = cls(config_from_hf(hf_model.config))
    hf_base = getattr(hf_model, getattr(hf_model, "base_model_prefix", ""), hf_model)
    base = getattr(model, model.base_model_prefix, model)
    if getattr(hf_base, "pooler", None) is None and getattr(base, "pooler", None) is not None:
        base.pooler = None  # built with add_pooling_layer=False
    load_state(model, hf_model.state_dict(), strict=True, source=f"transformers {type(hf_model).__name__}")
    p = next(hf_model.parameters())
    model.to(device=p.device, dtype=p.dtype)
    model.train(hf_model.training)
    return model


def from_pretrained(folder: str, **kwargs):
    """Load a checkpoint folder as the class its config.json names (architectures[0]), else as the
    bare encoder of its model_type; kwargs go to that class's from_pretrained."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {folder!r}")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    arch = (cfg.get("architectures") or [None])[0]
    if arch in CLASSES:
        return CLASSES[arch].from_pretrained(folder, **kwargs)
    model_type = cfg.get("model_type", "bert")
    if model_type not in BASE_MODELS:
        raise ValueError(f"{path}: model_type must be one of {sorted(BASE_MODELS)}, got {model_type!r}")
    return BASE_MODELS[model_type].from_pretrained(folder, **kwargs)
