"""The task heads' forward passes shared by the BERT family's members (RoBERTa, XLM-RoBERTa,
DistilBERT, ELECTRA).

A member's head class declares its modules under Hugging Face's names in __init__ and mixes in
one of these: the forward, the labels' checks and the losses are BERT's (bert.py), so every
member computes the loss HF computes. What differs is said by small methods: `_encode` (the
encoder call: DistilBERT has no token types), `predict` (the vocabulary logits of an MLM head),
`classify` (a sequence classifier's logits) and `span_logits` (an extractive-QA head's).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .bert import (MaskedLMOutput, QuestionAnsweringOutput, SequenceClassifierOutput, TokenClassifierOutput, _act,
                   _classifier_dropout, _mlm_logits, _valid_labels, sequence_classification_loss, span_outputs,
                   token_classification_loss)
from .config import FUSED_ACTS


def first_token(hidden: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """(batch, seq, hidden) -> (batch, hidden): each row's first valid token (<s> / [CLS]), also
    under left padding, where the encoder's padded positions are zeros (HF reads position 0)."""
    if attention_mask is None:
        return hidden[:, 0]
    first = (attention_mask != 0).int().argmax(1)
    return hidden.gather(1, first.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1]))[:, 0]


def activation(name: str):
    """HF's ACT2FN[name] for the names the heads use (the GELU flavours, relu, tanh, ...)."""
    if name in FUSED_ACTS:
        approximate = FUSED_ACTS[name]
        return lambda x: F.gelu(x, approximate=approximate)
    return _act(name)


class ClassificationHead(nn.Module):
    """dropout -> dense -> act -> dropout -> out_proj on each row's first token: RoBERTa's (tanh)
    and ELECTRA's (GELU) `classifier`."""

    def __init__(self, config, act):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(_classifier_dropout(config))
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)
        self.act = act

    def forward(self, first):
        return self.out_proj(self.dropout(self.act(self.dense(self.dropout(first)))))


class _FamilyHead:
    def _encode(self, input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states):
        encoder = getattr(self, self.base_model_prefix)
        return encoder(input_ids, attention_mask, token_type_ids=token_type_ids, position_ids=position_ids,
                       output_hidden_states=output_hidden_states)


class MaskedLMHead(_FamilyHead):
    """`predict(rows)` -> vocabulary logits. sparse_prediction=True with labels projects only the
    labelled positions (as BertForMaskedLM does): logits (labelled, vocab), same loss. Labels on
    padding are ignored.

    `tied_weights`: HF's _tied_weights_keys, target -> source state-dict names (the decoder shares
    the word embeddings), all of them off when config.tie_word_embeddings is False, as in HF. Tied
    targets are not saved and not missing when a checkpoint lacks them (hub.py reads tied_weight_keys)."""

    tied_weights: dict = {}

    def _ties(self) -> dict:
        return self.tied_weights if getattr(self.config, "tie_word_embeddings", True) else {}

    @property
    def tied_weight_keys(self):
        return tuple(self._ties())

    def tie_weights(self):
        for target, source in self._ties().items():
            module, _, name = target.rpartition(".")
            setattr(self.get_submodule(module), name, self.get_parameter(source))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=False, sparse_prediction=False):
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        logits, lab = _mlm_logits(self.predict, out, _valid_labels(labels, attention_mask), sparse_prediction)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, self.config.vocab_size).float(), lab.reshape(-1))
        return MaskedLMOutput(loss, logits, out.hidden_states)


class SequenceClassificationHead(_FamilyHead):
    """`classify(last_hidden_state, attention_mask)` -> (batch, num_labels) logits: by default
    `classifier` on each row's first valid token."""

    def classify(self, hidden, attention_mask):
        return self.classifier(first_token(hidden, attention_mask))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=False):
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        logits = self.classify(out.last_hidden_state, attention_mask)
        loss = None if labels is None else sequence_classification_loss(self.config, logits, labels)
        return SequenceClassifierOutput(loss, logits, out.hidden_states)


class TokenClassificationHead(_FamilyHead):
    """classifier(dropout(each token)), as in every member."""

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=False):
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        logits = self.classifier(self.dropout(out.last_hidden_state))
        loss = None
        if labels is not None:
            loss = token_classification_loss(logits, labels, self.config.num_labels, attention_mask)
        return TokenClassifierOutput(loss, logits, out.hidden_states)


class QuestionAnsweringHead(_FamilyHead):
    """qa_outputs(each token) -> start and end logits (padded positions at the dtype's lowest value,
    as in BertForQuestionAnswering); `span_logits` is overridden where a member adds dropout first
    (DistilBERT)."""

    def span_logits(self, hidden):
        return self.qa_outputs(hidden)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, start_positions=None,
                end_positions=None, output_hidden_states=False):
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        start_logits, end_logits, loss = span_outputs(self.span_logits(out.last_hidden_state), attention_mask,
                                                      start_positions, end_positions)
        return QuestionAnsweringOutput(loss, start_logits, end_logits, out.hidden_states)
