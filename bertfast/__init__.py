"""bertfast: BERT with fused kernels on every hot path.

`import bertfast` is cheap: it never touches CUDA, compiles nothing and does not import
triton; models, ops and the tokenizer load on first attribute access.
"""
from __future__ import annotations

from ._lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "BertConfig": "bertfast.models",
    "BertModel": "bertfast.models",
    "BertForPreTraining": "bertfast.models",
    "BertForMaskedLM": "bertfast.models",
    "BertForNextSentencePrediction": "bertfast.models",
    "BertForSequenceClassification": "bertfast.models",
    "BertForTokenClassification": "bertfast.models",
    "BertForQuestionAnswering": "bertfast.models",
    "from_hf": "bertfast.models",
    "accelerate": "bertfast.hf_accelerate",
    # the BERT family on the same encoder (bertfast.models.convert maps HF names to these)
    "RobertaConfig": "bertfast.models",
    "RobertaModel": "bertfast.models",
    "RobertaForMaskedLM": "bertfast.models",
    "RobertaForSequenceClassification": "bertfast.models",
    "RobertaForTokenClassification": "bertfast.models",
    "RobertaForQuestionAnswering": "bertfast.models",
    "XLMRobertaConfig": "bertfast.models",
    "XLMRobertaModel": "bertfast.models",
    "XLMRobertaForMaskedLM": "bertfast.models",
    "XLMRobertaForSequenceClassification": "bertfast.models",
    "XLMRobertaForTokenClassification": "bertfast.models",
    "XLMRobertaForQuestionAnswering": "bertfast.models",
    "DistilBertConfig": "bertfast.models",
    "DistilBertModel": "bertfast.models",
    "DistilBertForMaskedLM": "bertfast.models",
    "DistilBertForSequenceClassification": "bertfast.models",
    "DistilBertForTokenClassification": "bertfast.models",
    "DistilBertForQuestionAnswering": "bertfast.models",
    "ElectraConfig": "bertfast.models",
    "ElectraModel": "bertfast.models",
    "ElectraForPreTraining": "bertfast.models",
    "ElectraForMaskedLM": "bertfast.models",
    "ElectraForSequenceClassification": "bertfast.models",
    "ElectraForTokenClassification": "bertfast.models",
    "ElectraForQuestionAnswering": "bertfast.models",
    "Tokenizer": "bertfast.tokenizer",
    "use_backend": "bertfast.dispatch",
    "info": "bertfast._info",
    "ops": "bertfast.ops",
    "padding": "bertfast.padding",
    "GraphedEncoder": "bertfast.graphs",
    "graphs": "bertfast.graphs",
}

__all__ = sorted(_LAZY) + ["__version__"]


__getattr__, _ = lazy_exports(__name__, _LAZY)


def __dir__():
    return __all__
