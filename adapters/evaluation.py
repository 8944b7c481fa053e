"""Measuring an intervention: the target effect and the collateral damage, against the
unmodified model's own behaviour on the same prompts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from somp_ref.adapters.generation import generate
from somp_ref.adapters.intervene import scale_heads
from somp_ref.adapters.tasks import Task
from somp_ref.adapters.tokenization import encode, real_positions, render
from somp_ref.head_scores import Head
from somp_ref.metrics import (
    contains_answer,
    count_concept_words,
    exact_match,
    is_degenerate,
    kl_divergence,
    token_f1,
)


class Evaluator:
    """Evaluates head interventions on one task, relative to a baseline computed once.

    Parameters
    ----------
    model, tokenizer
    task : Task
    concept_words : list of str
        Words counted in generations.
    concept_ids : list of int
        Token ids whose probability mass is measured (teacher-forced metric).
    batch_size : int
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        task: Task,
        concept_words: list[str],
        concept_ids: list[int],
        *,
        batch_size: int = 24,
    ):
        self.model, self.tokenizer, self.task = model, tokenizer, task
        self.words = concept_words
        self.ids = torch.tensor(sorted(set(concept_ids)), dtype=torch.long)
        self.batch_size = batch_size
        self.baseline_outputs = self._outputs()
        self.baseline_neutral = self._neutral_logits()
        self.forced = self._forced_sequences() if task.kind == "generation" else None
        self.baseline = self.evaluate({})

    # ------------------------------------------------------------------ raw outputs

    def _generate(self, records: list[dict[str, Any]]) -> list[str]:
        return generate(
            self.model,
            self.tokenizer,
            [r["prompt"] for r in records],
            max_new_tokens=self.task.max_new_tokens,
            chat_template=True,
            batch_size=self.batch_size,
        )

    def _outputs(self) -> dict[str, list[str]]:
        outputs = {"target": self._generate(self.task.target)}
        if self.task.kind == "qa":
            outputs["other"] = self._generate(self.task.other)
        return outputs

    @torch.no_grad()
    def _neutral_logits(self) -> np.ndarray:
        """Next-token logits at the end of each neutral prompt, (n, vocab) float64."""
        rows = []
        prompts = [r["prompt"] for r in self.task.other]
        for start in range(0, len(prompts), self.batch_size):
            batch = encode(
                self.tokenizer,
                prompts[start : start + self.batch_size],
                chat_template=True,
                padding_side="left",
                device=self.model.device,
            )
            rows.append(self.model(**batch).logits[:, -1].double().cpu().numpy())
        return np.concatenate(rows)

    def _forced_sequences(self) -> list[tuple[str, list[int]]]:
        """Prompt + baseline answer texts, and the answer positions holding concept tokens."""
        concept = set(self.ids.tolist())
        sequences = []
        for record, answer in zip(self.task.target, self.baseline_outputs["target"], strict=True):
            prompt = render(self.tokenizer, record["prompt"], True)
            start = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            ids = self.tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
            positions = [p for p in range(start, len(ids)) if ids[p] in concept]
            if positions:
                sequences.append((prompt + answer, positions))
        return sequences

    @torch.no_grad()
    def _concept_mass(self) -> float | None:
        """Mean probability on concept tokens where the baseline answer says one."""
        masses = []
        for start in range(0, len(self.forced), self.batch_size):
            chunk = self.forced[start : start + self.batch_size]
            batch = self.tokenizer(
                [text for text, _ in chunk],
                add_special_tokens=False,
                padding=True,
                return_tensors="pt",
            )
            batch["position_ids"] = real_positions(batch["attention_mask"])
            batch = {k: v.to(self.model.device) for k, v in batch.items()}
            logits = self.model(**batch).logits.double()
            for row, (_, positions) in enumerate(chunk):
                real = batch["attention_mask"][row].nonzero().squeeze(-1)  # either padding
                predicting = real[[p - 1 for p in positions]]  # logits at p-1 predict p
                probs = torch.softmax(logits[row, predicting], dim=-1)
                masses += probs[:, self.ids].sum(dim=-1).tolist()
        return float(np.mean(masses)) if masses else None  # no concept token to measure

    # ------------------------------------------------------------------ metrics

    def evaluate(self, alphas: Mapping[Head, float]) -> dict[str, Any]:
        """Metrics with the heads in ``alphas`` scaled (the baseline when empty)."""
        with scale_heads(self.model, alphas):
            outputs = self._outputs() if alphas else self.baseline_outputs
            neutral = self._neutral_logits() if alphas else self.baseline_neutral
            mass = self._concept_mass() if self.forced is not None else None
        every = [text for texts in outputs.values() for text in texts]
        metrics: dict[str, Any] = {
            "kl_neutral": float(np.mean(kl_divergence(self.baseline_neutral, neutral))),
            "degenerate": float(np.mean([is_degenerate(t) for t in every])),
        }
        if self.task.kind == "generation":
            counts = [count_concept_words(t, self.words) for t in outputs["target"]]
            metrics["concept_words"] = float(np.mean(counts))
            metrics["concept_mass"] = mass
        else:
            for part in ("target", "other"):
                records = self.task.target if part == "target" else self.task.other
                pairs = list(zip(outputs[part], records, strict=True))
                metrics[f"{part}_f1"] = float(
                    np.mean([token_f1(o, r["answers"]) for o, r in pairs])
                )
                metrics[f"{part}_em"] = float(
                    np.mean([exact_match(o, r["answers"]) for o, r in pairs])
                )
                metrics[f"{part}_acc"] = float(
                    np.mean([contains_answer(o, r["answers"]) for o, r in pairs])
                )
        return {"metrics": metrics, "outputs": outputs}
