"""BertConfig: Hugging Face's field names, so a checkpoint's config.json loads as it is."""
from __future__ import annotations

import copy
import json
import math
import os
from typing import Any, Optional

_DEFAULTS = dict(
    vocab_size=30522,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    max_position_embeddings=512,
    type_vocab_size=2,
    initializer_range=0.02,
    layer_norm_eps=1e-12,
    pad_token_id=0,
    position_embedding_type="absolute",
    classifier_dropout=None,
    num_labels=2,
    problem_type=None,
    id2label=None,
    label2id=None,
)

# Preset sizes: BERT-base/large as published; tiny/mini for quick pre-training runs.
PRESETS = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}

# GELU flavours the fused ops serve: HF's names -> the ops' `approximate` argument.
FUSED_ACTS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}


class BertConfig:
    """Configuration of a BERT model. Unknown keys of a config.json are kept and written back."""

    model_type = "bert"

    def __init__(self, **kwargs: Any):
        for k, v in _DEFAULTS.items():
            setattr(self, k, kwargs.pop(k, v))
        self.architectures = kwargs.pop("architectures", None)
        kwargs.pop("model_type", None)
        # an unknown key is kept as an attribute, so it must not shadow what the class defines
        # (a "to_dict": 1 in config.json would break saving, a "head_dim" the head size)
        shadowing = sorted(k for k in kwargs if hasattr(type(self), k) or k == "_extra")
        if shadowing:
            raise ValueError(f"{type(self).__name__}: keys {shadowing} are names of the class's own methods or "
                             f"properties and cannot be config fields")
        self._extra = kwargs
        for k, v in kwargs.items():
            setattr(self, k, v)
        self._normalise_labels()
        self.validate()

    def _normalise_labels(self):
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
            if "num_labels" not in self._extra:
                self.num_labels = len(self.id2label)
        if self.label2id is not None:
            self.label2id = {k: int(v) for k, v in self.label2id.items()}

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "num_hidden_layers" else 1):
                raise ValueError(f"{type(self).__name__}.{name} must be a positive int, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"{type(self).__name__}.hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_attention_heads ({self.num_attention_heads})")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < eps < math.inf:
            raise ValueError(f"{type(self).__name__}.layer_norm_eps must be a positive finite float, got {eps!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            v = getattr(self, name)
            if v is None and name == "classifier_dropout":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise ValueError(f"{type(self).__name__}.{name} must be a float in [0, 1), got {v!r}")
        r = self.initializer_range
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not r >= 0.0 or r == float("inf"):
            raise ValueError(f"{type(self).__name__}.initializer_range must be a finite float >= 0, got {r!r}")
        if isinstance(self.num_labels, bool) or not isinstance(self.num_labels, int) or self.num_labels < 1:
            raise ValueError(f"{type(self).__name__}.num_labels must be a positive int, got {self.num_labels!r}")
        pad = self.pad_token_id
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < self.vocab_size):
            raise ValueError(f"{type(self).__name__}.pad_token_id must be None or an int in [0, vocab_size = "
                             f"{self.vocab_size}), got {pad!r}")
        if not isinstance(self.hidden_act, str):
            raise ValueError(f"{type(self).__name__}.hidden_act must be a string, got {self.hidden_act!r}")
        if self.position_embedding_type != "absolute":
            raise ValueError(f"{type(self).__name__}.position_embedding_type must be 'absolute' (the only kind "
                             f"bertfast implements), got {self.position_embedding_type!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def longest_sequence(self) -> int:
        """The most tokens one sequence may hold with the model's own positions: one position row
        per token here (a family that offsets its positions says less: RoBERTa)."""
        return self.max_position_embeddings

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "BertConfig":
        if name not in PRESETS:
            raise ValueError(f"preset name must be one of {sorted(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def base(cls, **overrides: Any) -> "BertConfig":
        return cls.preset("base", **overrides)

    @classmethod
    def large(cls, **overrides: Any) -> "BertConfig":
        return cls.preset("large", **overrides)

    @classmethod
    def from_dict(cls, d: dict) -> "BertConfig":
        if not isinstance(d, dict):
            raise TypeError(f"a BertConfig is read from a JSON object (a dict), got {type(d).__name__}")
        d = dict(d)
        if d.get("model_type", cls.model_type) != cls.model_type:  # the BERT family's configs are subclasses
            raise ValueError(f"config model_type must be {cls.model_type!r} for {cls.__name__}, got "
                             f"{d.get('model_type')!r}")
        return cls(**d)

    @classmethod
    def from_json_file(cls, path: str) -> "BertConfig":
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a config must be a JSON object, got a JSON {type(d).__name__}")
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{path}: {e}") from None

    @classmethod
    def from_pretrained(cls, folder: str) -> "BertConfig":
        path = os.path.join(folder, "config.json") if os.path.isdir(folder) else folder
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json in {folder!r}")
        return cls.from_json_file(path)

    def to_dict(self) -> dict:
        d = {k: copy.deepcopy(getattr(self, k)) for k in _DEFAULTS}
        d.update({k: copy.deepcopy(getattr(self, k)) for k in self._extra})
        if d["id2label"] is not None:
            d["id2label"] = {str(k): v for k, v in d["id2label"].items()}
        if self.architectures:
            d["architectures"] = list(self.architectures)
        d["model_type"] = self.model_type
        return d

    def save_pretrained(self, folder: str, architecture: Optional[str] = None) -> None:
        from .._io import write_json

        d = self.to_dict()
        if architecture:
            d["architectures"] = [architecture]
        write_json(os.path.join(folder, "config.json"), d, indent=2, sort_keys=True)

    def __eq__(self, other) -> bool:
        return isinstance(other, BertConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        return "BertConfig(" + ", ".join(f"{k}={getattr(self, k)}" for k in keys) + ")"
