"""`bertfast.accelerate(model)`: the transformers and sentence-transformers models people already
run, with bertfast's encoder inside them, in place.

    model = SentenceTransformer("all-MiniLM-L6-v2")      # or AutoModel / BertFor* from transformers
    bertfast.accelerate(model)                             # same object back; encode, Trainer, .to() as before

Every transformers base encoder found in `model` (a BertModel itself, the `.bert` of a BertFor*
head, the model inside a SentenceTransformer's Transformer module, any nn.Module holding one)
gets a bertfast twin and an instance-level `forward` that runs it (Liger-Kernel's convention:
the module tree, the parameter names and the state dict are untouched; only what runs changes).

The twin owns nothing. It is built on the meta device and its leaf modules (every nn.Linear,
nn.Embedding and nn.LayerNorm) are then replaced by the transformers model's own, so the
parameters are the same tensors: an optimizer built before or after, `.to()`, `.half()`,
`load_state_dict`, DDP's gradient hooks and `save_pretrained` all act on what bertfast computes with.
The twin is kept out of the module tree (a plain attribute), so nothing sees it twice.

A call the twin cannot serve exactly goes to the transformers forward unchanged: inputs_embeds,
cross-attention inputs, a cache, attention weights (`output_attentions`), a selection of hidden
states, a 3-D/4-D attention mask, gradient checkpointing, or any other keyword it does not know
(e.g. the flash-attention varlen keys of a flattening collator). Results are the transformers
model's at every valid position; padded positions are zeros (transformers fills them with values
no caller should read), and the pooler reads each row's first valid token (position 0 under
right padding, which is what transformers reads). The heads stay transformers' own code, losses
included (its QA loss still lets padded positions into the span softmax, as transformers does;
bertfast's own BertForQuestionAnswering masks them).

ENCODERS maps a transformers `model_type` to its bertfast encoder (the BERT family, through
models.convert); another one plugs in with `register_encoder(model_type, build, output_class)`:
`build(hf_encoder)` returns an empty (meta) bertfast encoder whose module tree has the transformers
names and whose forward takes (input_ids, attention_mask, token_type_ids, position_ids,
output_hidden_states=...); `output_class` names the transformers.modeling_outputs class returned.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch
from torch import nn


@dataclass(frozen=True)
class EncoderSwap:
    """How to serve one transformers `model_type` with a bertfast encoder."""

    build: Callable[[nn.Module], nn.Module]  # hf encoder -> empty (meta) bertfast encoder of its config
    output_class: str  # the transformers.modeling_outputs class the transformers encoder returns


def _build_family(hf_encoder: nn.Module) -> nn.Module:
    """The bertfast encoder of the transformers encoder's model_type (models.convert): BertModel,
    RobertaModel, XLMRobertaModel, DistilBertModel, ElectraModel; without a pooler where it has none."""
    from .models.convert import BASE_MODELS, config_from_hf

    cfg = hf_encoder.config
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        raise ValueError(f"accelerate: a {type(hf_encoder).__name__} configured as a decoder (is_decoder / "
                         f"add_cross_attention) is not served; bertfast's encoder is bidirectional")
    with torch.device("meta"):
        twin = BASE_MODELS[cfg.model_type](config_from_hf(cfg))
    if getattr(twin, "pooler", None) is not None and getattr(hf_encoder, "pooler", None) is None:
        twin.pooler = None  # add_pooling_layer=False
    return twin


# transformers config.model_type -> bertfast encoder
ENCODERS: Dict[str, EncoderSwap] = {
    "bert": EncoderSwap(_build_family, "BaseModelOutputWithPoolingAndCrossAttentions"),
    "roberta": EncoderSwap(_build_family, "BaseModelOutputWithPoolingAndCrossAttentions"),
    "xlm-roberta": EncoderSwap(_build_family, "BaseModelOutputWithPoolingAndCrossAttentions"),
    "distilbert": EncoderSwap(_build_family, "BaseModelOutput"),
    "electra": EncoderSwap(_build_family, "BaseModelOutputWithPastAndCrossAttentions"),
}


def register_encoder(model_type: str, build: Callable[[nn.Module], nn.Module], output_class: str) -> None:
    """Serve transformers encoders of `model_type` with the bertfast encoder `build` returns."""
    ENCODERS[model_type] = EncoderSwap(build, output_class)


# ---- the twin -------------------------------------------------------------------------------


def _share_leaves(twin: nn.Module, hf: nn.Module) -> None:
    """Replace every module of `twin` that holds parameters by the module of `hf` at the same path."""
    for name, mod in list(twin.named_modules()):
        if not mod._parameters:
            continue
        try:
            src = hf.get_submodule(name)
        except AttributeError:
            raise TypeError(f"accelerate: the transformers {type(hf).__name__} has no module {name!r}, which "
                            f"bertfast's encoder reads; its module tree is not this model_type's") from None
        if not isinstance(src, type(mod)):
            raise TypeError(f"accelerate: {name} of the transformers model is a {type(src).__name__}, expected a "
                            f"{type(mod).__name__} (a quantised or otherwise replaced layer is not served)")
        for pname, p in mod._parameters.items():
            q = src._parameters.get(pname)
            if p is not None and (q is None or q.shape != p.shape):
                raise ValueError(f"accelerate: {name}.{pname} has shape {None if q is None else tuple(q.shape)} in the "
                                 f"transformers model, expected {tuple(p.shape)} from its config")
        parent, _, attr = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, attr, src)
    left = [n for n, p in twin.named_parameters() if p.is_meta]
    if left:
        raise TypeError(f"accelerate: parameters {left} of bertfast's encoder have no transformers counterpart")


@dataclass
class _Accelerated:
    """What an accelerated transformers encoder keeps (outside its module tree)."""

    twin: nn.Module
    own: List[nn.Module]  # the twin's container modules (their training flag follows the transformers model)
    output_class: type
    word_embeddings: torch.Tensor  # resize_token_embeddings replaces it or its rows: the twin is rebuilt then


def _twin_of(hf: nn.Module) -> _Accelerated:
    import transformers.modeling_outputs as outputs

    swap = ENCODERS[hf.config.model_type]
    twin = swap.build(hf)
    _share_leaves(twin, hf)
    shared = {id(m) for m in hf.modules()}
    own = [m for m in twin.modules() if id(m) not in shared]
    for m in own:
        m.training = hf.training
    return _Accelerated(twin, own, getattr(outputs, swap.output_class), hf.get_input_embeddings().weight)


# keyword arguments the twin serves; any other one with a value goes to the transformers forward
_SERVED = frozenset({"output_hidden_states", "return_dict", "output_attentions", "use_cache"})


def _hf_only(self, state: _Accelerated, input_ids, attention_mask, args, kwargs) -> bool:
    """True when this call needs the transformers forward (a feature the twin does not have)."""
    if args or input_ids is None:
        return True
    for k, v in kwargs.items():
        if v is not None and k not in _SERVED:
            return True
    if kwargs.get("output_attentions") or (kwargs.get("output_attentions") is None
                                           and getattr(self.config, "output_attentions", False)):
        return True
    hs = kwargs.get("output_hidden_states")
    if hs is not None and not isinstance(hs, bool):  # a selection of layers
        return True
    if attention_mask is not None and attention_mask.dim() != 2:
        return True
    return self.training and torch.is_grad_enabled() and _checkpointing(self)


def _checkpointing(module) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # the name of transformers 5, of 4
        if hasattr(type(module), name):
            return bool(getattr(module, name))
    return False


def _accelerated_forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                         *args, **kwargs):
    """Bound to each accelerated transformers encoder as its `forward`."""
    state: _Accelerated = self.__dict__["_bertfast"]
    if _hf_only(self, state, input_ids, attention_mask, args, kwargs):
        return type(self).forward(self, input_ids, attention_mask, token_type_ids, position_ids, *args, **kwargs)
    words = self.get_input_embeddings().weight
    if words is not state.word_embeddings or words.shape[0] != state.twin.config.vocab_size:
        state = self.__dict__["_bertfast"] = _twin_of(self)  # resized or replaced since: build again
    if state.own[0].training != self.training:
        for m in state.own:
            m.training = self.training
    hidden = kwargs.get("output_hidden_states")
    if hidden is None:
        hidden = bool(getattr(self.config, "output_hidden_states", False))
    out = state.twin(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states=hidden)
    fields = {"last_hidden_state": out.last_hidden_state, "hidden_states": out.hidden_states}
    if "pooler_output" in state.output_class.__dataclass_fields__:
        fields["pooler_output"] = out.pooler_output
    res = state.output_class(**fields)
    return_dict = kwargs.get("return_dict")
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    return res if return_dict else res.to_tuple()


# ---- the public entry points ------------------------------------------------------------------


def _encoders(model: nn.Module):
    """(served, unserved): the transformers base encoders inside `model`, by whether a twin exists."""
    served, unserved = [], []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is None or not hasattr(cfg, "model_type") or not hasattr(m, "base_model"):
            continue
        if m.base_model is not m:  # a head: its encoder is visited as its own module
            continue
        (served if cfg.model_type in ENCODERS else unserved).append(m)
    return served, unserved


def accelerate(model):
    """Run every transformers encoder inside `model` on bertfast's kernels, in place, and return `model`.

    `model`: a transformers model of the BERT family (Bert, Roberta, XLMRoberta, DistilBert, Electra:
    the base model or a head), a sentence_transformers SentenceTransformer
    (or CrossEncoder) whose transformer module holds one, or any nn.Module containing them. Parameters
    are shared, not copied. Calling it again rebuilds the twins (after replacing layers by hand)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate: model must be a torch.nn.Module (a transformers model or a "
                        f"SentenceTransformer), got {type(model).__name__}")
    served, unserved = _encoders(model)
    if not served:
        found = sorted({m.config.model_type for m in unserved})
        raise TypeError(f"accelerate: model must hold a transformers encoder of a served type ({sorted(ENCODERS)}); "
                        f"found {found or 'none'} in {type(model).__name__}")
    for hf in served:
        state = _twin_of(hf)  # errors before anything is changed
        object.__setattr__(hf, "_bertfast", state)  # a plain attribute: not a submodule, not in the state dict
        object.__setattr__(hf, "forward", types.MethodType(_accelerated_forward, hf))
    return model


def restore(model):
    """Undo `accelerate`: every encoder inside `model` runs its transformers forward again."""
    for m in model.modules():
        if "_bertfast" in m.__dict__:
            del m.__dict__["_bertfast"]
            m.__dict__.pop("forward", None)
    return model


def is_accelerated(module: nn.Module) -> bool:
    return "_bertfast" in module.__dict__
