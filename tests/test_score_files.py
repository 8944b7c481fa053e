"""Malformed ranking files: a ValueError naming the file, never a wrong ranking."""

from __future__ import annotations

import json

import numpy as np
import pytest

from somp_ref.heads import HeadScores

HEADER = "rank,layer,head,score,method,support_ids,support_tokens\n"


@pytest.mark.parametrize(
    "text, message",
    [
        ("", r"no column layer, head, score"),
        ("word\nred\n", r"no column layer, head, score"),
        (HEADER, r"no rows"),
        (HEADER + "1,x,0,0.5,somp,,[]\n", r"line 2: layer must be an integer >= 0, got 'x'"),
        (HEADER + "1,0,-1,0.5,somp,,[]\n", r"line 2: head must be an integer >= 0, got '-1'"),
        (HEADER + "1,0,1.5,0.5,somp,,[]\n", r"head must be an integer >= 0, got '1.5'"),
        (HEADER + "1,0,1,high,somp,,[]\n", r"line 2: score must be a number, got 'high'"),
        (
            HEADER + "1,0,1,0.5,somp,,[]\n2,0,1,0.4,somp,,[]\n",
            r"line 3: head 0.1 is listed twice \(first on line 2\)",
        ),
        (HEADER + "1,0,1,0.5\n", r"line 2: 7 fields expected"),
        (HEADER + "1,0,1,0.5,somp,,[],extra\n", r"line 2: 7 fields expected"),
        (HEADER + "1,0,1,0.5,somp,3 x,[]\n", r"support id must be an integer >= 0, got 'x'"),
        (HEADER + "1,0,1,0.5,somp,,[]\n2,0,0,0.4,ll,,[]\n", r"rows of several rankings"),
        (HEADER + "1,99999,99999,0.5,somp,,[]\n", r"not a real model"),
    ],
    ids=[
        "empty",
        "wrong-columns",
        "header-only",
        "layer-not-integer",
        "negative-head",
        "fractional-head",
        "score-not-number",
        "duplicated-head",
        "short-row",
        "long-row",
        "bad-support-id",
        "mixed-methods",
        "huge-index",
    ],
)
def test_malformed_csv(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as caught:
        HeadScores.from_csv(path)
    assert str(path) in str(caught.value)


def test_binary_csv(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00")
    with pytest.raises(ValueError, match="bad.csv: not a UTF-8 text ranking CSV"):
        HeadScores.from_csv(path)


def test_csv_read_back_keeps_sparse_heads(tmp_path):
    path = tmp_path / "few.csv"
    path.write_text(HEADER + "1,2,1,0.5,somp,4 7,[]\n", encoding="utf-8")
    scores = HeadScores.from_csv(path)
    assert scores.score.shape == (3, 2)
    assert np.count_nonzero(~np.isnan(scores.score)) == 1
    assert scores.supports[2, 1].tolist() == [4, 7]


def good_payload() -> dict:
    return {
        "format": "somp_ref.head_scores",
        "version": 1,
        "method": "somp",
        "params": {"n_atoms": 2},
        "source": {},
        "token_ids": [3, 4],
        "tokens": ["a", "b"],
        "details": {},
        "explained_variance": [[0.5, None], [0.25, 0.75]],
        "heads": [{"layer": 0, "head": 0, "support": [3], "increments": [0.5]}],
    }


def edited(**changes) -> dict:
    payload = good_payload()
    for key, value in changes.items():
        if value is None:
            del payload[key]
        else:
            payload[key] = value
    return payload


def one_head(**fields) -> list[dict]:
    return [{"layer": 0, "head": 0, "support": [3], "increments": [0.5], **fields}]


@pytest.mark.parametrize(
    "payload, message",
    [
        ([1, 2], r"not a somp_ref head-scores JSON file"),
        (edited(format="other"), r"not a somp_ref head-scores JSON file"),
        (edited(version=3), r"version 3; this somp_ref reads versions 1, 2"),
        (edited(method=None), r"missing field 'method'"),
        (edited(heads=None), r"missing field 'heads'"),
        (edited(explained_variance=None), r"missing field 'explained_variance'"),
        (edited(explained_variance=[[0.5], [0.1, 0.2]]), r"explained_variance must be a non-empty"),
        (edited(explained_variance=[["high"]]), r"explained_variance must be a non-empty"),
        (edited(explained_variance=[]), r"explained_variance must be a non-empty"),
        (edited(method=3), r"method must be a string, got 3"),
        (edited(heads=one_head(layer=-1)), r"heads\[0\] is head -1.0, outside the 2 x 2"),
        (edited(heads=one_head(head=2)), r"outside the 2 x 2 table"),
        (edited(heads=one_head(layer="0")), r"heads\[0\]: layer must be an integer, got \'0\'"),
        (edited(heads=one_head() + one_head()), r"heads\[1\]: head 0.0 is listed twice"),
        (edited(heads=one_head(increments=[])), r"support and increments differ in length"),
        (edited(heads=one_head(support=[-3])), r"support must be a list of token ids"),
        (edited(heads=[7]), r"heads\[0\] must be an object"),
        (edited(token_ids=[3, "b"]), r"token_ids must be a list of token ids"),
        (edited(tokens=["a"]), r"tokens must be 2 strings"),
        (edited(details={"null_mean": [[0.0]]}), r"details.null_mean has shape \(1, 1\)"),
    ],
    ids=[
        "not-an-object",
        "other-format",
        "other-version",
        "no-method",
        "no-heads",
        "no-scores",
        "ragged-scores",
        "string-score",
        "empty-scores",
        "method-not-string",
        "negative-layer",
        "head-outside",
        "layer-as-string",
        "duplicated-head",
        "increments-length",
        "negative-support",
        "head-not-object",
        "token-id-string",
        "tokens-length",
        "details-shape",
    ],
)
def test_malformed_json(tmp_path, payload, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(payload), encoding="utf-8")
    with pytest.raises(ValueError, match=message) as caught:
        HeadScores.from_json(path)
    assert str(path) in str(caught.value)


def test_truncated_json(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text(json.dumps(good_payload())[:60], encoding="utf-8")
    with pytest.raises(ValueError, match=r"cut.json: not valid JSON .*line 1.*truncated\?"):
        HeadScores.from_json(path)


def test_good_json_reads(tmp_path):
    path = tmp_path / "good.json"
    path.write_text(json.dumps(good_payload()), encoding="utf-8")
    scores = HeadScores.from_json(path)
    assert np.isnan(scores.score[0, 1])
    assert scores.supports[0, 0].tolist() == [3] and scores.tokens == ["a", "b"]


@pytest.mark.parametrize(
    "deep", ["[" * 100_000 + "]" * 100_000, '{"a": ' * 100_000 + "1" + "}" * 100_000]
)
def test_deeply_nested_json_is_a_value_error(tmp_path, deep):
    """json's decoder recurses per level: a RecursionError becomes an error naming the file."""
    path = tmp_path / "nested.json"
    path.write_text('{"format": "somp_ref.head_scores", "version": 1, "x": ' + deep + "}")
    with pytest.raises(ValueError, match=r"nested.json: JSON too deeply nested"):
        HeadScores.from_json(path)


def test_one_head_type_wherever_it_is_imported_from():
    from somp_ref import demo, head, head_scores, heads, score_files

    assert head_scores.Head is heads.Head is score_files.Head is demo.Head is head.Head
