"""Measuring an intervention on one split of a task, prompt by prompt.

Everything is measured against the unmodified model on the same prompts, and kept per
prompt so that the report can put a bootstrap interval on every figure:

* teacher-forced measures, cheap enough for every prompt of a split and every condition:
  the probability the model puts on the concept's tokens along the unmodified model's own
  answers (where those answers say a concept word: suppression; at every answer token:
  amplification), and the KL divergence from the unmodified model along its answers to
  neutral prompts (collateral damage no position rule can zero: it covers the whole
  answer, not only the first token, which is kept as a column too);
* generation (greedy) on a subset: concept words per answer, degenerate answers; for QA,
  answer accuracy, exact match and token F1 on every question.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from somp_ref.adapters.generation import generate
from somp_ref.adapters.intervene import PositionRule, generated_from, scale_heads
from somp_ref.adapters.offload import input_device
from somp_ref.adapters.tasks import Split, Task
from somp_ref.adapters.tokenization import real_positions, render, resolve_chat_template
from somp_ref.head_scores import Head
from somp_ref.metrics import (
    contains_answer,
    count_concept_words,
    exact_match,
    is_degenerate,
    token_f1,
    words_of,
)

#: Answer tokens teacher-forced per prompt: the measures average over them.
MAX_FORCED_TOKENS = 32


@dataclass(frozen=True)
class Forced:
    """Prompts with the unmodified model's answers, tokenised for teacher forcing.

    ``ids[i]`` is prompt i's token ids followed by its answer's; positions
    ``starts[i] - 1 .. len(ids[i]) - 2`` predict the answer's tokens.
    """

    ids: tuple[tuple[int, ...], ...]
    starts: tuple[int, ...]


def forced_answers(
    tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], *, chat_template: bool
) -> Forced:
    """Tokenise each prompt (as the model saw it) and the answer it gave."""
    ids, starts = [], []
    for prompt, answer in zip(prompts, answers, strict=True):
        text = render(tokenizer, prompt, chat_template)
        head = tokenizer(text, add_special_tokens=not chat_template)["input_ids"]
        tail = tokenizer(answer, add_special_tokens=False)["input_ids"][:MAX_FORCED_TOKENS]
        ids.append(tuple(head + tail))
        starts.append(len(head))
    return Forced(tuple(ids), tuple(starts))


@torch.no_grad()
def forced_log_probs(model: Any, forced: Forced, batch_size: int):
    """Yield, per prompt, the log-probabilities (answer tokens + 1, vocab) at the positions
    that predict its first answer token onwards (float64 on the CPU).

    The answers' tokens are declared generated (:func:`generated_from`), so a head scaled
    with ``positions="generated"`` acts at them as it would have while generating them.
    """
    device = input_device(model)
    pad = 0
    for start in range(0, len(forced.ids), batch_size):
        rows = forced.ids[start : start + batch_size]
        width = max(map(len, rows))
        input_ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        starts = forced.starts[start : start + batch_size]
        answers = [width - len(r) + s for r, s in zip(rows, starts, strict=True)]
        with generated_from(answers):
            logits = model(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                position_ids=real_positions(mask).to(device),
            ).logits
        for row, ids in enumerate(rows):
            offset = width - len(ids)
            first = offset + forced.starts[start + row] - 1
            chunk = logits[row, first : offset + len(ids) - 1].double().cpu()
            yield torch.log_softmax(chunk, dim=-1)


@dataclass
class Measurement:
    """Per-prompt measures of one condition (NaN where a prompt has nothing to measure).

    Attributes
    ----------
    values : dict of str -> ndarray of shape (n_prompts_of_that_measure,)
    outputs : dict of str -> list of str
        Generated texts (the generation subset, and QA answers).
    """

    values: dict[str, np.ndarray]
    outputs: dict[str, list[str]]


class Evaluator:
    """Measures interventions on one split of a task, against a baseline computed once.

    Parameters
    ----------
    model, tokenizer
    task : Task
    split : Split
    concept_words : list of str
        Words counted in generations.
    concept_ids : sequence of int
        Token ids whose probability mass is measured.
    n_generate : int
        Target prompts generated from (the first of the split); every prompt is measured
        teacher-forced. QA generates every question.
    n_neutral : int
        Neutral prompts for the collateral measure.
    batch_size : int
    positions : str, default="all"
        Where the measured heads are scaled (see
        :func:`somp_ref.adapters.intervene.scale_heads`): in generation and along the
        teacher-forced answers alike, whose tokens count as generated.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        task: Task,
        split: Split,
        concept_words: Sequence[str],
        concept_ids: Sequence[int],
        *,
        n_generate: int = 32,
        n_neutral: int = 32,
        batch_size: int = 16,
        positions: PositionRule = "all",
    ):
        self.model, self.tokenizer, self.task, self.split = model, tokenizer, task, split
        self.positions = positions
        self.words = list(concept_words)
        self.ids = torch.tensor(sorted(set(int(i) for i in concept_ids)), dtype=torch.long)
        self.batch_size = batch_size
        # One rule for the generations and the teacher-forced answers: the tokenizer's chat
        # template where it has one (an instruction-tuned model), raw text otherwise.
        self.chat_template = resolve_chat_template(tokenizer, None)
        self.generated = list(split.target[:n_generate]) if task.kind != "qa" else []
        self.neutral = list(split.neutral[:n_neutral])
        prompts = [r["prompt"] for r in split.target]
        neutral_prompts = [r["prompt"] for r in self.neutral]
        self.baseline_answers = self._generate(prompts) if task.kind != "qa" else []
        neutral_answers = self._generate(neutral_prompts)
        template = {"chat_template": self.chat_template}
        self.target_forced = (
            forced_answers(tokenizer, prompts, self.baseline_answers, **template)
            if task.kind != "qa"
            else None
        )
        self.neutral_forced = forced_answers(
            tokenizer, neutral_prompts, neutral_answers, **template
        )
        self.neutral_base = list(forced_log_probs(model, self.neutral_forced, batch_size))
        self.baseline = self.measure({})

    def _generate(self, prompts: Sequence[str]) -> list[str]:
        return generate(
            self.model,
            self.tokenizer,
            list(prompts),
            max_new_tokens=self.task.max_new_tokens,
            chat_template=self.chat_template,
            batch_size=self.batch_size,
        )

    def measure(self, alphas: Mapping[Head, float]) -> Measurement:
        """Every measure with the heads in ``alphas`` scaled (the baseline when empty)."""
        values: dict[str, np.ndarray] = {}
        outputs: dict[str, list[str]] = {}
        with scale_heads(self.model, alphas, positions=self.positions):
            values |= self._collateral()
            if self.task.kind == "qa":
                for part in ("target", "other"):
                    records = getattr(self.split, part)
                    answers = self._generate([r["prompt"] for r in records])
                    outputs[part] = answers
                    values |= _qa_values(part, answers, records)
            else:
                values |= self._forced_concept()
                texts = self._generate([r["prompt"] for r in self.generated])
                outputs["target"] = texts
                values["concept_words"] = np.array(
                    [count_concept_words(t, self.words) for t in texts], dtype=np.float64
                )
                values["degenerate"] = np.array([is_degenerate(t) for t in texts], np.float64)
        return Measurement(values, outputs)

    def _collateral(self) -> dict[str, np.ndarray]:
        """KL from the unmodified model along its answers to neutral prompts: the mean over
        answer tokens, and at the first token alone (nats)."""
        mean, first = [], []
        current = forced_log_probs(self.model, self.neutral_forced, self.batch_size)
        for base, now in zip(self.neutral_base, current, strict=True):
            kl = (base.exp() * (base - now)).sum(dim=-1).clamp(min=0.0)
            mean.append(float(kl.mean()))
            first.append(float(kl[0]))
        return {"kl": np.array(mean), "kl_first": np.array(first)}

    def _forced_concept(self) -> dict[str, np.ndarray]:
        """Probability on the concept's tokens along the unmodified model's answers.

        "mass": at the positions where that answer has a concept token (NaN for answers
        without one); "mass_all": at every answer token.
        """
        concept = set(self.ids.tolist())
        where, everywhere = [], []
        forced = self.target_forced
        rows = forced_log_probs(self.model, forced, self.batch_size)
        for ids, start, log_probs in zip(forced.ids, forced.starts, rows, strict=True):
            mass = log_probs[:, self.ids].exp().sum(dim=-1)  # (answer tokens + 1,)
            targets = ids[start:]  # the answer tokens that positions 0.. predict
            hits = [i for i, token in enumerate(targets) if token in concept]
            where.append(float(mass[hits].mean()) if hits else np.nan)
            everywhere.append(float(mass[: len(targets)].mean()) if targets else np.nan)
        return {"mass": np.array(where), "mass_all": np.array(everywhere)}


def _qa_values(part: str, answers: list[str], records: Sequence[dict]) -> dict[str, np.ndarray]:
    pairs = list(zip(answers, records, strict=True))
    return {
        f"{part}_acc": np.array([contains_answer(a, r["answers"]) for a, r in pairs]),
        f"{part}_f1": np.array([token_f1(a, r["answers"]) for a, r in pairs]),
        f"{part}_em": np.array([exact_match(a, r["answers"]) for a, r in pairs]),
        f"{part}_degenerate": np.array([qa_degenerate(a) for a, _ in pairs], dtype=np.float64),
    }


def qa_degenerate(answer: str) -> bool:
    """An empty answer, or a long one that loops: a short answer ("4", "Paris") is what
    the QA template asks for, not a degenerate one."""
    return not answer.strip() or (len(words_of(answer)) >= 6 and is_degenerate(answer))
