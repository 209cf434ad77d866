"""Every head and loss: BERT's heads (Hugging Face's names and losses) and the task heads' forward
passes the BERT family's members (RoBERTa, XLM-RoBERTa, DistilBERT, ELECTRA) share.

A BERT head holds `bert` (a BertModel) and its own modules; its loss is the one HF computes given
labels. A family member's head class declares its modules under Hugging Face's names in __init__
and mixes in one of the family heads at the end of this file: the forward, the labels' checks and
the losses are BERT's, so every member computes the loss HF computes. What differs is said by small
methods: `encode` (the encoder call: DistilBERT has no token types), `predict` (the vocabulary
logits of an MLM head), `classify` (a sequence classifier's logits) and `span_logits` (an
extractive-QA head's).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ._engine import activation_fn, can_sync
from .bert import BertModel, BertPreTrainedModel
from .config import FUSED_ACTS, BertConfig
from .outputs import (BertForPreTrainingOutput, BertModelOutput, MaskedLMOutput, QuestionAnsweringOutput,
                      SequenceClassifierOutput, TokenClassifierOutput)

# --------------------------------------------------------------------------------------
# BERT's heads


def dense_act_layernorm(hidden, dense: nn.Linear, act: str, norm: nn.LayerNorm):
    """LayerNorm(act(dense(hidden))), the MLM heads' transform: one fused op after the GEMM for GELU."""
    if act in FUSED_ACTS:
        return ops.gelu_layernorm(F.linear(hidden, dense.weight), dense.bias, norm.weight, norm.bias, norm.eps,
                                  FUSED_ACTS[act])
    return norm(activation_fn(act)(dense(hidden)))


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.act = config.hidden_act
        activation_fn(config.hidden_act)

    def forward(self, hidden):
        return dense_act_layernorm(hidden, self.dense, self.act, self.LayerNorm)


def tie_mlm_decoder(model) -> None:
    """Share a BERT MLM head's decoder with the word embeddings (and its bias with the head's)."""
    head = model.cls.predictions
    head.decoder.weight = model.bert.embeddings.word_embeddings.weight
    head.decoder.bias = head.bias


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, hidden):
        return self.decoder(self.transform(hidden))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, hidden):
        return self.predictions(hidden)


class BertOnlyNSPHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.seq_relationship = nn.Linear(config.hidden_size, 2)

    def forward(self, pooled):
        return self.seq_relationship(pooled)


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


def _valid_labels(labels: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor]):
    """Token labels with padded positions set to the ignore index (-100): a label on a padded
    position would make a row's loss depend on how much padding its batch has."""
    if labels is None or attention_mask is None or tuple(labels.shape) != tuple(attention_mask.shape):
        return labels
    return labels.masked_fill(attention_mask == 0, -100)


def _mlm_logits(predict, out: BertModelOutput, labels: Optional[torch.Tensor], sparse: bool):
    """Vocabulary logits. With sparse=True and labels, only the labelled positions are projected
    (total_labelled, vocab): the decoder GEMM is most of an MLM step and ~85% of positions carry
    no label."""
    if sparse and labels is not None:
        sel = (labels.reshape(-1) != -100).nonzero().squeeze(-1)
        rows = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1]).index_select(0, sel)
        return predict(rows), labels.reshape(-1).index_select(0, sel)
    return predict(out.last_hidden_state), labels


class BertForPreTraining(BertPreTrainedModel):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config)
        self.init_weights()

    def tie_weights(self):
        tie_mlm_decoder(self)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                next_sentence_label=None, output_hidden_states=False, sparse_prediction=False, cu_seqlens=None,
                masked_positions=None, masked_labels=None):
        """HF's BertForPreTraining forward; with cu_seqlens (a packed batch of
        bertfast.data.pack_pretraining: no attention_mask) it is forward_packed's, with max_seqlen
        the row width (so DDP, which only wraps forward, serves packed batches too)."""
        if cu_seqlens is not None:
            if attention_mask is not None:
                raise ValueError("attention_mask must be None with cu_seqlens (packed pairs carry no padding)")
            return self.forward_packed(input_ids, cu_seqlens, int(input_ids.shape[-1]), token_type_ids, position_ids,
                                       masked_positions, masked_labels, labels, next_sentence_label)
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        logits, lab = _mlm_logits(self.cls.predictions, out, _valid_labels(labels, attention_mask), sparse_prediction)
        nsp = self.cls.seq_relationship(out.pooler_output)
        loss = None
        if labels is not None and next_sentence_label is not None:
            loss = (F.cross_entropy(logits.reshape(-1, self.config.vocab_size).float(), lab.reshape(-1))
                    + F.cross_entropy(nsp.reshape(-1, 2).float(), next_sentence_label.reshape(-1)))
        return BertForPreTrainingOutput(loss, logits, nsp, out.hidden_states)

    def forward_packed(self, input_ids, cu_seqlens, max_seqlen: int, token_type_ids=None, position_ids=None,
                       masked_positions=None, masked_labels=None, labels=None, next_sentence_label=None):
        """Packed pre-training (several NSP pairs per row of a fixed token budget): input_ids
        (total,) or (rows, budget) flattened, int32 cu_seqlens over the flat tokens with one
        sequence per pair (filler and zero-length sequences allowed), position_ids restarting per
        pair (the default). NSP logits are read at each sequence's first token ([CLS]):
        seq_relationship_logits (n, 2), next_sentence_label (n,) with -100 for sequences that are
        not pairs. MLM: either masked_positions (m,) flat token indices with masked_labels (m,)
        (-100 on padding entries: a fixed m keeps every shape static, for CUDA graphs), or labels
        with one entry per token (-100 where not masked; every position is projected).
        loss = mean MLM cross entropy over the labelled tokens + mean NSP cross entropy over the
        labelled sequences: the loss of the same pairs run unpacked."""
        ids = input_ids.reshape(-1)
        out = self.bert.forward_packed(ids, cu_seqlens, max_seqlen, token_type_ids, position_ids)
        hidden = out.last_hidden_state
        if masked_positions is not None:
            if masked_labels is None or masked_labels.shape != masked_positions.shape:
                raise ValueError("masked_labels must be given with masked_positions, one label per position")
            logits, lab = self.cls.predictions(hidden.index_select(0, masked_positions.reshape(-1))), masked_labels
        else:
            logits, lab = self.cls.predictions(hidden), labels
        nsp = self.cls.seq_relationship(out.pooler_output)
        loss = None
        if lab is not None and next_sentence_label is not None:
            loss = (F.cross_entropy(logits.float(), lab.reshape(-1))
                    + F.cross_entropy(nsp.float(), next_sentence_label.reshape(-1)))
        return BertForPreTrainingOutput(loss, logits, nsp, out.hidden_states)


class BertForMaskedLM(BertPreTrainedModel):
    # a pre-training checkpoint's pooler and NSP head are expected to go unused (HF drops them silently too)
    _keys_to_ignore_on_load_unexpected = ("bert.pooler.", "cls.seq_relationship.")

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.init_weights()

    def tie_weights(self):
        tie_mlm_decoder(self)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=False, sparse_prediction=False):
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        logits, lab = _mlm_logits(self.cls.predictions, out, _valid_labels(labels, attention_mask), sparse_prediction)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, self.config.vocab_size).float(), lab.reshape(-1))
        return MaskedLMOutput(loss, logits, out.hidden_states)


class BertForNextSentencePrediction(BertPreTrainedModel):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = BertOnlyNSPHead(config)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=False):
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        logits = self.cls(out.pooler_output)
        loss = None if labels is None else F.cross_entropy(logits.reshape(-1, 2).float(), labels.reshape(-1))
        return SequenceClassifierOutput(loss, logits, out.hidden_states)


def _checked_labels(name: str, labels: torch.Tensor, n: int, what: str) -> torch.Tensor:
    """Flat class labels, each in [0, n) or the ignore index -100; a clear error otherwise (a GPU
    cross entropy would only hit a device-side assert)."""
    lab = labels.reshape(-1)
    if can_sync():
        bad = (lab != -100) & ((lab < 0) | (lab >= n))
        if bool(bad.any()):
            raise ValueError(f"{name} must be in [0, {n}) ({what}) or -100, got {lab[bad][0].item()}")
    return lab


def classifier_dropout(config: BertConfig) -> float:
    return config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob


def sequence_classification_loss(config: BertConfig, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """HF's loss of a sequence classifier: config.problem_type, else regression (MSE) for one label,
    single-label cross entropy for integer labels, multi-label BCE with logits otherwise."""
    num_labels = config.num_labels
    problem = config.problem_type
    if problem is None:
        if num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        return F.mse_loss(logits.squeeze().float(), labels.squeeze().float()) if num_labels == 1 \
            else F.mse_loss(logits.float(), labels.float())
    if problem == "single_label_classification":
        lab = _checked_labels("labels", labels, num_labels, "num_labels")
        return F.cross_entropy(logits.reshape(-1, num_labels).float(), lab)
    if problem == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    raise ValueError(f"config.problem_type must be regression, single_label_classification or "
                     f"multi_label_classification, got {problem!r}")


def token_classification_loss(logits: torch.Tensor, labels: torch.Tensor, num_labels: int,
                              attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross entropy over the labelled tokens; labels on padding are ignored (_valid_labels)."""
    lab = _checked_labels("labels", _valid_labels(labels, attention_mask), num_labels, "num_labels")
    return F.cross_entropy(logits.reshape(-1, num_labels).float(), lab)


def _span_labels(positions: torch.Tensor, padded: Optional[torch.Tensor], S: int) -> torch.Tensor:
    """Start or end positions (batch,) clamped to [0, S] as HF does, S (the ignore index) also for a
    position on padding: such a label would point at a token that is not there."""
    pos = positions.reshape(-1).clamp(0, S)
    if padded is None:
        return pos
    on_pad = padded.gather(1, pos.clamp(max=S - 1).view(-1, 1)).view(-1)
    return pos.masked_fill(on_pad, S)


def span_outputs(logits: torch.Tensor, attention_mask=None, start_positions=None, end_positions=None):
    """(start_logits, end_logits, loss) of an extractive-QA head from its (batch, seq, 2) logits.
    Padded positions never compete for the span, in the loss or in an argmax: their logits are the
    dtype's lowest value and a label on padding is ignored. The loss (mean of the start and end
    cross entropies) only when both positions are given."""
    start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
    padded = None if attention_mask is None else attention_mask == 0
    if padded is not None:
        lowest = torch.finfo(start_logits.dtype).min
        start_logits, end_logits = start_logits.masked_fill(padded, lowest), end_logits.masked_fill(padded, lowest)
    loss = None
    if start_positions is not None and end_positions is not None:
        S = start_logits.size(1)  # positions outside the sequence, or on padding, are ignored
        sp, ep = (_span_labels(p, padded, S) for p in (start_positions, end_positions))
        loss = (F.cross_entropy(start_logits.float(), sp, ignore_index=S)
                + F.cross_entropy(end_logits.float(), ep, ignore_index=S)) / 2
    return start_logits, end_logits, loss


class BertForSequenceClassification(BertPreTrainedModel):
    """Sentence (or sentence-pair) classification on the pooled [CLS]: single-label (cross
    entropy), multi-label (BCE with logits) or regression (MSE), chosen as HF does from
    config.problem_type, else from num_labels and the labels' dtype."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config)
        self.dropout = nn.Dropout(classifier_dropout(config))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=False):
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        logits = self.classifier(self.dropout(out.pooler_output))
        loss = None if labels is None else sequence_classification_loss(self.config, logits, labels)
        return SequenceClassifierOutput(loss, logits, out.hidden_states)


class BertForTokenClassification(BertPreTrainedModel):
    """Token labels from a linear layer over each token (HF's head), or, with config.use_crf,
    a linear-chain CRF over those scores: the loss is then the CRF's negative log-likelihood of
    the labelled positions of each row (labels != -100, e.g. the first piece of each word), and
    `decode` gives the Viterbi tags (config.crf_constraints = "bio": never an invalid BIO
    transition)."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = nn.Dropout(classifier_dropout(config))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.crf = None
        if getattr(config, "use_crf", False):
            from .crf import CRF, bio_constraints

            kind = getattr(config, "crf_constraints", None)
            if kind not in (None, "bio"):
                raise ValueError(f"BertConfig.crf_constraints must be None or 'bio', got {kind!r}")
            if kind == "bio" and not config.id2label:
                raise ValueError("BertConfig.crf_constraints='bio' needs config.id2label (the BIO label names)")
            self.crf = CRF(config.num_labels, bio_constraints(config.id2label) if kind == "bio" else None)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=False):
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        logits = self.classifier(self.dropout(out.last_hidden_state))
        loss = None
        if labels is not None and self.crf is not None:
            lab = _checked_labels("labels", _valid_labels(labels, attention_mask), self.num_labels, "num_labels")
            lab = lab.view(labels.shape)
            loss = self.crf.nll(logits, lab.clamp_min(0), lab != -100)
        elif labels is not None:
            loss = token_classification_loss(logits, labels, self.num_labels, attention_mask)
        return TokenClassifierOutput(loss, logits, out.hidden_states)

    def decode(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, S) tag ids at the positions `mask` marks (-100 elsewhere): Viterbi with a CRF,
        else the argmax of each position."""
        if self.crf is not None:
            return self.crf.decode(logits, mask)
        return logits.argmax(-1).masked_fill(~mask.bool(), -100)



class BertForQuestionAnswering(BertPreTrainedModel):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, start_positions=None,
                end_positions=None, output_hidden_states=False):
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        start_logits, end_logits, loss = span_outputs(self.qa_outputs(out.last_hidden_state), attention_mask,
                                                      start_positions, end_positions)
        return QuestionAnsweringOutput(loss, start_logits, end_logits, out.hidden_states)




HEADS = {cls.__name__: cls for cls in (BertModel, BertForPreTraining, BertForMaskedLM, BertForNextSentencePrediction,
                                       BertForSequenceClassification, BertForTokenClassification,
                                       BertForQuestionAnswering)}


# --------------------------------------------------------------------------------------
# the family's heads


def replaced_token_loss(logits: torch.Tensor, labels: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """ELECTRA's discriminator loss (HF's): BCE with logits of one logit per token against labels
    1 = replaced, 0 = original, over the attended tokens only when a mask is given."""
    if attention_mask is not None:
        active = attention_mask.reshape(logits.shape) == 1
        return F.binary_cross_entropy_with_logits(logits[active].float(), labels[active].float())
    return F.binary_cross_entropy_with_logits(logits.float(), labels.reshape(logits.shape).float())


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
    return activation_fn(name)


class ClassificationHead(nn.Module):
    """dropout -> dense -> act -> dropout -> out_proj on each row's first token: RoBERTa's (tanh)
    and ELECTRA's (GELU) `classifier`."""

    def __init__(self, config, act):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(classifier_dropout(config))
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)
        self.act = act

    def forward(self, first):
        return self.out_proj(self.dropout(self.act(self.dense(self.dropout(first)))))


class FamilyHead:
    """The encoder call of a family member's head (its `base_model_prefix` attribute); a member
    without token types (DistilBERT) rejects them in its encoder's forward."""

    def encode(self, input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states):
        encoder = getattr(self, self.base_model_prefix)
        return encoder(input_ids, attention_mask, token_type_ids=token_type_ids, position_ids=position_ids,
                       output_hidden_states=output_hidden_states)


class MaskedLMHead(FamilyHead):
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
        out = self.encode(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        logits, lab = _mlm_logits(self.predict, out, _valid_labels(labels, attention_mask), sparse_prediction)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, self.config.vocab_size).float(), lab.reshape(-1))
        return MaskedLMOutput(loss, logits, out.hidden_states)


class SequenceClassificationHead(FamilyHead):
    """`classify(last_hidden_state, attention_mask)` -> (batch, num_labels) logits: by default
    `classifier` on each row's first valid token."""

    def classify(self, hidden, attention_mask):
        return self.classifier(first_token(hidden, attention_mask))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=False):
        out = self.encode(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        logits = self.classify(out.last_hidden_state, attention_mask)
        loss = None if labels is None else sequence_classification_loss(self.config, logits, labels)
        return SequenceClassifierOutput(loss, logits, out.hidden_states)


class TokenClassificationHead(FamilyHead):
    """classifier(dropout(each token)), as in every member."""

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=False):
        out = self.encode(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        logits = self.classifier(self.dropout(out.last_hidden_state))
        loss = None
        if labels is not None:
            loss = token_classification_loss(logits, labels, self.config.num_labels, attention_mask)
        return TokenClassifierOutput(loss, logits, out.hidden_states)


class QuestionAnsweringHead(FamilyHead):
    """qa_outputs(each token) -> start and end logits (padded positions at the dtype's lowest value,
    as in BertForQuestionAnswering); `span_logits` is overridden where a member adds dropout first
    (DistilBERT)."""

    def span_logits(self, hidden):
        return self.qa_outputs(hidden)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, start_positions=None,
                end_positions=None, output_hidden_states=False):
        out = self.encode(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        start_logits, end_logits, loss = span_outputs(self.span_logits(out.last_hidden_state), attention_mask,
                                                      start_positions, end_positions)
        return QuestionAnsweringOutput(loss, start_logits, end_logits, out.hidden_states)
