"""`bertfast.accelerate(model)`: the transformers and sentence-transformers models people already
run, with bertfast's encoder inside them, in place.

    model = SentenceTransformer("all-MiniLM-L6-v2")      # or AutoModel / BertFor* from transformers
    bertfast.accelerate(model)                             # same object back; encode, Trainer, .to() as before

Every transformers base encoder found in `model` (a BertModel itself, the `.bert` of a BertFor*
head, the model inside a SentenceTransformer's Transformer module, any nn.Module holding one)
gets a bertfast twin and an instance-level `forward` that runs it (Liger-Kernel's convention:
the module tree, the parameter names and the state dict are untouched; only what runs changes).
That `forward` is an `AcceleratedForward`, a module-level class: the model pickles, deep-copies,
`torch.save`s and crosses into spawn-started worker processes (sentence-transformers' pools) as
any transformers model does, still accelerated on the other side. `inspect.signature` of it is the
transformers forward's (Trainer's column pruning and pipelines read it).

The twin owns nothing. It is built on the meta device and its leaf modules (every nn.Linear,
nn.Embedding and nn.LayerNorm) are then the transformers model's own, so the parameters are the
same tensors: an optimizer built before or after, `.to()`, `.half()`, `load_state_dict`, DDP's
gradient hooks and `save_pretrained` all act on what bertfast computes with. The twin is kept out
of the module tree (a plain attribute), so nothing sees it twice. A leaf replaced later (PEFT's
`get_peft_model` putting a LoRA layer at a projection, `resize_token_embeddings`) is followed: any
module registration anywhere bumps a counter (torch's global module-registration hook), and the
next forward re-reads the transformers model's modules when it moved. What sits at a projection
is called as a module when it is not a plain nn.Linear (a LoRA layer maps x to y); a replaced
embedding or LayerNorm cannot be served: the encoder then runs transformers' forward, with one
warning naming the layer.

Gradient checkpointing (`gradient_checkpointing_enable`) is served inside bertfast's encoder: each
twin layer runs under the checkpoint function transformers set on its layer (its use_reentrant
choice, its every_n_layers), for the duration of the call.

A call the twin cannot serve exactly goes to the transformers forward with the caller's arguments
as given (positions and keywords untouched, so every family's own signature holds):
inputs_embeds, cross-attention inputs, a cache, attention weights (`output_attentions`), a
selection of hidden states, a 3-D/4-D attention mask, or any other keyword it does not know
(e.g. the flash-attention varlen keys of a flattening collator). Configurations the fused ops
cannot compute (transformers' relative position embeddings, where its modeling code has them)
are handed back the same way, with one warning when accelerate() is called. `call_observers`
(callables taking the encoder and the reason, None when served) see every decision.

Padded positions. Results are the transformers model's at every valid position; at padded
positions every output (`last_hidden_state` and each of `hidden_states`, the embeddings' too) is
zero: the padding-free encoder never computes those rows (transformers computes them from the
pad token and the row's other tokens, values no caller should read). The pooler reads each row's
first valid token (position 0 under right padding, which is what transformers reads). The heads
stay transformers' own code, losses included (its QA loss still lets padded positions into the
span softmax, as transformers does; bertfast's own BertForQuestionAnswering masks them).

Why one file: the swap is one mechanism read top to bottom (which encoders, which layers can be
served, the twin kept in step with the live modules, which calls are served, the forward that
survives pickling); split, each part would need the others' private state to make sense.

ENCODERS maps a transformers `model_type` to its bertfast encoder (the BERT family, through
models.convert); another one plugs in with `register_encoder(model_type, build, output_class)`:
`build(hf_encoder)` returns an empty (meta) bertfast encoder whose module tree has the transformers
names and whose forward takes (input_ids, attention_mask, token_type_ids, position_ids,
output_hidden_states=...); `output_class` names the transformers.modeling_outputs class returned.
"""
from __future__ import annotations

import inspect
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import nn


@dataclass(frozen=True)
class EncoderSwap:
    """How to serve one transformers `model_type` with a bertfast encoder."""

    build: Callable[[nn.Module], nn.Module]  # hf encoder -> empty (meta) bertfast encoder of its config
    output_class: str  # the transformers.modeling_outputs class the transformers encoder returns


class Unserved(ValueError):
    """A transformers encoder (or a layer in it) that bertfast's encoder cannot compute exactly."""


# an activation the bertfast encoder lacks (one of transformers' ACT2FN) runs as transformers' own
# module between the fused ops; the twin is built with this one in its place first
_PLACEHOLDER_ACT = "relu"  # what the twin is built with before such an activation takes its place


def _build_family(hf_encoder: nn.Module) -> nn.Module:
    """The bertfast encoder of the transformers encoder's model_type (models.convert): BertModel,
    RobertaModel, XLMRobertaModel, DistilBertModel, ElectraModel; without a pooler where it has none."""
    from .models._engine import ACTS
    from .models.config import FUSED_ACTS
    from .models.convert import BASE_MODELS, config_from_hf

    cfg = hf_encoder.config
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        raise ValueError(f"accelerate: a {type(hf_encoder).__name__} configured as a decoder (is_decoder / "
                         f"add_cross_attention) is not served; bertfast's encoder is bidirectional")
    d = cfg.to_dict()
    kind = d.get("position_embedding_type", "absolute")
    if kind not in (None, "absolute"):
        if any(name.endswith("distance_embedding") for name, _ in hf_encoder.named_modules()):
            raise Unserved(f"position_embedding_type={kind!r} (transformers' relative position embeddings; the "
                           f"fused attention has no relative-position term)")
        d["position_embedding_type"] = "absolute"  # this transformers computes absolute positions whatever it says
    act = None
    for key in ("hidden_act", "activation"):  # DistilBERT's name is `activation`
        if key in d and not (isinstance(d[key], str) and (d[key] in FUSED_ACTS or d[key] in ACTS)):
            act = _transformers_activation(d[key])
            d[key] = _PLACEHOLDER_ACT
    try:
        with torch.device("meta"):
            twin = BASE_MODELS[cfg.model_type](config_from_hf(d))
    except ValueError as e:  # a field bertfast's config refuses
        raise Unserved(str(e)) from None
    if act is not None:
        for m in twin.modules():  # the encoder layers' activation (BertIntermediate, DistilBERT's FFN)
            if getattr(m, "act", None) == _PLACEHOLDER_ACT:
                object.__setattr__(m, "act", act)  # a plain attribute: transformers' module is not the twin's child
    if getattr(twin, "pooler", None) is not None and getattr(hf_encoder, "pooler", None) is None:
        twin.pooler = None  # add_pooling_layer=False
    return twin


def _transformers_activation(act):
    """transformers' activation for a config's hidden_act (a name of ACT2FN, or already a callable)."""
    if callable(act):
        return act
    from transformers.activations import ACT2FN

    try:
        return ACT2FN[act]
    except KeyError:
        raise Unserved(f"hidden_act={act!r} is not one of transformers' activations") from None


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


# observers of every accelerated call: f(encoder, reason), reason None when bertfast served it,
# else why transformers' forward ran (e.g. the peers' test harness counts them)
call_observers: List[Callable[[nn.Module, Optional[str]], None]] = []


# ---- following module replacements ----------------------------------------------------------
# torch calls a global module-registration hook on every `parent.name = module`; the count tells
# a forward in O(1) whether any module anywhere was replaced since its twin was last checked

_REGISTRATIONS = [0]
_HOOK = []


def _count_registration(module, name, submodule):
    _REGISTRATIONS[0] += 1


def _watch_registrations() -> None:
    if not _HOOK:
        _HOOK.append(nn.modules.module.register_module_module_registration_hook(_count_registration))


# ---- the twin -------------------------------------------------------------------------------


@dataclass
class _Site:
    """A place in the twin where a transformers leaf module sits."""

    path: str  # its name in both module trees
    parent: nn.Module  # the twin's module that holds it
    attr: str
    kind: type  # nn.Linear, nn.Embedding or nn.LayerNorm (what the twin's config built there)
    shapes: dict  # parameter name -> shape the config implies


# whether bertfast's encoder calls a projection that is not a plain nn.Linear as a module
_ENGINE_CALLS_PROJECTIONS = True


def _plain(module: nn.Module, kind: type) -> bool:
    """Exactly a `kind` with no hooks: its parameters can go straight into the fused ops."""
    return type(module) is kind and not (module._forward_hooks or module._forward_pre_hooks)


def _check_leaf(site: _Site, src) -> None:
    """Raise Unserved when the transformers module at `site` cannot be served there."""
    if src is None:
        raise Unserved(f"the transformers model has no module {site.path!r}, which bertfast's encoder reads")
    if site.kind is nn.Linear and not _plain(src, nn.Linear):
        if not (_ENGINE_CALLS_PROJECTIONS and isinstance(src, nn.Module)):
            raise Unserved(f"{site.path} is a {type(src).__name__}{'' if type(src) is not nn.Linear else ' with hooks'}"
                           f", not a plain nn.Linear")
        return  # a LoRA layer (or any x -> y module) at a projection: the encoder calls it
    if not isinstance(src, site.kind):
        raise Unserved(f"{site.path} of the transformers model is a {type(src).__name__}, expected a "
                       f"{site.kind.__name__} (the fused embedding and LayerNorm ops read its parameters)")
    if site.kind is not nn.Linear and not _plain(src, site.kind):
        raise Unserved(f"{site.path} is a {type(src).__name__} or has hooks; the fused ops would bypass them")
    for pname, shape in site.shapes.items():
        q = src._parameters.get(pname)
        if q is None or tuple(q.shape) != shape:
            raise Unserved(f"{site.path}.{pname} has shape {None if q is None else tuple(q.shape)} in the "
                           f"transformers model, expected {shape} from its config")


def _sites(twin: nn.Module) -> List[_Site]:
    out = []
    for name, mod in twin.named_modules():
        if mod._parameters:
            parent, _, attr = name.rpartition(".")
            out.append(_Site(name, twin.get_submodule(parent) if parent else twin, attr, type(mod),
                             {k: tuple(p.shape) for k, p in mod._parameters.items() if p is not None}))
    return out


def _submodule(hf: nn.Module, path: str):
    try:
        return hf.get_submodule(path)
    except AttributeError:
        return None


@dataclass
class _Accelerated:
    """What an accelerated transformers encoder keeps (outside its module tree)."""

    twin: Optional[nn.Module]  # None when nothing can be served (see `refusal`)
    own: List[nn.Module]  # the twin's container modules (their training flag follows the transformers model)
    output_class: Optional[type]
    word_embeddings: Optional[torch.Tensor]  # resize_token_embeddings replaces it or its rows: rebuild then
    sites: List[_Site] = field(default_factory=list)
    refusal: Optional[str] = None  # why every call goes to transformers (an unserved config or layer)
    registrations: int = -1  # _REGISTRATIONS when the sites were last checked
    layer_paths: List[str] = field(default_factory=list)  # of the twin's encoder layers
    names: tuple = ()  # the transformers forward's positional parameters, read when accelerated
    warned: set = field(default_factory=set)

    def __setstate__(self, state):  # another process counts its own registrations: check the sites again
        self.__dict__.update(state, registrations=-1)


def _output_class(hf: nn.Module, swap: EncoderSwap) -> type:
    """The ModelOutput class the transformers encoder returns: the one `swap` names, else (a
    release that renamed it) the one its forward is annotated to return. The name comes first
    because annotations can disagree with what a forward returns (transformers 5's ElectraModel
    is annotated BaseModelOutputWithCrossAttentions and returns the ...WithPast... class, whose
    `cache` its causal-LM head reads)."""
    import transformers.modeling_outputs as outputs
    from transformers.utils import ModelOutput

    named = getattr(outputs, swap.output_class, None)
    if named is not None:
        return named
    try:
        ret = typing.get_type_hints(type(hf).forward).get("return")
    except Exception:  # annotations a transformers release cannot resolve at run time
        ret = None
    for t in typing.get_args(ret) or (ret,):
        if isinstance(t, type) and issubclass(t, ModelOutput):
            return t
    raise Unserved(f"transformers has no output class {swap.output_class!r} and {type(hf).__name__}.forward "
                   "names none")


def _twin_of(hf: nn.Module) -> _Accelerated:
    swap = ENCODERS[hf.config.model_type]
    try:
        twin = swap.build(hf)
        output_class = _output_class(hf, swap)
    except Unserved as e:
        return _Accelerated(None, [], None, None, refusal=f"{type(hf).__name__}: {e}")
    sites = _sites(twin)
    state = _Accelerated(twin, [], output_class, hf.get_input_embeddings().weight, sites,
                         names=_signature(type(hf))[1])
    layers = {id(m): i for i, m in enumerate(twin.encoder.layer)}
    paths = {layers[id(m)]: name for name, m in twin.named_modules() if id(m) in layers}
    state.layer_paths = [paths[i] for i in range(len(layers))]
    _sync(hf, state)  # puts the transformers leaves in place (a position without one sets the refusal)
    shared = {id(m) for m in hf.modules()}
    state.own = [m for m in twin.modules() if id(m) not in shared]
    for m in state.own:
        m.training = hf.training
    return state


def _sync(hf: nn.Module, state: _Accelerated) -> None:
    """Put in the twin whatever module the transformers model now has at each leaf position; a
    module that cannot be served sets state.refusal (cleared once every position is servable)."""
    _watch_registrations()
    state.registrations = _REGISTRATIONS[0]
    refusal = None
    for site in state.sites:
        src = _submodule(hf, site.path)
        if site.parent._modules.get(site.attr) is src:
            continue
        try:
            _check_leaf(site, src)
        except Unserved as e:
            refusal = refusal or f"{type(hf).__name__}: {e}"
            continue
        site.parent._modules[site.attr] = src
    state.refusal = refusal


# keyword arguments the twin serves; any other one with a value goes to the transformers forward
_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
_FLAGS = frozenset({"output_hidden_states", "return_dict", "output_attentions", "use_cache"})

_SIGNATURES: Dict[Callable, tuple] = {}
_CLASS_NAMES: Dict[type, tuple] = {}


def _signature(cls: type) -> tuple:
    """(signature without self, names of the positional parameters) of cls.forward."""
    fn = cls.forward
    got = _SIGNATURES.get(fn)
    if got is None:
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())
        if params and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
            params = params[1:]  # self
        names = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        stand_in = not names and any(p.kind == p.VAR_POSITIONAL for p in params)
        got = _SIGNATURES[fn] = (sig.replace(parameters=params), names, stand_in)
    sig, names, stand_in = got
    if stand_in:
        # a (*args, **kwargs) stand-in put on the class (a spy): the names read before it, else
        # only input_ids (every transformers encoder's first parameter) is taken by position
        return sig, _CLASS_NAMES.get(cls, ("input_ids",))
    _CLASS_NAMES[cls] = names
    return sig, names


def _unserved_call(hf, names, args, kwargs) -> Optional[str]:
    """Why this call needs the transformers forward (None: the twin serves it)."""
    if len(args) > len(names):
        return "positional arguments beyond the signature"
    for i, name in enumerate(names[:len(args)]):
        if name in kwargs:
            return f"{name} given twice"
        if args[i] is not None and name not in _INPUTS:
            return name
    for k, v in kwargs.items():
        if v is not None and k not in _INPUTS and k not in _FLAGS:
            return k
        if k not in names and k in _INPUTS and v is not None:
            return k  # e.g. token_type_ids for DistilBERT, which has none
    call = dict(zip(names, args), **kwargs)
    if call.get("input_ids") is None:
        return "no input_ids"
    attn = call.get("output_attentions")
    if attn or (attn is None and getattr(hf.config, "output_attentions", False)):
        return "output_attentions"
    hs = call.get("output_hidden_states")
    if hs is not None and not isinstance(hs, bool) and _selection(hs) is None:
        return "output_hidden_states not a bool, an int or a list of ints"
    mask = call.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        return f"a {mask.dim()}-D attention_mask"
    return None


def _selection(hs) -> Optional[List[int]]:
    """The hidden-state indices `output_hidden_states` selects (transformers 5: an int or a list of
    ints; negative ones count from the end), None if it is none of those."""
    if isinstance(hs, int) and not isinstance(hs, bool):
        return [hs]
    if isinstance(hs, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in hs):
        return list(hs)
    return None


def _checkpointing(module) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # the name of transformers 5, of 4
        if hasattr(type(module), name):
            return bool(getattr(module, name))
    return False


def _set_checkpoints(hf: nn.Module, state: _Accelerated) -> None:
    """Give each twin layer the checkpoint function transformers set on its layer (the
    use_reentrant choice and every_n_layers of gradient_checkpointing_enable): transformers 5 sets
    it on every layer it checkpoints, transformers 4 on the encoder (then for all its layers)."""
    for i, layer in enumerate(state.twin.encoder.layer):
        path = state.layer_paths[i]
        src = _submodule(hf, path)
        owner = src if src is not None and hasattr(src, "gradient_checkpointing") else \
            _submodule(hf, path.rsplit(".", 2)[0])
        fn = getattr(owner, "_gradient_checkpointing_func", None) if getattr(owner, "gradient_checkpointing", False) \
            else None
        if fn is not None:
            layer.__dict__["checkpoint"] = fn


def _hand_back(hf, reason: str, args, kwargs):
    for observe in call_observers:
        observe(hf, reason)
    return type(hf).forward(hf, *args, **kwargs)


def _run(hf: nn.Module, args, kwargs):
    """One call of an accelerated transformers encoder."""
    state: Optional[_Accelerated] = hf.__dict__.get("_bertfast")
    if state is None:  # restored since, or a copy made without it
        return type(hf).forward(hf, *args, **kwargs)
    if state.registrations != _REGISTRATIONS[0] and state.twin is not None:
        _sync(hf, state)  # some module was replaced somewhere since: re-read this model's leaves
    if state.refusal is not None:
        if state.refusal not in state.warned:
            state.warned.add(state.refusal)
            warnings.warn(f"bertfast.accelerate: {state.refusal}; this encoder runs transformers' forward",
                          stacklevel=3)
        return _hand_back(hf, state.refusal, args, kwargs)
    names = state.names
    reason = _unserved_call(hf, names, args, kwargs)
    if reason is not None:
        return _hand_back(hf, reason, args, kwargs)
    call = dict(zip(names, args), **kwargs)
    words = hf.get_input_embeddings().weight
    if words is not state.word_embeddings or words.shape[0] != state.twin.config.vocab_size:
        precision = getattr(state.twin, "inference_precision", None)
        state = hf.__dict__["_bertfast"] = _twin_of(hf)  # resized or replaced since: build again
        if precision is not None and state.twin is not None:  # the rebuilt twin keeps the precision asked for
            state.twin.inference_precision = precision
        if state.refusal is not None:
            return _run(hf, args, kwargs)
    if state.own[0].training != hf.training:
        for m in state.own:
            m.training = hf.training
    hidden = call.get("output_hidden_states")
    if hidden is None:
        hidden = bool(getattr(hf.config, "output_hidden_states", False))
    selected = None if isinstance(hidden, bool) else _selection(hidden)
    for observe in call_observers:
        observe(hf, None)
    checkpointing = hf.training and torch.is_grad_enabled() and _checkpointing(hf)
    if checkpointing:
        _set_checkpoints(hf, state)
    try:
        out = state.twin(call.get("input_ids"), call.get("attention_mask"), call.get("token_type_ids"),
                         call.get("position_ids"), output_hidden_states=bool(hidden))
    finally:
        if checkpointing:  # the functions transformers made are not picklable: held for this call only
            for layer in state.twin.encoder.layer:
                layer.__dict__.pop("checkpoint", None)
    states = out.hidden_states
    if selected is not None:  # as transformers: every position of the tuple, None where not selected
        keep = {i % len(states) for i in selected}
        states = tuple(h if i in keep else None for i, h in enumerate(states))
    fields = {"last_hidden_state": out.last_hidden_state, "hidden_states": states}
    if "pooler_output" in state.output_class.__dataclass_fields__:
        fields["pooler_output"] = out.pooler_output
    res = state.output_class(**fields)
    return_dict = call.get("return_dict")
    if return_dict is None:
        return_dict = getattr(hf.config, "return_dict", True)
    return res if return_dict else res.to_tuple()


class AcceleratedForward:
    """The `forward` of an accelerated transformers encoder (an instance attribute). A module-level
    class, so pickle, deepcopy and torch.save carry it (a bound method of a function no class
    defines would not unpickle); its signature is the transformers forward's."""

    __slots__ = ("__self__",)

    def __init__(self, module: nn.Module):
        self.__self__ = module

    def __call__(self, *args, **kwargs):
        return _run(self.__self__, args, kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return _signature(type(self.__self__))[0]

    @property
    def __func__(self):
        return type(self.__self__).forward

    __name__ = "forward"

    def __reduce__(self):
        return AcceleratedForward, (self.__self__,)

    def __repr__(self):
        return f"<bertfast-accelerated forward of {type(self.__self__).__name__}>"


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


def accelerate(model, precision: Optional[str] = None):
    """Run every transformers encoder inside `model` on bertfast's kernels, in place, and return `model`.

    `model`: a transformers model of the BERT family (Bert, Roberta, XLMRoberta, DistilBert, Electra:
    the base model or a head), a sentence_transformers SentenceTransformer
    (or CrossEncoder) whose transformer module holds one, or any nn.Module containing them. Parameters
    are shared, not copied. An encoder whose configuration or layers the fused ops cannot compute
    keeps transformers' forward, with one warning (an error under BERTFAST_STRICT=1).
    precision: the encoders' CPU inference GEMMs, "fp32" (default), "bf16" or "int8" (see
    bertfast.models.precision; refused on a CPU without the instructions)."""
    if precision is not None:
        from .dispatch.cpu_gemm import check_precision

        check_precision(precision)
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate: model must be a torch.nn.Module (a transformers model or a "
                        f"SentenceTransformer), got {type(model).__name__}")
    served, unserved = _encoders(model)
    if not served:
        found = sorted({m.config.model_type for m in unserved})
        raise TypeError(f"accelerate: model must hold a transformers encoder of a served type ({sorted(ENCODERS)}); "
                        f"found {found or 'none'} in {type(model).__name__}")
    from .dispatch import strict

    states = [_twin_of(hf) for hf in served]  # errors before anything is changed
    for state in states:
        if state.refusal is not None:
            if strict():
                raise Unserved(f"accelerate: {state.refusal} [BERTFAST_STRICT=1]")
            state.warned.add(state.refusal)
            warnings.warn(f"bertfast.accelerate: {state.refusal}; this encoder runs transformers' forward",
                          stacklevel=2)
    for hf, state in zip(served, states):
        if precision is not None and state.twin is not None:
            from .models.precision import set_inference_precision

            set_inference_precision(state.twin, precision)
        object.__setattr__(hf, "_bertfast", state)  # a plain attribute: not a submodule, not in the state dict
        object.__setattr__(hf, "forward", AcceleratedForward(hf))
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
