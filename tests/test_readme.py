"""The README's code runs as printed: a newcomer copies it first."""

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(heading: str) -> str:
    """The first ```python block under the README heading ``heading``."""
    text = README.read_text(encoding="utf-8")
    section = text.split(f"\n## {heading}\n", 1)
    assert len(section) == 2, f"README has no '## {heading}' section"
    body = section[1].split("\n## ", 1)[0]
    found = re.search(r"```python\n(.*?)```", body, re.DOTALL)
    assert found, f"README's '{heading}' section has no python block"
    return found.group(1)


def test_the_core_example_runs_and_says_what_it_claims():
    namespace: dict = {}
    exec(python_block("The core (numpy + scipy only)"), namespace)
    res, H, D = namespace["res"], namespace["H"], namespace["D"]
    # The comments' claims: explained variance starts at 0, coef @ D[support] rebuilds the
    # centered H to what the stopping rule leaves.
    assert res.explained_variance[0] == 0
    assert set(res.support[:3]) == {4, 17, 31}
    centered = H - H.mean(axis=0)
    residual = centered - res.coef @ D[res.support]
    left = np.sum(residual**2) / np.sum(centered**2)
    # explained_variance is 1 - relative residual energy; both come from the same float64
    # numbers through different sums, so they agree to a few hundred ulps.
    assert abs((1 - left) - res.explained_variance[-1]) < 1e-10


@pytest.mark.model
def test_the_python_api_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(python_block("The Python API"), namespace)
    store, scores, heads = namespace["store"], namespace["scores"], namespace["heads"]
    assert store.n_samples == len(namespace["prompts"])
    assert scores.score.shape == (store.n_layers, store.n_heads)
    assert len(heads) == 8 and len(set(heads)) == 8
    steered, plain = namespace["steered"], namespace["plain"]
    # Flipping eight heads changes the model's greedy answer to the prompt (the README
    # prints both); a no-op steer would leave it byte-identical.
    assert steered != plain


def test_the_large_models_commands_use_flags_their_commands_have():
    from somp_ref.cli import build_parser

    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Large models\n", 1)[1].split("\n## ", 1)[0]
    commands = " ".join(re.findall(r"```bash\n(.*?)```", section, re.DOTALL))
    commands = commands.replace("\\\n", " ")
    parsers = {}
    for action in build_parser()._subparsers._group_actions:
        parsers.update(action.choices)
    checked = 0
    for line in commands.splitlines():
        found = re.search(r"(?:somp-ref|-m somp_ref) (\w+)(?: (merge))?(.*)", line)
        if not found:
            continue
        parser = parsers[found[1]]
        if found[2]:
            parser = parser._subparsers._group_actions[0].choices[found[2]]
        known = {flag for action in parser._actions for flag in action.option_strings}
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", found[3]):
            assert flag in known, (found[1], flag)
            checked += 1
    assert checked >= 20  # the section's commands were found and read
