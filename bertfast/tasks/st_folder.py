"""What a sentence-transformers folder asks of embed, read from its files as
SentenceTransformer.encode reads them (modules.json; the Transformer module's
sentence_bert_config.json: max_seq_length; the Pooling module's config.json: its mode; a
Normalize module: unit vectors). Plain JSON: nothing here imports torch."""
from __future__ import annotations

import json
import os
from typing import Optional

# the Pooling config's legacy switches, in sentence-transformers' order
_LEGACY_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                 "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                 "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
POOLINGS = ("mean", "cls", "max")  # what embed computes


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg})") from None
    if not isinstance(obj, (dict, list)):
        raise ValueError(f"{path} must hold a JSON object or list")
    return obj


def _pooling_mode(path: str) -> str:
    cfg = _read_json(path)
    mode = cfg.get("pooling_mode")
    if mode is None:
        modes = [m for k, m in _LEGACY_MODES.items() if cfg.get(k)] or ["mean"]
    else:
        modes = [mode] if isinstance(mode, str) else list(mode)
    if len(modes) != 1 or modes[0] not in POOLINGS:
        raise ValueError(f"{path} asks for pooling {' + '.join(map(str, modes))}; bertfast embed computes mean, cls "
                         f"or max pooling (give --pooling to choose one)")
    return modes[0]


def st_settings(folder: str) -> Optional[dict]:
    """{'pooling', 'normalize', 'max_length' (None when the folder names none), 'modules'} of a
    sentence-transformers folder; None when `folder` has no modules.json. A module other than
    Transformer, Pooling and Normalize (Dense, ...) is refused: embed would not compute it."""
    path = os.path.join(folder, "modules.json")
    if not os.path.isfile(path):
        return None
    modules = _read_json(path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ValueError(f"{path} must be a list of module objects")
    out = {"pooling": None, "normalize": False, "max_length": None, "modules": []}
    for m in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        sub = os.path.join(folder, m.get("path") or "")
        out["modules"].append(kind)
        if kind == "Transformer":
            if os.path.abspath(sub) != os.path.abspath(folder):
                raise ValueError(f"{path}: the Transformer module lives in {m.get('path')!r}; give that folder as "
                                 f"--model")
            for name in ("sentence_bert_config.json", "sentence_roberta_config.json",
                         "sentence_distilbert_config.json"):
                if os.path.isfile(os.path.join(folder, name)):
                    out["max_length"] = _read_json(os.path.join(folder, name)).get("max_seq_length")
                    break
        elif kind == "Pooling":
            out["pooling"] = _pooling_mode(os.path.join(sub, "config.json"))
        elif kind == "Normalize":
            out["normalize"] = True
        else:
            raise ValueError(f"{path} lists a {m.get('type')} module, which bertfast embed does not compute "
                             f"(it follows Transformer, Pooling and Normalize); its vectors would differ from "
                             f"SentenceTransformer.encode")
    if out["max_length"] is not None and (not isinstance(out["max_length"], int) or out["max_length"] < 3):
        raise ValueError(f"{folder}: max_seq_length must be an int >= 3, got {out['max_length']!r}")
    return out
