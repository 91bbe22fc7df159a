"""The multiple-choice model: transformers' own multiple-choice class for the checkpoint's
architecture (AutoModelForMultipleChoice: [CLS] pooler + a linear score per choice), plus a score that
starts where the base model already is good.

Why: a sentence-embedding checkpoint such as all-MiniLM-L6-v2 is trained so that the mean-pooled
states of related texts point the same way; its [CLS] state is not trained at all. The stock head
reads [CLS] through a new linear layer, so it starts at chance and, on a few hundred questions,
memorises the train set before it learns relevance (benchmarks/choice.py: 180 train questions, 9
epochs: train loss 0.01, test accuracy 0.59, while the base model's own embedding cosine, with no
training, scores 0.75). Here each choice's score is

    logit = scale * cos(mean of the question's token states, mean of the choice's token states) + head([CLS])

read from the same joint [CLS] question [SEP] choice [SEP] sequence (segments from token_type_ids),
with `scale` initialised to SCALE and the stock head's last layer initialised to zero: before any
training the model ranks choices by the base model's own similarity, and fine-tuning moves on from
there (the stock head learns what the cosine misses). Models without token_type_ids keep the stock head.

    model = ChoiceModel.from_pretrained(model_dir, num_labels=4)   # what the steps call through the Task
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForMultipleChoice
from transformers.modeling_outputs import MultipleChoiceModelOutput

SCALE = 20.0  # cosine -> logit: 20 is the usual temperature of in-batch-negatives training of such encoders


class _SegmentCosine:
    """Mixed in before a transformers *ForMultipleChoice class (see the module docstring)."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.choice_scale = torch.nn.Linear(1, 1)
        with torch.no_grad():  # also set here: a model built from a config alone starts the same way
            self.choice_scale.weight.fill_(SCALE)
            self.choice_scale.bias.zero_()

    def _init_weights(self, module):
        if module is getattr(self, "choice_scale", None):
            with torch.no_grad():
                module.weight.fill_(SCALE)
                module.bias.zero_()
            return
        super()._init_weights(module)
        if module is getattr(self, "classifier", None) and isinstance(module, torch.nn.Linear):
            with torch.no_grad():  # a new head adds nothing until it has learnt something
                module.weight.zero_()
                module.bias.zero_()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        kwargs.pop("output_hidden_states", None)
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                              output_hidden_states=token_type_ids is not None, **kwargs)
        logits = out.logits
        if token_type_ids is not None:
            hidden = out.hidden_states[-1]  # [batch * choices, sequence, hidden]
            width = input_ids.shape[-1]
            segments, mask = token_type_ids.reshape(-1, width), attention_mask.reshape(-1, width)
            cosine = (_mean(hidden, (segments == 0) & (mask > 0)) * _mean(hidden, (segments == 1) & (mask > 0))).sum(-1)
            logits = logits + self.choice_scale(cosine.reshape(logits.shape).unsqueeze(-1).to(logits.dtype)).squeeze(-1)
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return MultipleChoiceModelOutput(loss=loss, logits=logits)


def _mean(hidden: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """L2-normalised mean of the states at `where` (all zeros when none: an absent choice)."""
    weights = where.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    return torch.nn.functional.normalize(pooled, dim=-1, eps=1e-6)


_CLASSES: dict[type, type] = {}


def _class_for(config) -> type:
    base = AutoModelForMultipleChoice._model_mapping[type(config)]
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Kubetune{base.__name__}", (_SegmentCosine, base), {"__module__": __name__})
    return _CLASSES[base]


class ChoiceModel:
    """`from_pretrained(path, **kwargs)`: the checkpoint's *ForMultipleChoice class with the segment-cosine score."""

    @staticmethod
    def from_pretrained(path, **kwargs):
        return _class_for(AutoConfig.from_pretrained(path)).from_pretrained(path, **kwargs)
