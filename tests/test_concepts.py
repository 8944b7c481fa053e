"""Concept word lists and the rule that turns words into token ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from somp_ref.concepts import (
    VocabTokenizer,
    concept_token_ids,
    load_concept,
    shipped_concepts,
    store_concept_ids,
    word_variants,
)

REQUIRED = {
    "colors",
    "countries",
    "capitals",
    "numbers",
    "months",
    "positive",
    "negative",
    "toxic",
    "animals",
}


def test_every_required_concept_ships_with_enough_words():
    assert REQUIRED <= set(shipped_concepts())
    for name in REQUIRED:
        words = load_concept(name)
        assert len(words) >= 12, name
        assert len(set(words)) == len(words), f"{name} has duplicates"
        assert all(w and not w.startswith("#") for w in words)


def test_shipped_lists_contain_their_obvious_members():
    assert {"red", "blue", "green"} <= set(load_concept("colors"))
    assert {"france", "japan", "brazil"} <= set(load_concept("countries"))
    assert {"paris", "tokyo"} <= set(load_concept("capitals"))
    assert load_concept("months")[0] == "january"
    assert not set(load_concept("positive")) & set(load_concept("negative"))


def test_user_list_file_and_errors(tmp_path):
    path = tmp_path / "fruit.txt"
    path.write_text("# my fruit\napple\n\n pear \n")
    assert load_concept(path) == ["apple", "pear"]
    with pytest.raises(ValueError, match=r"unknown concept 'colours'; shipped: animals"):
        load_concept("colours")
    with pytest.raises(FileNotFoundError, match=r"concept list .*does not exist.*missing.txt"):
        load_concept(tmp_path / "missing.txt")
    with pytest.raises(IsADirectoryError, match=r"is a directory, expected a concept list"):
        load_concept(tmp_path)
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00red")
    with pytest.raises(ValueError, match=r"binary.txt: not a UTF-8 text concept list .*0xff"):
        load_concept(tmp_path / "binary.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match=r"has no words"):
        load_concept(tmp_path / "empty.txt")


def test_word_variants_cover_space_and_case():
    assert word_variants("red") == [" red", "red", " Red", "Red"]
    assert word_variants("USA") == [" USA", "USA", " Usa", "Usa", " usa", "usa"]


class FakeTokenizer:
    """Single tokens for a few strings; anything else splits into characters."""

    table = {" red": 1, "red": 2, " Red": 3, " blue": 4, "blue": 4, " turquoise": 9}

    def encode(self, text, add_special_tokens=True):
        assert add_special_tokens is False  # the rule never adds BOS
        if text in self.table:
            return [self.table[text]]
        return [100 + ord(c) for c in text]


def test_single_token_rule_keeps_single_token_variants_and_reports_drops():
    found = concept_token_ids(FakeTokenizer(), ["red", "blue", "chartreuse", "red"])
    assert found.ids == [1, 2, 3, 4]
    assert found.by_word == {"red": [1, 2, 3], "blue": [4]}
    assert found.dropped == ["chartreuse"]
    assert "dropped 1 (no single-token form): chartreuse" in found.report()


def test_first_token_rule_takes_the_first_piece():
    found = concept_token_ids(FakeTokenizer(), ["chartreuse"], multi_token="first")
    assert found.ids[0] == 100 + ord(" ")
    with pytest.raises(ValueError, match=r"multi_token must be one of"):
        concept_token_ids(FakeTokenizer(), ["x"], multi_token="all")


def test_vocab_tokenizer_is_exact_on_single_tokens():
    vocab = [" red", "red", " Red", " re", "d", " red"]
    tok = VocabTokenizer(vocab)
    assert tok.encode(" red") == [0]  # lowest id among equal strings
    assert tok.encode(" redd") == [0, 4]
    assert tok.encode("xyz") == []
    found = concept_token_ids(tok, ["red"])
    assert found.ids == [0, 1, 2]


def test_a_concept_with_no_single_token_word_in_the_store_is_a_clear_error(tmp_path):
    vocab = ["red", " red", "green", "ze", "bra"]
    path = tmp_path / "animals.txt"
    path.write_text("zebra\nquokka\n")
    with pytest.raises(ValueError) as caught:
        store_concept_ids(vocab, path)
    message = str(caught.value)
    assert message.startswith(f"concept {path}: none of its 2 words (zebra, quokka) is a single")
    assert "vocabulary (5 tokens)" in message and "the 'single' multi-token rule" in message
    (tmp_path / "colors.txt").write_text("red\nzebra\n")
    found = store_concept_ids(vocab, tmp_path / "colors.txt")
    assert found.ids == [1, 0] and found.dropped == ["zebra"]


@pytest.mark.parametrize("what", ["directory", "file"])
def test_a_shipped_name_is_the_shipped_list_whatever_the_working_directory_holds(
    tmp_path, monkeypatch, what
):
    shipped = load_concept("colors")
    monkeypatch.chdir(tmp_path)
    if what == "directory":  # as `--out colors` leaves behind
        Path("colors").mkdir()
    else:
        Path("colors").write_text("mauve\n")
    assert load_concept("colors") == shipped
    if what == "file":  # written as a path, the file is read
        assert load_concept("./colors") == ["mauve"]
