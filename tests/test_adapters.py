"""Adapters on real weights (the embedded SmolLM2) and on a tiny random Mistral.

Parity checks follow TransformerLens's: float32 eager attention, per-layer comparisons with a
named noise floor and the max difference in the message, and a check that our hook ran.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from models import tiny_mistral  # noqa: E402

from somp_ref.adapters.capture import capture_z  # noqa: E402
from somp_ref.adapters.families import UnsupportedModelError, family_of  # noqa: E402
from somp_ref.adapters.generation import generate  # noqa: E402
from somp_ref.adapters.head_export import export_activations  # noqa: E402
from somp_ref.adapters.intervene import scale_heads  # noqa: E402
from somp_ref.adapters.model_heads import model_heads  # noqa: E402
from somp_ref.adapters.tokenization import encode  # noqa: E402
from somp_ref.store import ActivationStore  # noqa: E402

pytestmark = pytest.mark.model

#: Summing head contributions in float32 against one o_proj GEMM: both accumulate
#: n_heads * d_head products in a different order, so they differ by a few float32 ulps of
#: the output's magnitude (eps32 = 1.2e-7; 576 terms).
FLOAT32_REL = 1e-5
#: The same in float64 (eps64 = 2.2e-16).
FLOAT64_REL = 1e-12
#: Stored rows from different batchings/paddings: the attention and MLP GEMMs see different
#: shapes, hence other blockings and summation orders; float32 rounding through 30 layers.
EXPORT_REL = 2e-4

PROMPTS = [
    "Describe the color of a ripe banana.",
    "What is the capital of Italy?",
    "Hi",
    "Write one sentence about the sea at night, please.",
    "Name a country in South America.",
    "Two plus two equals",
    "The quick brown fox jumps over the lazy dog because it is",
    "Red, green and",
    "Tell me about penguins.",
]


@pytest.fixture(scope="module")
def smollm():
    from somp_ref.adapters.models import load_model

    return load_model("default")


@pytest.fixture(scope="module")
def mistral(smollm):
    _, tokenizer = smollm
    return tiny_mistral(len(tokenizer)), tokenizer


@pytest.fixture(params=["smollm", "mistral"])
def any_model(request):
    return request.getfixturevalue(request.param)


def logits_of(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_head_contributions_sum_to_o_proj_output(any_model):
    model, tokenizer = any_model
    batch = encode(tokenizer, PROMPTS[:4], chat_template=False)
    heads = model_heads(model)
    outputs = {}
    handles = [
        m.register_forward_hook(lambda mod, a, out, i=i: outputs.__setitem__(i, out))
        for i, m in enumerate(heads.o_proj)
    ]
    try:
        with capture_z(model) as captured:
            logits_of(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    assert len(captured) == heads.n_layers  # our hook ran on every layer
    for layer, module in enumerate(heads.o_proj):
        W = module.weight.detach().reshape(heads.d_model, heads.n_heads, heads.d_head)
        per_head = torch.einsum("bphd,mhd->bphm", captured[layer], W)
        total = per_head.sum(dim=2)
        diff = (total - outputs[layer]).abs().max().item()
        scale = outputs[layer].abs().max().item()
        assert diff <= FLOAT32_REL * scale, f"layer {layer}: max diff {diff:.3e} (scale {scale})"


def test_decomposition_is_exact_to_float64_rounding(mistral):
    _, tokenizer = mistral
    model = tiny_mistral(len(tokenizer), dtype=torch.float64)
    batch = encode(tokenizer, PROMPTS[:1], chat_template=False)  # unpadded
    module = model_heads(model).o_proj[1]
    seen = {}
    handle = module.register_forward_hook(lambda mod, a, out: seen.setdefault("out", out))
    try:
        with capture_z(model) as captured:
            logits_of(model, batch)
    finally:
        handle.remove()
    W = module.weight.detach().reshape(32, 4, 8)
    total = torch.einsum("bphd,mhd->bpm", captured[1], W)
    diff = (total - seen["out"]).abs().max().item()
    assert diff <= FLOAT64_REL * seen["out"].abs().max().item(), f"max diff {diff:.3e}"


def test_alpha_one_is_bit_identical_and_hooks_run(any_model):
    model, tokenizer = any_model
    heads = model_heads(model)
    batch = encode(tokenizer, PROMPTS, chat_template=False)
    before = logits_of(model, batch)
    every_head = {
        (layer, head): 1.0 for layer in range(heads.n_layers) for head in range(heads.n_heads)
    }
    with scale_heads(model, every_head) as calls:
        during = logits_of(model, batch)
    assert all(count == 1 for count in calls.values()) and len(calls) == heads.n_layers
    assert torch.equal(before, during)


def test_alpha_zero_equals_zeroing_the_heads_o_proj_columns(any_model):
    model, tokenizer = any_model
    heads = model_heads(model)
    chosen = [(0, 1), (1, heads.n_heads - 1), (heads.n_layers - 1, 0)]
    batch = encode(tokenizer, PROMPTS[:5], chat_template=False)
    with scale_heads(model, {head: 0.0 for head in chosen}):
        ablated = logits_of(model, batch)
    edited = copy.deepcopy(model)
    with torch.no_grad():
        for layer, head in chosen:
            model_heads(edited).o_proj[layer].weight[:, heads.columns(head)] = 0.0
    expected = logits_of(edited, batch)
    diff = (ablated - expected).abs().max().item()
    assert diff <= FLOAT32_REL * expected.abs().max().item(), f"max diff {diff:.3e}"
    assert not torch.allclose(ablated, logits_of(model, batch))  # it did change something


def test_hooks_are_removed_after_an_exception(any_model):
    model, _ = any_model
    modules = model_heads(model).o_proj
    before = [len(m._forward_pre_hooks) for m in modules]
    with pytest.raises(RuntimeError, match="inside"):
        with scale_heads(model, {(0, 0): -1.0, (1, 1): 5.0}):
            assert len(modules[0]._forward_pre_hooks) == before[0] + 1
            raise RuntimeError("inside")
    with pytest.raises(RuntimeError, match="inside"):
        with capture_z(model):
            raise RuntimeError("inside")
    assert [len(m._forward_pre_hooks) for m in modules] == before


def test_bad_heads_are_refused(any_model):
    model, _ = any_model
    with pytest.raises(ValueError, match=r"head \(99, 0\) is outside"):
        with scale_heads(model, {(99, 0): 0.0}):
            pass


def test_generate_with_kv_cache_matches_hooks_and_weight_edits(any_model):
    model, tokenizer = any_model
    prompts = PROMPTS[:3]
    baseline = generate(model, tokenizer, prompts, max_new_tokens=8, chat_template=False)
    with scale_heads(model, {(0, 0): 1.0}):
        same = generate(model, tokenizer, prompts, max_new_tokens=8, chat_template=False)
    assert same == baseline
    heads = model_heads(model)
    chosen = [(layer, 0) for layer in range(heads.n_layers)]
    with scale_heads(model, {head: 0.0 for head in chosen}):
        ablated = generate(model, tokenizer, prompts, max_new_tokens=8, chat_template=False)
    edited = copy.deepcopy(model)
    with torch.no_grad():
        for layer, _ in chosen:
            model_heads(edited).o_proj[layer].weight[:, heads.columns(0)] = 0.0
    assert ablated == generate(edited, tokenizer, prompts, max_new_tokens=8, chat_template=False)


def test_generation_does_not_depend_on_batching(smollm):
    model, tokenizer = smollm
    together = generate(model, tokenizer, PROMPTS[:4], max_new_tokens=6, batch_size=4)
    alone = [generate(model, tokenizer, [p], max_new_tokens=6)[0] for p in PROMPTS[:4]]
    assert together == alone


@pytest.mark.parametrize("positions", ["prompt-mean", "last", "mean", "all"])
def test_export_rows_do_not_depend_on_batch_size_or_padding(any_model, tmp_path, positions):
    model, tokenizer = any_model
    records = [{"prompt": p, "i": i} for i, p in enumerate(PROMPTS)]
    stores = [
        export_activations(
            model,
            tokenizer,
            records,
            tmp_path / f"s{bs}{side}",
            positions=positions,
            batch_size=bs,
            padding_side=side,
            chat_template=False,  # raw text: the rows counted below are the prompts' tokens
            show_progress=False,
        )
        for bs, side in [(1, "left"), (7, "left"), (7, "right")]
    ]
    reference = stores[0]
    for other in stores[1:]:
        assert other.samples() == reference.samples()
        for layer in range(reference.n_layers):
            a, b = reference.layer(layer)[0], other.layer(layer)[0]
            diff = np.abs(a - b).max()
            assert diff <= EXPORT_REL * np.abs(a).max(), f"layer {layer}: {diff:.3e}"
    if positions == "all":
        lengths = [len(tokenizer(p)["input_ids"]) for p in PROMPTS]
        assert reference.n_samples == sum(lengths)


def test_export_records_weights_unembedding_and_vocab(smollm, tmp_path):
    model, tokenizer = smollm
    store = export_activations(
        model, tokenizer, [{"prompt": p} for p in PROMPTS[:2]], tmp_path / "s", show_progress=False
    )
    heads = model_heads(model)
    assert (store.n_layers, store.n_heads, store.d_head, store.d_model) == (
        heads.n_layers,
        heads.n_heads,
        heads.d_head,
        heads.d_model,
    )
    assert np.array_equal(store.layer(3)[1], model_heads(model).o_proj[3].weight.detach().numpy())
    assert np.array_equal(store.unembed(), model.lm_head.weight.detach().numpy())
    assert store.final_norm() is not None
    vocab = store.vocab()
    assert len(vocab) == store.unembed().shape[0]
    assert vocab[tokenizer.encode(" red", add_special_tokens=False)[0]] == " red"
    assert store.meta["family"] == "llama" and store.meta["positions"] == "prompt-mean"
    assert store.meta["chat_template"] is True  # the default: SmolLM2's tokenizer has one


def test_prompt_mean_rows_average_the_prompts_own_tokens(smollm, tmp_path):
    # The paper's rows: a head's output averaged over the prompt's tokens; the chat
    # template's role markers and the assistant header are not the prompt.
    from somp_ref.adapters.tokenization import encode, prompt_token_mask

    model, tokenizer = smollm
    prompts = PROMPTS[:4]
    batch = encode(tokenizer, prompts, chat_template=True)
    mask = prompt_token_mask(tokenizer, prompts, batch, chat_template=True)
    for row, prompt in enumerate(prompts):
        text = tokenizer.decode(batch["input_ids"][row][mask[row]])
        assert text.strip() == prompt
    records = [{"prompt": p} for p in prompts]
    options = {"chat_template": True, "batch_size": 2, "show_progress": False}
    means = export_activations(model, tokenizer, records, tmp_path / "m", **options)
    every = export_activations(
        model, tokenizer, records, tmp_path / "a", positions="all", **options
    )
    rows = every.samples()
    for row, prompt in enumerate(prompts):
        positions = [
            i for i, r in enumerate(rows) if r["prompt"] == prompt and mask[row].nonzero().numel()
        ]
        real = batch["attention_mask"][row].bool()
        own = mask[row][real].numpy()  # the prompt's tokens among its real tokens, in order
        z_all = every.layer(7)[0][positions][own]
        np.testing.assert_allclose(
            means.layer(7)[0][row],
            z_all.mean(axis=0),
            rtol=0,
            atol=EXPORT_REL * np.abs(z_all).max(),
        )
    assert means.meta["positions"] == "prompt-mean"


def test_interrupted_export_never_reads_as_complete(smollm, tmp_path):
    model, tokenizer = smollm
    records = [{"prompt": "fine"}, {"prompt": ""}]  # the empty prompt fails mid-export
    with pytest.raises(ValueError, match=r"encodes to no tokens"):
        export_activations(
            model,
            tokenizer,
            records,
            tmp_path / "s",
            batch_size=1,
            chat_template=False,  # raw text: the empty prompt is no tokens at all
            show_progress=False,
        )
    with pytest.raises(Exception, match=r"incomplete store"):
        ActivationStore.open(tmp_path / "s")


def test_loading_leaves_third_party_progress_bars_alone(smollm):
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging

    assert logging.is_progress_bar_enabled() and not are_progress_bars_disabled()


def test_unknown_architecture_lists_supported_ones():
    import transformers

    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=10)
    model = transformers.GPT2LMHeadModel(config)
    model.config.model_type = "unlisted"  # GPT-2 itself is supported, and not Llama-like
    with pytest.raises(
        UnsupportedModelError,
        match=r"'unlisted' is not supported; supported: "
        r".*llama.*mistral",
    ):
        family_of(model)


def test_real_model_export_rank_generate_from_the_command_line(tmp_path, capsys):
    from somp_ref.cli import main

    store = tmp_path / "colors"
    export = [
        "export",
        "--model",
        "default",
        "--prompts",
        "builtin:colors",
        "--chat-template",
        "--out",
        str(store),
        "--rank-concept",
        "colors",
        "--method",
        "somp",
        "--atoms",
        "10",
    ]
    assert main(export) == 0  # also ranks with the torch port ("GPU ranking" path, on CPU)
    scores = tmp_path / "colors.csv"
    rank = ["rank", str(store), "--concept", "colors", "--method", "somp", "--atoms", "10"]
    rank += ["--out", str(scores)]
    assert main(rank) == 0
    from somp_ref.heads import HeadScores

    by_torch = HeadScores.from_csv(tmp_path / "colors-colors.csv")
    by_numpy = HeadScores.from_csv(scores)
    gap = np.nanmax(np.abs(by_torch.score - by_numpy.score))
    assert gap <= 1e-9, f"torch and numpy rankings differ by {gap:.2e}"
    rows = scores.read_text().splitlines()
    assert len(rows) == 1 + 30 * 9
    assert (
        main(
            [
                "generate",
                "--heads",
                str(scores),
                "--top",
                "3",
                "--alpha",
                "1",
                "--max-new-tokens",
                "6",
                "Describe the color of snow.",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    # alpha = 1 leaves generation unchanged: both columns of the table are the same text.
    table = [line for line in out.splitlines() if " | " in line][1:]
    assert table and all(
        left.strip() == right.strip() for left, right in (line.split(" | ") for line in table)
    )
