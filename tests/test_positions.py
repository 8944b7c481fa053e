"""Position-selective head scaling (``scale_heads(..., positions=...)``) on tiny random text
models: exactness (positions left alone before any scaled one are bit-identical), the same
text with and without the KV cache, rows of a left-padded batch, and clear errors. The
embedded model's checks are at the end (marked ``model``)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from models import tiny_causal_lm, tiny_mistral  # noqa: E402

from somp_ref.adapters.intervene import (  # noqa: E402
    POSITION_RULES,
    generated_from,
    scale_heads,
    steer,
)

VOCAB = 64
#: Heads of the 2-layer, 4-head tiny models, scaled by factors that change the logits.
ALPHAS = {(0, 1): -3.0, (1, 2): 0.0, (1, 0): 4.0}
#: Rules that need no image tokens, as names, a mask and a callable.
TEXT_RULES = ("all", "prompt", "generated")
#: Cached decoding vs recomputing the whole sequence, or a left-padded row vs the same row
#: alone, float32 tiny models with logits of order 0.1-1: the GEMMs and softmaxes have other
#: shapes, so rounding differs by a few float32 ulps (about 1e-7 each).
FLOAT32_ATOL = 1e-5


@pytest.fixture(scope="module")
def mistral():
    return tiny_mistral(VOCAB, seed=1)


@pytest.fixture(scope="module", params=["mistral", "gpt2"])
def any_tiny(request):
    """A Linear o_proj family and GPT-2's Conv1D."""
    if request.param == "mistral":
        return tiny_mistral(VOCAB, seed=1)
    return tiny_causal_lm("gpt2", VOCAB, seed=1)


def ids_of(seed: int, batch: int = 2, width: int = 7) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, width), generator=torch.Generator().manual_seed(seed))


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def greedy(model, ids, mask, use_cache, n=6):
    return greedy_with_logits(model, ids, mask, use_cache, n)[0]


def greedy_with_logits(model, ids, mask, use_cache, n=6):
    """Greedy token ids, and the logits of each step (batch, n, vocab)."""
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=n,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=0,
        eos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences, torch.stack(out.logits, dim=1)


def left_padded(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts, the second two tokens shorter and left-padded."""
    ids = ids_of(seed)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    return ids, mask


# ------------------------------------------------------------------ exactness


@settings(max_examples=25)
@given(
    cells=st.lists(st.booleans(), min_size=14, max_size=14),
    alpha=st.sampled_from([-1.0, 0.0, 3.0]),
    seed=st.integers(0, 2**16),
)
@example(cells=[False] * 13 + [True], alpha=-1.0, seed=0)  # only the last position scaled
def test_positions_before_the_first_scaled_one_are_bit_identical(any_tiny, cells, alpha, seed):
    model = any_tiny
    ids = ids_of(seed)
    chosen = torch.tensor(cells).reshape(2, 7)
    base = logits(model, ids)
    with scale_heads(model, {head: alpha for head in ALPHAS}, positions=chosen):
        now = logits(model, ids)
    for row in range(2):
        scaled = chosen[row].nonzero().flatten().tolist()
        first = scaled[0] if scaled else 7
        # a causal model: nothing before the row's first scaled position can see the change
        assert torch.equal(now[row, :first], base[row, :first]), (row, first)
        if scaled:  # and the scaled position itself does see it
            assert not torch.equal(now[row, first], base[row, first]), (row, first)


@pytest.mark.parametrize("rule", [*TEXT_RULES, "mask", "callable"])
def test_alpha_one_is_bit_identical_under_every_rule(any_tiny, rule):
    model = any_tiny
    ids, mask = left_padded(3)
    positions = {
        "mask": torch.tensor([[True, False] * 4] * 2)[:, :7],
        "callable": lambda rows, columns: (rows + columns) % 3 == 0,
    }.get(rule, rule)
    base = logits(model, ids, attention_mask=mask)
    base_text = greedy(model, ids, mask, True)
    with scale_heads(model, {head: 1.0 for head in ALPHAS}, positions=positions) as calls:
        with generated_from([4, 5]):
            assert torch.equal(logits(model, ids, attention_mask=mask), base)
        if rule in TEXT_RULES:
            assert torch.equal(greedy(model, ids, mask, True), base_text)
    assert all(n > 0 for n in calls.values())  # our hooks ran


def test_the_rules_are_the_masks_they_describe(mistral):
    # teacher forcing: "generated" = the answer's columns, "prompt" = the others
    ids = ids_of(5)
    starts = torch.tensor([3, 5])
    answer = torch.arange(7)[None, :] >= starts[:, None]
    for rule, mask in (("generated", answer), ("prompt", ~answer), ("all", answer | ~answer)):
        with scale_heads(mistral, ALPHAS, positions=rule), generated_from(starts):
            by_rule = logits(mistral, ids)
        with scale_heads(mistral, ALPHAS, positions=mask):
            by_mask = logits(mistral, ids)
        with scale_heads(mistral, ALPHAS, positions=lambda r, c, mask=mask: mask[r, c]):
            by_callable = logits(mistral, ids)
        assert torch.equal(by_rule, by_mask) and torch.equal(by_rule, by_callable), rule


def test_prompt_and_generated_together_are_all(mistral):
    # Each position is scaled once, by one of the two: the same multiplications as "all".
    ids = ids_of(6)
    with scale_heads(mistral, ALPHAS, positions="all"):
        everywhere = logits(mistral, ids)
    with generated_from([2, 4]):
        with scale_heads(mistral, ALPHAS, positions="prompt"):
            with scale_heads(mistral, ALPHAS, positions="generated"):
                split = logits(mistral, ids)
    assert torch.equal(split, everywhere)


# ------------------------------------------------------------------ generation, KV cache


@pytest.mark.parametrize("rule", [*TEXT_RULES, "mask", "callable"])
def test_generate_gives_the_same_tokens_with_and_without_the_cache(any_tiny, rule):
    model = any_tiny
    ids, mask = left_padded(7)
    positions = {
        "mask": torch.tensor([[True, False, True] * 5] * 2)[:, :13],
        "callable": lambda rows, columns: (columns % 2 == 1) & (rows == 0),
    }.get(rule, rule)
    base, base_logits = greedy_with_logits(model, ids, mask, True)
    with scale_heads(model, ALPHAS, positions=positions):
        cached, cached_logits = greedy_with_logits(model, ids, mask, True)
        recomputed, recomputed_logits = greedy_with_logits(model, ids, mask, False)
    assert torch.equal(cached, recomputed)
    # one decode step vs the whole sequence again: float32 GEMMs of other shapes
    torch.testing.assert_close(cached_logits, recomputed_logits, rtol=0, atol=FLOAT32_ATOL)
    assert (cached_logits - base_logits).abs().amax() > 100 * FLOAT32_ATOL  # it did something
    if rule == "generated":  # the prompt is untouched: the first new token's logits are the
        assert torch.equal(cached_logits[:, 0], base_logits[:, 0])  # model's own


def test_a_manual_cache_loop_counts_fed_tokens_as_generated(mistral):
    from transformers import DynamicCache

    ids = ids_of(8)
    with scale_heads(mistral, ALPHAS, positions=torch.arange(7)[None, :].expand(2, 7) >= 5):
        whole = logits(mistral, ids)
    with torch.no_grad(), scale_heads(mistral, ALPHAS, positions="generated"):
        cache = DynamicCache(config=mistral.config)
        head = mistral(input_ids=ids[:, :5], cache=cache, use_cache=True).logits
        tail = mistral(input_ids=ids[:, 5:], cache=cache, use_cache=True).logits
    # the same columns scaled; the split forward rounds differently (float32 GEMM shapes)
    torch.testing.assert_close(torch.cat([head, tail], dim=1), whole, rtol=0, atol=FLOAT32_ATOL)
    assert torch.equal(head, logits(mistral, ids[:, :5]))


def test_each_row_of_a_left_padded_batch_gets_its_own_positions(mistral):
    # float32: transformers' eager attention turns a float64 left-padded row into NaN
    model = mistral
    ids, mask = left_padded(9)
    starts = [4, 5]  # row 1's prompt is columns 2..4 (two pads), its answer 5..6
    with torch.no_grad(), scale_heads(model, ALPHAS, positions="generated"):
        with generated_from(starts):
            batch = logits(model, ids, attention_mask=mask)
        with generated_from([starts[1] - 2]):
            alone = logits(model, ids[1:, 2:])
    base = logits(model, ids, attention_mask=mask)
    # padded vs alone: other GEMM shapes and softmax widths, float32 rounding
    torch.testing.assert_close(batch[1, 2:], alone[0], rtol=0, atol=FLOAT32_ATOL)
    for row, start in enumerate(starts):
        real = mask[row, :start].bool()  # a pad's own logits are noise (it attends anywhere)
        assert torch.equal(batch[row, :start][real], base[row, :start][real])
        assert not torch.equal(batch[row, start], base[row, start])
    # generation: each row of the left-padded batch as if generated alone
    with scale_heads(model, ALPHAS, positions="generated"):
        together = greedy(model, ids, mask, True)
        single = greedy(model, ids[1:, 2:], mask[1:, 2:], True)
    assert torch.equal(together[1, 7:], single[0, 5:])


# ------------------------------------------------------------------ housekeeping and errors


def test_hooks_and_the_generate_wrapper_are_removed_even_after_an_error(mistral):
    before = mistral.generate
    with pytest.raises(RuntimeError, match="boom"):
        with scale_heads(mistral, ALPHAS, positions="generated"):
            assert "generate" in mistral.__dict__
            raise RuntimeError("boom")
    assert "generate" not in mistral.__dict__ and mistral.generate == before
    assert not mistral._forward_pre_hooks and not mistral._forward_hooks
    assert all(not m._forward_pre_hooks for m in mistral.modules())


@pytest.mark.parametrize(
    ("positions", "message"),
    [
        ("answers", "positions must be one of all, prompt, generated, image, text"),
        (torch.ones(2, 7), "a position mask must be a boolean tensor of shape"),
        (3, "positions must be a rule name, a boolean mask or a callable, got int"),
        ("image", "positions='image' needs a vision-language model: mistral is not"),
    ],
)
def test_bad_rules_are_one_line_errors(mistral, positions, message):
    with pytest.raises(ValueError, match=message):
        with scale_heads(mistral, ALPHAS, positions=positions):
            pass


def test_masks_that_do_not_fit_and_submodule_calls_are_clear_errors(mistral):
    ids = ids_of(10)
    with scale_heads(mistral, ALPHAS, positions=torch.ones(2, 5, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"the position mask is \(2, 5\) but the forward"):
            logits(mistral, ids)
    with scale_heads(mistral, ALPHAS, positions="generated"):
        with pytest.raises(RuntimeError, match="needs the model's own forward"):
            with torch.no_grad():
                mistral.model(input_ids=ids)
    with scale_heads(mistral, ALPHAS, positions=lambda rows, columns: columns):
        with pytest.raises(ValueError, match="must return booleans, got torch.int64"):
            logits(mistral, ids)


def test_steer_passes_the_rule_on(mistral):
    ids = ids_of(11)
    with scale_heads(mistral, dict.fromkeys(ALPHAS, -1.0), positions="generated"):
        with generated_from([4, 4]):
            expected = logits(mistral, ids)
    with steer(mistral, list(ALPHAS), -1.0, positions="generated"), generated_from([4, 4]):
        assert torch.equal(logits(mistral, ids), expected)


def test_the_command_line_rules_are_rules():
    from somp_ref.cli_options import INTERVENE_POSITIONS

    assert set(INTERVENE_POSITIONS) <= set(POSITION_RULES)
    assert INTERVENE_POSITIONS[0] == POSITION_RULES[0] == "all"


# ------------------------------------------------------------------ the command line


def test_the_selection_study_refuses_a_position_rule(tmp_path, capsys):
    from somp_ref.cli import main

    argv = ["experiment", "study", "--intervene-positions", "generated"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--intervene-positions applies to the experiments, not to the selection study" in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("rule", ["generated", "prompt"])
def test_the_rule_reaches_the_experiment_and_generate(rule, tmp_path, monkeypatch, capsys):
    import numpy as np

    from somp_ref.adapters import commands, experiment, experiment_commands, generation, intervene
    from somp_ref.cli import main
    from somp_ref.heads import HeadScores

    seen = {}
    model = tiny_mistral(VOCAB)
    model.somp_ref_model_id = "tiny"
    for module in (commands, experiment_commands):
        monkeypatch.setattr(module, "load", lambda args: (model, None))

    def run_task(model, tokenizer, task, settings, out):
        seen["experiment"] = settings.intervene_positions
        raise ValueError("recorded")

    def scale(model, alphas, *, positions):
        seen["generate"] = positions
        raise ValueError("recorded")

    monkeypatch.setattr(experiment, "run_task", run_task)
    monkeypatch.setattr(intervene, "scale_heads", scale)
    monkeypatch.setattr(generation, "generate", lambda *args, **kwargs: [""])
    ranking = tmp_path / "ranking.csv"
    scores = np.array([[0.5, 0.2, 0.1, 0.0], [0.3, 0.2, 0.1, 0.0]])
    HeadScores(scores, {}, {}, "somp", {}, np.zeros(0, dtype=np.int64)).to_csv(ranking)
    flag = ["--intervene-positions", rule]
    out = str(tmp_path / "out")
    assert main(["experiment", "colors", *flag, "--out", out]) == 2
    assert main(["generate", "--heads", str(ranking), "--top", "2", *flag, "hi"]) == 2
    assert seen == {"experiment": rule, "generate": rule}
    assert capsys.readouterr().err.count("error: recorded") == 2


# ------------------------------------------------------------------ the embedded model


@pytest.fixture(scope="module")
def smollm():
    from somp_ref.adapters.models import load_model

    return load_model("default")


PROMPTS = [
    "Describe the color of a ripe banana.",
    "What is 7 plus 5?",
    "Name a day of the week.",
    "What color is the sky on a clear day?",
]
#: Eight heads of the late layers, flipped: enough to change the answers.
SMOLLM_HEADS = {(16, 3), (18, 2), (23, 4), (23, 7), (26, 1), (29, 0), (29, 5), (12, 2)}


@pytest.mark.model
@pytest.mark.parametrize("rule", TEXT_RULES)
def test_embedded_model_same_text_with_and_without_cache_and_in_any_batch(smollm, rule):
    from somp_ref.adapters.generation import generate

    model, tokenizer = smollm
    options = {"max_new_tokens": 12, "batch_size": 4}
    base = generate(model, tokenizer, PROMPTS, **options)
    with steer(model, SMOLLM_HEADS, -1.0, positions=rule):
        cached = generate(model, tokenizer, PROMPTS, **options)
        recomputed = generate(model, tokenizer, PROMPTS, use_cache=False, **options)
        one_by_one = generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=1)
    assert cached == recomputed == one_by_one
    assert cached != base


@pytest.mark.model
def test_experiment_scales_the_answers_only_and_measures_the_whole_answer(smollm, tmp_path):
    from dataclasses import replace

    from somp_ref.adapters.experiment import Settings, run_task
    from somp_ref.adapters.report import format_table
    from somp_ref.adapters.tasks import Split, build_task

    task = build_task("colors")
    cut = Split(task.test.target[:4], [], task.test.neutral[:4])
    task = replace(task, train=task.train[:8], validation=cut, test=cut)
    settings = Settings(
        ks=(8,), n_random=1, n_generate=2, n_neutral=4, method="ll", intervene_positions="generated"
    )
    model, tokenizer = smollm
    result = run_task(model, tokenizer, task, settings, tmp_path, show_progress=False)
    assert result["settings"]["intervene_positions"] == "generated"
    for condition in result["conditions"]:
        # The prompt's positions are untouched, so the first answer token's distribution is
        # the unmodified model's, exactly; the rest of the answer is not.
        assert condition["values"]["kl_first"] == [0.0] * 4, condition["method"]
    assert max(max(c["values"]["kl"]) for c in result["conditions"]) > 0.0
    assert "alpha -1 at generated positions" in format_table(result).splitlines()[0]
