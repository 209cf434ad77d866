"""bertfast twins of transformers models: the same class and the same weights in bertfast modules.

Imports go config <- hub (checkpoint files) <- bert (modules) <- convert: hub never needs the
model classes, so no module of this package imports one that imports it back.
"""
from __future__ import annotations

from .bert import HEADS
from .config import BertConfig
from .hub import load_state


def from_hf(hf_model, **kwargs):
    """The bertfast twin of a transformers Bert* model: same class name, same weights."""
    name = type(hf_model).__name__
    if name not in HEADS:
        raise TypeError(f"from_hf: hf_model must be one of {sorted(HEADS)} from transformers, got {name}")
    cfg = hf_model.config.to_dict()
    config = BertConfig.from_dict({k: v for k, v in cfg.items() if not k.startswith("_")})
    model = HEADS[name](config)
    if getattr(getattr(hf_model, "bert", hf_model), "pooler", None) is None:  # e.g. add_pooling_layer=False
        getattr(model, "bert", model).pooler = None
    load_state(model, hf_model.state_dict(), strict=True, source=f"transformers {name}")
    p = next(hf_model.parameters())
    model.to(device=p.device, dtype=p.dtype)
    model.train(hf_model.training)
    return model
