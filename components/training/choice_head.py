"""The multiple-choice model: transformers' own multiple-choice class for the checkpoint's
architecture (AutoModelForMultipleChoice), scoring each choice the way the base model already does well.

Why: a sentence-embedding checkpoint such as all-MiniLM-L6-v2 is trained so that the mean-pooled
states of related texts, each encoded on its own, point the same way; its [CLS] state is not trained
at all. The stock head reads [CLS] of the joint sequence through a new linear layer, so it starts at
chance and, on a few hundred questions, memorises the train set before it learns relevance
(benchmarks/choice.py: 180 train questions, 9 epochs: train loss 0.01, test accuracy 0.59, while the
base model's own embedding cosine, with no training, scores 0.75). Measured on the benchmark's 300
test questions before any training, the cosine of mean question and choice states scores 0.680 read
from the jointly attended sequence, 0.773 with the two segments attending only to themselves, and
0.797 encoded apart (the zero-shot baseline): the joint pass mixes the choice into the question's
states. So, for a checkpoint with segment ids, each choice's score is

    logit = scale * cos(mean question states, mean choice states)

where the one [CLS] question [SEP] choice [SEP] sequence is encoded as two texts: each token attends
only to its own segment, the choice's positions restart at 1 and both segments get segment id 0, as
when each is encoded alone. `scale` starts at SCALE. Before any training the model is the base
model's own zero-shot ranking, and fine-tuning (a softmax over a question's choices: the other
choices are the negatives) moves on from there. The stock [CLS] head would see the question only, so
it is frozen and unused. Checkpoints without segment ids (RoBERTa, DistilBERT: type_vocab_size < 2)
cannot say where the choice starts: they keep the stock head alone, its last layer starting at zero.

    model = ChoiceModel.from_pretrained(model_dir, num_labels=4)   # what the steps call through the Task
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForMultipleChoice
from transformers.modeling_outputs import MultipleChoiceModelOutput

SCALE = 20.0  # cosine -> logit: 20 is the usual temperature of in-batch-negatives training of such encoders


def separates_segments(config) -> bool:
    """Whether the model encodes question and choice apart: only a checkpoint with segment ids can say
    where the choice starts."""
    return getattr(config, "type_vocab_size", 0) >= 2


class _SegmentCosine:
    """Mixed in before a transformers *ForMultipleChoice class (see the module docstring)."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if separates_segments(config):
            self.choice_scale = torch.nn.Linear(1, 1)
            with torch.no_grad():  # also set here: a model built from a config alone starts the same way
                self.choice_scale.weight.fill_(SCALE)
                self.choice_scale.bias.zero_()
            self.freeze_unused()

    def freeze_unused(self) -> None:
        """The stock head and the base model's pooler read [CLS], which sees the question only: frozen,
        they take no part in training (DDP requires every trainable parameter to get a gradient)."""
        for name, p in self.named_parameters():
            if not name.startswith(f"{self.base_model_prefix}.") or ".pooler." in name:
                p.requires_grad_(name.startswith("choice_scale."))

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
        if separates_segments(self.config):
            if token_type_ids is None:
                raise ValueError("this multiple-choice model reads the choice's place from token_type_ids; "
                                 "tokenize the (question, choice) pairs with the model's own tokenizer")
            logits = self._separated_cosine(input_ids, attention_mask, token_type_ids)
        else:
            logits = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return MultipleChoiceModelOutput(loss=loss, logits=logits)

    def _separated_cosine(self, input_ids, attention_mask, token_type_ids):
        """[batch, choices] scores of the joint sequences, each encoded as two texts (module docstring)."""
        width = input_ids.shape[-1]
        ids = input_ids.reshape(-1, width)
        present = attention_mask.reshape(-1, width) > 0
        choice = token_type_ids.reshape(-1, width) > 0
        # each token attends to the real tokens of its own segment only
        allowed = ((choice[:, :, None] == choice[:, None, :]) & present[:, None, :])[:, None]
        if self.config._attn_implementation == "eager":  # eager attention adds the mask to the scores
            allowed = torch.zeros(allowed.shape, dtype=self.dtype, device=ids.device).masked_fill(~allowed, torch.finfo(self.dtype).min)
        # the choice's positions restart at 1 (0 is its own [CLS] when encoded alone)
        start = choice.to(torch.int32).argmax(-1, keepdim=True)
        positions = torch.arange(width, device=ids.device)[None] - torch.where(choice, start - 1, 0)
        hidden = self.base_model(input_ids=ids, attention_mask=allowed, token_type_ids=torch.zeros_like(ids),
                                 position_ids=positions).last_hidden_state
        return self._scaled(_cosine(hidden, ~choice & present, choice & present), input_ids.shape[:-1])

    def _scaled(self, cosine: torch.Tensor, shape) -> torch.Tensor:
        return self.choice_scale(cosine.reshape(shape).unsqueeze(-1).to(self.choice_scale.weight.dtype)).squeeze(-1)


def _cosine(hidden: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    return (_mean(hidden, first) * _mean(hidden, second)).sum(-1)


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
    """`from_pretrained(path, **kwargs)`: the checkpoint's *ForMultipleChoice class scoring by the separated cosine."""

    @staticmethod
    def from_pretrained(path, **kwargs):
        loaded = _class_for(AutoConfig.from_pretrained(path)).from_pretrained(path, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, info) with output_loading_info
        if separates_segments(model.config):  # loading makes the weights it initialises trainable again
            model.freeze_unused()
        return loaded
