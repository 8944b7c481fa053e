"""The command line, called in-process."""

from __future__ import annotations

import argparse
import importlib.util

import numpy as np
import pytest

from somp_ref import cli_options, cli_types
from somp_ref.cli import build_parser, main
from somp_ref.ranking import DEFAULT_METHOD, METHODS


def test_demo_ranks_planted_heads_first(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "planted heads ranked first: yes" in out
    table = out.splitlines()[1:4]
    assert all(" yes " in line for line in table), table


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_help_lists_demo(capsys):
    with pytest.raises(SystemExit, match="0"):
        main(["--help"])
    assert "demo" in capsys.readouterr().out


def test_rank_writes_csv_json_and_prints_the_table(tmp_path, capsys):
    from stores import write_planted_store

    from somp_ref.heads import HeadScores

    store = write_planted_store(tmp_path / "store")
    words = tmp_path / "concept.txt"
    words.write_text("red\ngreen\nblue\nyellow\npurple\nmauve\n")
    out, js = tmp_path / "scores.csv", tmp_path / "scores.json"
    status = main(
        [
            "rank",
            str(store.path),
            "--concept",
            str(words),
            "--method",
            "somp",
            "--atoms",
            "5",
            "--out",
            str(out),
            "--json-out",
            str(js),
            "--show",
            "3",
        ]
    )
    captured = capsys.readouterr()
    assert status == 0
    # The concept's report comes first on stdout, then the table; stderr stays empty (no
    # progress bars off a terminal), so that an error is the only line there.
    report, header, best = captured.out.splitlines()[:3]
    assert report.endswith("5 words -> 5 tokens; dropped 1 (no single-token form): mauve")
    assert captured.err == ""
    assert set(top_heads_of(HeadScores.from_csv(out))) == {(1, 2), (2, 0)}
    assert HeadScores.from_json(js).params["n_atoms"] == 5
    assert best.split()[1] in {"1.2", "2.0"}


def top_heads_of(scores):
    from somp_ref.heads import top_heads

    return top_heads(scores, 2)


def test_inspect_summary_and_signature(tmp_path, capsys):
    from stores import write_planted_store

    store = write_planted_store(tmp_path / "store")
    assert main(["inspect", str(store.path)]) == 0
    assert "3 layers x 4 heads, d_head 6, d_model 24" in capsys.readouterr().out
    assert main(["inspect", str(store.path), "--head", "1.2", "--atoms", "5"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("'red'", "'green'", "'blue'"))


def test_cli_reports_bad_stores_without_traceback(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert "somp-ref inspect: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["inspect", str(tmp_path), "--head", "12"])
    assert "a head is LAYER.HEAD" in capsys.readouterr().err


def test_adapter_commands_answer_with_the_install_line_without_torch(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    assert main(["export", "--prompts", "builtin:colors", "--out", "x"]) == 2
    assert "pip install torch==2.13.0 'somp-ref[hf]'" in capsys.readouterr().err


def test_experiment_help_teaches_the_options(capsys):
    with pytest.raises(SystemExit, match="0"):
        main(["experiment", "--help"])
    out = capsys.readouterr().out
    for word in ("--method", "--k", "specificity", "--exclude-layers", "--random", "countries"):
        assert word in out


# ------------------------------------------------------------------ the flags themselves

#: The subcommands that load a model, and the flags that say which and how.
MODEL_COMMANDS = ("export", "generate", "experiment", "verify")
MODEL_FLAGS = (
    "--model",
    "--revision",
    "--device",
    "--dtype",
    "--device-map",
    "--offload-folder",
    "--attn-implementation",
)


def subcommand_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every subcommand's parser, as the command line builds them ("store merge" for the
    actions of ``store``)."""
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    found = {}
    for name, command in subparsers.choices.items():
        found[name] = command
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                found |= {f"{name} {sub}": p for sub, p in action.choices.items()}
    return found


def flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Option string -> its action, help left out."""
    return {
        flag: action
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction)
        for flag in action.option_strings
    }


def meaning(action: argparse.Action) -> tuple:
    """What a flag does, its wording and default apart: where the value goes, how it is
    parsed and what it may be."""
    choices = None if action.choices is None else tuple(action.choices)
    return (action.dest, type(action).__name__, action.type, choices, action.nargs, action.const)


def conflicts(parsers: dict[str, argparse.ArgumentParser]) -> list[str]:
    """Flag names with more than one meaning across ``parsers``, and values (dests) reached
    through more than one flag name."""
    meanings: dict[str, dict[tuple, list[str]]] = {}
    names: dict[str, set[str]] = {}
    for command, parser in parsers.items():
        for flag, action in flag_actions(parser).items():
            meanings.setdefault(flag, {}).setdefault(meaning(action), []).append(command)
            names.setdefault(action.dest, set()).add(action.option_strings[0])  # not aliases
    found = [
        f"{flag}: " + " | ".join(f"{'/'.join(cmds)} {m}" for m, cmds in seen.items())
        for flag, seen in meanings.items()
        if len(seen) > 1
    ]
    found += [
        f"{dest} is set by {sorted(flags)}" for dest, flags in names.items() if len(flags) > 1
    ]
    return found


def test_every_flag_name_has_one_meaning_across_the_subcommands():
    parsers = subcommand_parsers(build_parser())
    assert {"demo", "rank", "inspect", "export", "generate", "experiment", "verify"} <= set(parsers)
    assert conflicts(parsers) == []


def test_the_one_meaning_check_sees_a_conflict():
    # The check above must be able to fail: two commands where --heads means two things.
    ranking, counts = argparse.ArgumentParser(), argparse.ArgumentParser()
    ranking.add_argument("--heads", help="a ranking file")
    counts.add_argument("--heads", type=cli_types.k_list, help="values of k")
    counts.add_argument("--k", dest="heads", type=cli_types.k_list, help="values of k")
    found = conflicts({"generate": ranking, "experiment": counts})
    assert len(found) == 2 and found[0].startswith("--heads: generate (")
    assert found[1] == "heads is set by ['--heads', '--k']"


def test_shared_flags_have_one_definition_and_the_documented_defaults():
    parsers = subcommand_parsers(build_parser())
    flags = {command: flag_actions(parser) for command, parser in parsers.items()}
    for command in ("rank", "export", "experiment"):
        method = flags[command]["--method"]
        assert tuple(method.choices) == METHODS, command
        assert f"{DEFAULT_METHOD})" in method.help.split("(default: ")[-1], command
    for command in ("rank", "export"):
        assert flags[command]["--method"].default == DEFAULT_METHOD, command
    # experiment's default is the study's verdict where the run makes one (None: not given).
    assert flags["experiment"]["--method"].default is None
    assert "the selection study's verdict" in flags["experiment"]["--method"].help
    # Every ranking is explained in --help, not merely named.
    assert set(cli_options.METHOD_HELP) == set(METHODS)
    for command in ("demo", "rank", "inspect", "export", "experiment"):
        assert flags[command]["--atoms"].default == 50, command
    for command in ("rank", "export", "experiment"):
        assert flags[command]["--exclude-layers"].type is cli_types.layer_list, command
    for command in MODEL_COMMANDS:
        assert set(MODEL_FLAGS) <= set(flags[command]), command
    assert flags["verify"]["--model"].default == "default"
    assert set(flags["generate"]) >= {"--heads", "--top"}
    assert flags["experiment"]["--k"].default == [3, 8, 16]
    for command in ("export", "generate"):  # the commands that tokenize prompts
        chat = flags[command]["--chat-template"]
        assert flags[command]["--no-chat-template"] is chat and chat.default is None, command
    assert wordings(subcommand_parsers(build_parser())) == []


def wordings(parsers: dict[str, argparse.ArgumentParser]) -> list[str]:
    """Flag names whose help or default differs between ``parsers``, but for those
    :data:`somp_ref.cli_options.WORDED_PER_COMMAND` lets each command word for itself."""
    seen: dict[str, dict[tuple, list[str]]] = {}
    for command, parser in parsers.items():
        for flag, action in flag_actions(parser).items():
            wording = (action.help, repr(action.default))
            seen.setdefault(flag, {}).setdefault(wording, []).append(command)
    return [
        f"{flag}: " + " | ".join(f"{'/'.join(cmds)} {w}" for w, cmds in found.items())
        for flag, found in seen.items()
        if len(found) > 1 and flag not in cli_options.WORDED_PER_COMMAND
    ]


def test_the_one_wording_check_sees_a_second_wording():
    one, other = argparse.ArgumentParser(), argparse.ArgumentParser()
    one.add_argument("--json", action="store_true", help="print JSON (default: tables)")
    other.add_argument("--json", action="store_true", help="print JSON (default: a table)")
    other.add_argument("--out", help="what this one writes (required)")
    one.add_argument("--out", help="what that one writes (required)")
    assert [line.partition(":")[0] for line in wordings({"a": one, "b": other})] == ["--json"]


def test_flags_worded_per_command_are_shared_and_say_why():
    parsers = subcommand_parsers(build_parser())
    commands_of = {}
    for command, parser in parsers.items():
        for flag in flag_actions(parser):
            commands_of.setdefault(flag, set()).add(command)
    for flag, why in cli_options.WORDED_PER_COMMAND.items():
        assert len(commands_of.get(flag, ())) > 1 and why, flag


def test_the_api_and_the_command_line_default_alike():
    import inspect

    from somp_ref import ranking

    flags = {command: flag_actions(p) for command, p in subcommand_parsers(build_parser()).items()}
    functions = (ranking.rank_heads, ranking.rank, ranking.specificity_scores)
    for function in (*functions, ranking.head_signature):
        assert inspect.signature(function).parameters["n_atoms"].default == 50, function
    assert inspect.signature(ranking.rank_heads).parameters["n_null"].default == 6
    assert ranking.DEFAULT_ATOMS == 50  # the paper's
    assert ranking.DEFAULT_NULL == 6  # the README's selection study was measured with it
    assert inspect.signature(ranking.rank).parameters["method"].default == DEFAULT_METHOD
    for command in ("demo", "rank", "inspect", "export", "experiment"):
        assert flags[command]["--atoms"].default == ranking.DEFAULT_ATOMS, command
    for command in ("rank", "export", "experiment"):
        assert flags[command]["--null"].default == ranking.DEFAULT_NULL, command
    for command in ("rank", "export"):
        assert flags[command]["--method"].default == DEFAULT_METHOD, command


def test_the_experiments_settings_default_as_the_command_line():
    pytest.importorskip("torch")
    import dataclasses

    from somp_ref.adapters.experiment import Settings

    defaults = {field.name: field.default for field in dataclasses.fields(Settings)}
    flags = flag_actions(subcommand_parsers(build_parser())["experiment"])
    for field, flag in [
        ("atoms", "--atoms"),
        ("n_null", "--null"),
        ("n_random", "--random"),
        ("positions", "--positions"),
        ("intervene_positions", "--intervene-positions"),
        ("seed", "--seed"),
        ("batch_size", "--batch-size"),
    ]:
        assert defaults[field] == flags[flag].default, field


@pytest.mark.parametrize(
    "command, flag",
    [
        ("experiment", "--intervene-positions"),
        ("generate", "--intervene-positions"),
        ("export", "--positions"),
        ("experiment", "--positions"),
    ],
)
def test_help_explains_each_position_rule_in_a_line_of_its_own(command, flag, capsys):
    explained = {
        "--intervene-positions": cli_options.INTERVENE_POSITION_HELP,
        "--positions": cli_options.EXPORT_POSITION_HELP,
    }[flag]
    action = flag_actions(subcommand_parsers(build_parser())[command])[flag]
    assert tuple(action.choices) == tuple(explained) and action.default == action.choices[0]
    with pytest.raises(SystemExit, match="0"):
        main([command, "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse rewraps the help
    for rule, text in explained.items():
        assert f"{rule} = {text}" in action.help, (command, rule)
        assert f"{rule} = {' '.join(text.split())}" in shown, (command, rule)


def test_the_interventions_rule_help_is_the_command_lines():
    intervene = pytest.importorskip("somp_ref.adapters.intervene")
    assert cli_options.INTERVENE_POSITIONS == ("all", "prompt", "generated")
    for rule, text in cli_options.INTERVENE_POSITION_HELP.items():
        assert intervene.POSITION_RULE_HELP[rule] is text, rule
    assert set(intervene.POSITION_RULE_HELP) == set(intervene.POSITION_RULES)


def test_the_dtype_choices_are_the_ones_the_loader_accepts():
    from somp_ref.adapters import models

    assert cli_options.DTYPES == models.DTYPES


def test_every_help_says_what_each_flag_does_its_default_and_shows_an_example():
    for command, parser in subcommand_parsers(build_parser()).items():
        assert parser.description and "example" in (parser.epilog or ""), command
        for flag, action in flag_actions(parser).items():
            text = action.help or ""
            assert text and "\n" not in text, (command, flag)
            assert "(default" in text or "(required)" in text, (command, flag, text)
            assert ("(required)" in text) == action.required, (command, flag, text)


def test_the_ranking_flags_reach_the_ranking(tmp_path, monkeypatch):
    from stores import write_planted_store

    import somp_ref.ranking

    store = write_planted_store(tmp_path / "store")
    seen = {}

    def record(store, token_ids, **options):
        seen.update(options)
        raise ValueError("recorded")

    monkeypatch.setattr(somp_ref.ranking, "rank_heads", record)
    argv = "--method ll --atoms 7 --criterion l2 --null 3 --seed 4 --layers 0-2 --exclude-layers 1"
    out = str(tmp_path / "o.csv")
    assert main(["rank", str(store.path), "--concept", "colors", "--out", out, *argv.split()]) == 2
    assert seen == {
        "method": "ll",
        "n_atoms": 7,
        "criterion": "l2",
        "n_null": 3,
        "seed": 4,
        "layers": [0, 1, 2],
        "exclude_layers": [1],
    }


needs_hf = pytest.mark.skipif(
    not all(importlib.util.find_spec(name) for name in ("torch", "transformers")),
    reason="needs the hf extra",
)


@needs_hf
@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_the_model_flags_reach_the_loader(command, tmp_path, monkeypatch, capsys):
    from somp_ref.adapters import models
    from somp_ref.heads import HeadScores

    seen = {}

    def record(name, **options):
        seen.update(options, name=name)
        raise models.ModelLoadError("recorded")

    monkeypatch.setattr(models, "load_model", record)
    ranking = tmp_path / "ranking.csv"
    HeadScores(np.array([[0.5, 0.2]]), {}, {}, "somp", {}, np.zeros(0, dtype=np.int64)).to_csv(
        ranking
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Describe a lemon.\n")
    out = str(tmp_path / "out")
    argv = {
        "export": ["export", "--prompts", str(prompts), "--out", out],
        "generate": ["generate", "--heads", str(ranking), "--top", "2", "hi"],
        "experiment": ["experiment", "colors", "--generate", "2", "--out", out],
        "verify": ["verify"],  # the numpy checks run first, then the model loads
    }[command]
    flags = ["--model", "someone/model", "--revision", "v2", "--device", "meta"]
    flags += ["--dtype", "bfloat16", "--attn-implementation", "sdpa"]
    assert main([*argv, *flags]) == 2
    assert capsys.readouterr().err == f"somp-ref {command}: error: recorded\n"
    assert seen == {
        "name": "someone/model",
        "revision": "v2",
        "device": "meta",
        "device_map": None,
        "offload_folder": None,
        "dtype": "bfloat16",
        "attn_implementation": "sdpa",
    }


@needs_hf
@pytest.mark.parametrize(
    "argv, message",
    [
        (
            "export --rank-concept colors --layers 1-5",
            "--layers: the model has layers 0-1, got 2,3",
        ),
        ("export --rank-concept colors --exclude-layers 2", "--exclude-layers: the model has"),
        ("experiment colors --generate 2 --exclude-layers 7", "layers 0-1, got 7"),
    ],
)
def test_layers_the_model_lacks_fail_before_any_forward_pass(
    argv, message, tmp_path, monkeypatch, capsys
):
    from models import tiny_mistral

    from somp_ref.adapters import models

    monkeypatch.setattr(models, "load_model", lambda name, **options: (tiny_mistral(64), None))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Describe a lemon.\n")
    words = argv.split()
    if words[0] == "export":
        words += ["--prompts", str(prompts)]
    assert main([*words, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"somp-ref {words[0]}: error: ") and message in err, err
    assert not (tmp_path / "out" / "meta.json").exists()


def test_the_export_command_offers_the_exports_position_rules():
    pytest.importorskip("torch")
    from somp_ref.adapters.head_export import POSITIONS
    from somp_ref.cli_options import EXPORT_POSITIONS

    assert EXPORT_POSITIONS == POSITIONS


# ------------------------------------------------------------------ the chat template

#: A chat template a word-level tokenizer can encode: the prompt between two marker words.
TEMPLATE = "{% for m in messages %}w1 {{ m['content'] }} w2{% endfor %}"


def word_tokenizer(template: str | None):
    """A word-level tokenizer of w0..w49 (and [PAD], [UNK], [EOS]), with ``template`` as its
    chat template (None: it has none)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "[EOS]", *(f"w{i}" for i in range(50))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )
    tokenizer.chat_template = template
    return tokenizer


@needs_hf
@pytest.mark.parametrize(
    "template, flags, expected",
    [
        (TEMPLATE, [], True),  # the default: the template, the tokenizer having one
        (None, [], False),  # ... raw text, it having none
        (TEMPLATE, ["--no-chat-template"], False),
        (TEMPLATE, ["--chat-template"], True),
    ],
    ids=["template-by-default", "raw-without-one", "no-chat-template", "chat-template"],
)
def test_export_and_generate_use_the_chat_template_alike(
    template, flags, expected, tmp_path, monkeypatch, capsys
):
    from models import tiny_mistral

    from somp_ref.adapters import commands, generation
    from somp_ref.heads import HeadScores
    from somp_ref.store import ActivationStore

    tokenizer = word_tokenizer(template)
    model = tiny_mistral(len(tokenizer))
    model.somp_ref_model_id = "tiny"
    monkeypatch.setattr(commands, "load", lambda args: (model, tokenizer))
    seen = []
    monkeypatch.setattr(
        generation,
        "generate",
        lambda *args, chat_template, **kw: seen.append(chat_template) or [""],
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w3 w4 w5\nw6 w7\n")
    out = tmp_path / "store"
    assert main(["export", "--prompts", str(prompts), "--out", str(out), *flags]) == 0
    store = ActivationStore.open(out)
    assert store.meta["chat_template"] is expected
    assert store.n_samples == 2  # prompt-mean: the prompt's own tokens, template or not
    ranking = tmp_path / "ranking.csv"
    HeadScores(np.ones((2, 4)), {}, {}, "somp", {}, np.zeros(0, dtype=np.int64)).to_csv(ranking)
    assert main(["generate", "--heads", str(ranking), "--top", "1", *flags, "w3"]) == 0
    assert seen == [expected, expected]  # without and with the heads scaled


@needs_hf
@pytest.mark.parametrize("template", [TEMPLATE, None])
def test_python_generate_defaults_to_the_template_as_export_does(template):
    from models import tiny_mistral

    from somp_ref.adapters.generation import generate
    from somp_ref.adapters.tokenization import resolve_chat_template

    tokenizer = word_tokenizer(template)
    model = tiny_mistral(len(tokenizer))
    options = {"max_new_tokens": 3}
    said = generate(
        model, tokenizer, ["w3 w4", "w5"], chat_template=template is not None, **options
    )
    assert generate(model, tokenizer, ["w3 w4", "w5"], **options) == said
    assert resolve_chat_template(tokenizer, None) is (template is not None)


@needs_hf
def test_a_chat_template_the_tokenizer_lacks_is_an_error(tmp_path, monkeypatch, capsys):
    from models import tiny_mistral

    from somp_ref.adapters import commands

    tokenizer = word_tokenizer(None)
    monkeypatch.setattr(commands, "load", lambda args: (tiny_mistral(len(tokenizer)), tokenizer))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w3 w4\n")
    argv = ["export", "--prompts", str(prompts), "--out", str(tmp_path / "s"), "--chat-template"]
    assert main(argv) == 2
    assert "the tokenizer has no chat template" in capsys.readouterr().err


def test_generate_says_what_replaced_raw(capsys):
    with pytest.raises(SystemExit, match="2"):
        main(["generate", "--heads", "r.csv", "--raw", "hi"])
    assert "--raw is now --no-chat-template" in capsys.readouterr().err


def test_the_help_says_what_the_flags_do_in_each_command(capsys):
    helps = {}
    for command in ("experiment", "export", "generate"):
        with pytest.raises(SystemExit, match="0"):
            main([command, "--help"])
        helps[command] = " ".join(capsys.readouterr().out.split())
    assert "--random N (default 10) random head sets" in helps["experiment"]
    assert "--method" in helps["experiment"] and "primary ranking" in helps["experiment"]
    assert "somp and ll are always ranked" in helps["experiment"]
    assert "only with --rank-concept" in helps["export"]
    for command in ("export", "generate"):
        assert "default: main" not in helps[command]
        assert "--chat-template, --no-chat-template" in helps[command]
    assert flag_actions(subcommand_parsers(build_parser())["export"])["--revision"].default is None
