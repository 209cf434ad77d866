"""The output classes of BertModel, its heads and the family's: attribute access like Hugging
Face's ModelOutput, and out[0] / tuple(out) / out["name"] over the fields that are set."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

from ..padding import PackedLayout


class ModelOutput:
    """Base of the output dataclasses: to_tuple() holds the fields that are not None, in order."""

    def to_tuple(self):
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, i):
        if isinstance(i, str):
            return getattr(self, i)
        return self.to_tuple()[i]

    def __iter__(self):
        return iter(self.to_tuple())


@dataclass
class BertModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor = None
    pooler_output: Optional[torch.Tensor] = None
    hidden_states: Optional[tuple] = None
    # with return_packed=True: (total_tokens, hidden) rows of the valid tokens and their layout
    packed_hidden_state: Optional[torch.Tensor] = None
    layout: Optional[PackedLayout] = None


@dataclass
class BertForPreTrainingOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    prediction_logits: torch.Tensor = None
    seq_relationship_logits: torch.Tensor = None
    hidden_states: Optional[tuple] = None


@dataclass
class MaskedLMOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: torch.Tensor = None
    hidden_states: Optional[tuple] = None


@dataclass
class SequenceClassifierOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: torch.Tensor = None
    hidden_states: Optional[tuple] = None


TokenClassifierOutput = SequenceClassifierOutput
NextSentencePredictorOutput = SequenceClassifierOutput


@dataclass
class QuestionAnsweringOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    start_logits: torch.Tensor = None
    end_logits: torch.Tensor = None
    hidden_states: Optional[tuple] = None


@dataclass
class ElectraForPreTrainingOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: torch.Tensor = None
    hidden_states: Optional[tuple] = None
