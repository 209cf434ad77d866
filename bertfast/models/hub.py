"""Checkpoint folders in Hugging Face's format: config.json + model.safetensors (or
pytorch_model.bin), loaded and written so that `transformers` reads ours and we read theirs."""
from __future__ import annotations

import os
import re
import warnings
from typing import Optional

import torch

from .config import BertConfig

WEIGHTS_SAFE = "model.safetensors"
WEIGHTS_BIN = "pytorch_model.bin"

# Keys a checkpoint may carry that are buffers, not weights (recomputed here).
_IGNORED = re.compile(r"(^|\.)embeddings\.position_ids$|(^|\.)embeddings\.token_type_ids$")


def read_state_dict(folder: str) -> dict:
    """The raw tensors of a checkpoint folder (safetensors preferred)."""
    safe, binf = os.path.join(folder, WEIGHTS_SAFE), os.path.join(folder, WEIGHTS_BIN)
    if os.path.isfile(safe):
        from safetensors.torch import load_file

        try:
            return load_file(safe)
        except Exception as e:  # noqa: BLE001 - safetensors' errors do not say which file
            raise ValueError(f"{safe}: not a readable safetensors file (truncated or damaged?): "
                             f"{type(e).__name__}: {e}") from None
    if os.path.isfile(binf):
        try:
            return torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - name the file; weights_only refuses pickled code
            raise ValueError(f"{binf}: not a readable weights-only PyTorch file (truncated, damaged or holding "
                             f"code?): {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    raise FileNotFoundError(f"no {WEIGHTS_SAFE} or {WEIGHTS_BIN} in {folder!r}")


def _rename_legacy(key: str) -> str:
    """Old TF-converted checkpoints name LayerNorm parameters gamma/beta."""
    if key.endswith(".gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith(".beta"):
        return key[: -len("beta")] + "bias"
    return key


def convert_state_dict(state: dict, model: torch.nn.Module) -> dict:
    """Map checkpoint keys onto `model`'s names: legacy gamma/beta, and the encoder's prefix
    (`bert.`, `roberta.`, ... : model.base_model_prefix) that head checkpoints carry and bare
    encoder checkpoints don't (either direction)."""
    own = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "bert") + "."
    has_prefix = any(k.startswith(prefix) for k in own)
    out = {}
    for key, value in state.items():
        key = _rename_legacy(key)
        if _IGNORED.search(key):
            continue
        if has_prefix and not key.startswith(prefix) and prefix + key in own:
            key = prefix + key
        elif not has_prefix and key.startswith(prefix):
            key = key[len(prefix):]
        out[key] = value
    return out


def load_state(model: torch.nn.Module, state: dict, *, strict: bool = False, source: str = "checkpoint"):
    """Load converted tensors into `model`; report (and warn about) missing and unexpected keys
    instead of silently keeping freshly initialised weights. Returns (missing, unexpected)."""
    state = convert_state_dict(state, model)
    own = model.state_dict()
    tied = set(getattr(model, "tied_weight_keys", ()))
    heads = tuple(h + "." for h in getattr(model, "pretraining_heads", ()) if not hasattr(model, h))
    for key, value in state.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise ValueError(f"{source}: {key} has shape {tuple(value.shape)} but the model expects "
                             f"{tuple(own[key].shape)} (does config.json match the weights?)")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in tied]
    ignorable = heads + tuple(getattr(model, "_keys_to_ignore_on_load_unexpected", ()))
    unexpected = [k for k in result.unexpected_keys if not k.startswith(ignorable)]
    dropped_heads = [k for k in result.unexpected_keys if k not in unexpected]
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if strict and (missing or unexpected):
        raise RuntimeError(f"{source}: missing keys {missing}, unexpected keys {unexpected}")
    if missing:
        warnings.warn(f"{source}: {len(missing)} weights of {type(model).__name__} were not in the checkpoint and "
                      f"are freshly initialised (train them before use): {missing}", stacklevel=3)
    if unexpected:
        warnings.warn(f"{source}: {len(unexpected)} checkpoint weights were not used by {type(model).__name__}: "
                      f"{unexpected}", stacklevel=3)
    del dropped_heads  # pre-training heads dropped when loading into a bare encoder, as HF does silently
    return missing, unexpected


def load_pretrained(cls, folder: str, config: Optional[BertConfig] = None, *, strict: bool = False,
                    output_loading_info: bool = False, dtype: Optional[torch.dtype] = None,
                    device=None, **config_overrides):
    from .._io import recover_folder

    recover_folder(folder)  # a save cut between its two renames left the previous version aside
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"from_pretrained: {folder!r} is not a folder (expected config.json + "
                                f"{WEIGHTS_SAFE} or {WEIGHTS_BIN}); nothing is downloaded")
    if config is None:
        config_class = getattr(cls, "config_class", BertConfig)  # RobertaConfig for RobertaModel, ...
        cfg = config_class.from_pretrained(folder).to_dict()
        cfg.update(config_overrides)
        config = config_class.from_dict(cfg)
    model = cls(config)
    missing, unexpected = load_state(model, read_state_dict(folder), strict=strict, source=folder)
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    model.eval()
    if output_loading_info:
        return model, {"missing_keys": missing, "unexpected_keys": unexpected}
    return model


def save_pretrained(model, folder: str, tokenizer=None) -> None:
    """config.json + model.safetensors (+ the tokenizer's files when one is given); tied tensors
    (the MLM decoder) are stored once, as transformers does, and re-tied on load.

    All-or-nothing: the whole folder is written beside `folder` and swapped in (bertfast._io.
    atomic_folder), so a failed or killed save never leaves new label names beside old weights;
    other files already in `folder` are kept, a stale pytorch_model.bin is not."""
    from .._io import atomic_folder, save_safetensors

    state = model.state_dict()
    for key in getattr(model, "tied_weight_keys", ()):
        state.pop(key, None)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_folder(folder, replaces=(WEIGHTS_BIN,)) as tmp:
        model.config.save_pretrained(tmp, architecture=type(model).__name__)
        save_safetensors(tensors, os.path.join(tmp, WEIGHTS_SAFE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.write_files(tmp)
