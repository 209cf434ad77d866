"""RoBERTa and XLM-RoBERTa on BERT's fused, padding-free encoder, with Hugging Face's names.

What differs from BERT:
- position ids count the non-padding tokens from padding_idx + 1 (HF's
  create_position_ids_from_input_ids), so 512 tokens need max_position_embeddings = 514;
- one token type in the published checkpoints (type_vocab_size 1), no NSP head, no pooler in the heads;
- the heads: `lm_head.{dense,layer_norm,decoder,bias}` (GELU then LayerNorm, decoder tied to the word
  embeddings), `classifier.{dense,out_proj}` (tanh on <s>), `classifier` per token, `qa_outputs`.
XLM-RoBERTa is the same network under its own model_type ("xlm-roberta").
"""
from __future__ import annotations

import torch
from torch import nn

from ._engine import packed_positions
from .bert import BertEmbeddings, BertModel, BertPreTrainedModel
from .config import BertConfig
from .heads import (ClassificationHead, MaskedLMHead, QuestionAnsweringHead, SequenceClassificationHead,
                    TokenClassificationHead, classifier_dropout, dense_act_layernorm)


class RobertaConfig(BertConfig):
    """BertConfig with RoBERTa's model_type and HF RobertaConfig's defaults."""

    model_type = "roberta"
    family_defaults = dict(vocab_size=50265, pad_token_id=1, bos_token_id=0, eos_token_id=2)

    def __init__(self, **kwargs):
        super().__init__(**{**self.family_defaults, **kwargs})

    @property
    def longest_sequence(self) -> int:
        """Positions count from padding_idx + 1, so rows 0..padding_idx of the table are never a
        token's: 514 positions with padding_idx 1 hold 512 tokens (transformers' RoBERTa tokenizers
        say model_max_length 512)."""
        return self.max_position_embeddings - (self.pad_token_id or 0) - 1


class XLMRobertaConfig(RobertaConfig):
    model_type = "xlm-roberta"
    family_defaults = dict(vocab_size=30522, pad_token_id=1, bos_token_id=0, eos_token_id=2)


def roberta_position_ids(input_ids: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """padding_idx + 1, + 2, ... over each row's non-padding tokens; padding_idx at padding tokens."""
    mask = input_ids.ne(padding_idx).to(input_ids.dtype)
    return torch.cumsum(mask, dim=1, dtype=input_ids.dtype) * mask + padding_idx


class RobertaEmbeddings(BertEmbeddings):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size,
                                                padding_idx=config.pad_token_id)


class RobertaPreTrainedModel(BertPreTrainedModel):
    config_class = RobertaConfig
    base_model_prefix = "roberta"
    pretraining_heads = ("lm_head",)
    tied_weight_keys = ()

    def _encoder(self, add_pooling_layer: bool):
        cls = XLMRobertaModel if isinstance(self.config, XLMRobertaConfig) else RobertaModel
        return cls(self.config, add_pooling_layer=add_pooling_layer)


class RobertaModel(RobertaPreTrainedModel, BertModel):
    """BertModel with RoBERTa's embeddings; without position_ids they are counted past padding_idx."""

    embeddings_class = RobertaEmbeddings

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                output_hidden_states: bool = False, return_packed: bool = False, return_dict: bool = True):
        if (position_ids is None and isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2
                and input_ids.dtype in (torch.int32, torch.int64)):
            pad = self.config.pad_token_id
            if input_ids.shape[1] + pad >= self.config.max_position_embeddings:
                raise ValueError(f"input_ids has sequence length {input_ids.shape[1]}, but RoBERTa's positions start "
                                 f"after padding_idx ({pad}): at most max_position_embeddings - {pad + 1} = "
                                 f"{self.config.max_position_embeddings - pad - 1} tokens fit")
            position_ids = roberta_position_ids(input_ids, pad)
        return super().forward(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                               return_packed, return_dict)

    def default_position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """forward's positions when none are given: counted past padding_idx over the non-pad tokens."""
        return roberta_position_ids(input_ids, self.config.pad_token_id)

    def forward_packed(self, input_ids, cu_seqlens, max_seqlen: int, token_type_ids=None, position_ids=None,
                       output_hidden_states: bool = False, pool: bool = True):
        """BertModel.forward_packed; default positions padding_idx + 1, + 2, ... restarting at every
        sequence (packed sequences hold no padding)."""
        if position_ids is None and isinstance(input_ids, torch.Tensor) and isinstance(cu_seqlens, torch.Tensor):
            position_ids = packed_positions(cu_seqlens, input_ids.numel()) + self.config.pad_token_id + 1
        return super().forward_packed(input_ids, cu_seqlens, max_seqlen, token_type_ids, position_ids,
                                      output_hidden_states, pool)


class RobertaLMHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))  # decoder.bias, when tied (tie_weights)

    def forward(self, hidden):
        return self.decoder(dense_act_layernorm(hidden, self.dense, "gelu", self.layer_norm))


class RobertaClassificationHead(ClassificationHead):
    """dropout -> dense -> tanh -> dropout -> out_proj on the <s> token."""

    def __init__(self, config: BertConfig):
        super().__init__(config, torch.tanh)


class RobertaForMaskedLM(MaskedLMHead, RobertaPreTrainedModel):
    tied_weights = {"lm_head.decoder.weight": "roberta.embeddings.word_embeddings.weight",
                    "lm_head.decoder.bias": "lm_head.bias"}

    def __init__(self, config: RobertaConfig):
        super().__init__(config)
        self.roberta = self._encoder(add_pooling_layer=False)
        self.lm_head = RobertaLMHead(config)
        self.init_weights()

    def predict(self, hidden):
        return self.lm_head(hidden)


class RobertaForSequenceClassification(SequenceClassificationHead, RobertaPreTrainedModel):
    def __init__(self, config: RobertaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.roberta = self._encoder(add_pooling_layer=False)
        self.classifier = RobertaClassificationHead(config)
        self.init_weights()


class RobertaForTokenClassification(TokenClassificationHead, RobertaPreTrainedModel):
    def __init__(self, config: RobertaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.roberta = self._encoder(add_pooling_layer=False)
        self.dropout = nn.Dropout(classifier_dropout(config))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()


class RobertaForQuestionAnswering(QuestionAnsweringHead, RobertaPreTrainedModel):
    def __init__(self, config: RobertaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.roberta = self._encoder(add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()


# XLM-RoBERTa: the same modules under model_type "xlm-roberta" (HF keeps the `roberta.` prefix)


class XLMRobertaModel(RobertaModel):
    config_class = XLMRobertaConfig


class XLMRobertaForMaskedLM(RobertaForMaskedLM):
    config_class = XLMRobertaConfig


class XLMRobertaForSequenceClassification(RobertaForSequenceClassification):
    config_class = XLMRobertaConfig


class XLMRobertaForTokenClassification(RobertaForTokenClassification):
    config_class = XLMRobertaConfig


class XLMRobertaForQuestionAnswering(RobertaForQuestionAnswering):
    config_class = XLMRobertaConfig


HEADS = {cls.__name__: cls for cls in (
    RobertaModel, RobertaForMaskedLM, RobertaForSequenceClassification, RobertaForTokenClassification,
    RobertaForQuestionAnswering, XLMRobertaModel, XLMRobertaForMaskedLM, XLMRobertaForSequenceClassification,
    XLMRobertaForTokenClassification, XLMRobertaForQuestionAnswering)}
