"""ELECTRA on BERT's fused, padding-free encoder, with Hugging Face's names.

What differs from BERT: the embeddings are `embedding_size` wide (smaller than hidden_size in the
published checkpoints) and `embeddings_project` (a Linear, present only when the widths differ)
takes them to the hidden width before the first layer; no pooler. Heads: the discriminator
(`discriminator_predictions`: dense, hidden_act, dense_prediction -> one logit per token; loss BCE
over the attended tokens), the generator's MLM head (`generator_predictions`: dense to the
embedding width, GELU, LayerNorm; `generator_lm_head` tied to the word embeddings),
`classifier.{dense,out_proj}` (GELU on [CLS]), per-token `classifier`, `qa_outputs`.
"""
from __future__ import annotations

import copy

import torch.nn.functional as F
from torch import nn

from .bert import BertEmbeddings, BertModel, BertPreTrainedModel
from .config import BertConfig
from .heads import (ClassificationHead, FamilyHead, MaskedLMHead, QuestionAnsweringHead, SequenceClassificationHead,
                    TokenClassificationHead, activation, classifier_dropout, dense_act_layernorm, replaced_token_loss)
from .outputs import ElectraForPreTrainingOutput


class ElectraConfig(BertConfig):
    """BertConfig with ELECTRA's model_type, its embedding_size and HF ElectraConfig's defaults."""

    model_type = "electra"

    def __init__(self, **kwargs):
        defaults = dict(embedding_size=128, hidden_size=256, num_attention_heads=4, intermediate_size=1024,
                        summary_type="first", summary_use_proj=True, summary_activation="gelu",
                        summary_last_dropout=0.1)
        super().__init__(**{**defaults, **kwargs})

    def validate(self) -> None:
        super().validate()
        v = getattr(self, "embedding_size", None)
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"ElectraConfig.embedding_size must be a positive int, got {v!r}")


class ElectraEmbeddings(BertEmbeddings):
    """BERT's fused embeddings, embedding_size wide."""

    def __init__(self, config: ElectraConfig):
        narrow = copy.copy(config)
        narrow.hidden_size = config.embedding_size
        super().__init__(narrow)


class ElectraPreTrainedModel(BertPreTrainedModel):
    config_class = ElectraConfig
    base_model_prefix = "electra"
    pretraining_heads = ("generator_predictions", "generator_lm_head", "discriminator_predictions")
    tied_weight_keys = ()  # the generator's (ElectraForMaskedLM's) are MaskedLMHead's


class ElectraModel(ElectraPreTrainedModel, BertModel):
    """BertModel with ELECTRA's embeddings and, where the widths differ, their projection; no pooler."""

    embeddings_class = ElectraEmbeddings

    def __init__(self, config: ElectraConfig):
        super().__init__(config, add_pooling_layer=False)
        if config.embedding_size != config.hidden_size:
            self.embeddings_project = nn.Linear(config.embedding_size, config.hidden_size)
            self.init_weights()

    def embed_tokens(self, input_ids, token_type_ids, position_ids, ranges_checked: bool):
        rows = self.embeddings(input_ids, token_type_ids, position_ids, ranges_checked)
        project = self._modules.get("embeddings_project")
        return rows if project is None else project(rows)


class ElectraDiscriminatorPredictions(nn.Module):
    def __init__(self, config: ElectraConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dense_prediction = nn.Linear(config.hidden_size, 1)
        self.activation = activation(config.hidden_act)

    def forward(self, hidden):
        return self.dense_prediction(self.activation(self.dense(hidden))).squeeze(-1)


class ElectraGeneratorPredictions(nn.Module):
    def __init__(self, config: ElectraConfig):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(config.embedding_size, eps=config.layer_norm_eps)
        self.dense = nn.Linear(config.hidden_size, config.embedding_size)

    def forward(self, hidden):
        return dense_act_layernorm(hidden, self.dense, "gelu", self.LayerNorm)


class ElectraClassificationHead(ClassificationHead):
    """dropout -> dense -> GELU -> dropout -> out_proj on [CLS]."""

    def __init__(self, config: ElectraConfig):
        super().__init__(config, F.gelu)


class ElectraForPreTraining(FamilyHead, ElectraPreTrainedModel):
    """The discriminator: a replaced-token logit per token; labels 1 = replaced, 0 = original."""

    def __init__(self, config: ElectraConfig):
        super().__init__(config)
        self.electra = ElectraModel(config)
        self.discriminator_predictions = ElectraDiscriminatorPredictions(config)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=False):
        out = self.encode(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        logits = self.discriminator_predictions(out.last_hidden_state)
        loss = None if labels is None else replaced_token_loss(logits, labels, attention_mask)
        return ElectraForPreTrainingOutput(loss, logits, out.hidden_states)


class ElectraForMaskedLM(MaskedLMHead, ElectraPreTrainedModel):
    """The generator."""

    tied_weights = {"generator_lm_head.weight": "electra.embeddings.word_embeddings.weight"}

    def __init__(self, config: ElectraConfig):
        super().__init__(config)
        self.electra = ElectraModel(config)
        self.generator_predictions = ElectraGeneratorPredictions(config)
        self.generator_lm_head = nn.Linear(config.embedding_size, config.vocab_size)
        self.init_weights()

    def predict(self, hidden):
        return self.generator_lm_head(self.generator_predictions(hidden))


class ElectraForSequenceClassification(SequenceClassificationHead, ElectraPreTrainedModel):
    def __init__(self, config: ElectraConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.electra = ElectraModel(config)
        self.classifier = ElectraClassificationHead(config)
        self.init_weights()


class ElectraForTokenClassification(TokenClassificationHead, ElectraPreTrainedModel):
    def __init__(self, config: ElectraConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.electra = ElectraModel(config)
        self.dropout = nn.Dropout(classifier_dropout(config))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()


class ElectraForQuestionAnswering(QuestionAnsweringHead, ElectraPreTrainedModel):
    def __init__(self, config: ElectraConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.electra = ElectraModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()


HEADS = {cls.__name__: cls for cls in (ElectraModel, ElectraForPreTraining, ElectraForMaskedLM,
                                       ElectraForSequenceClassification, ElectraForTokenClassification,
                                       ElectraForQuestionAnswering)}
