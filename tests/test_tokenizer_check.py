"""The loader refuses a tokenizer whose segmentation was rebuilt wrongly (transformers 5.17 on
Gemma-3-270M's GGUF: the right vocabulary, words split into pieces), and accepts real ones."""

import pytest

from mlakit import loading
from mlakit.errors import MlakitError

WORDS = [f"\u2581{w}" for w in ("units", "house", "garden", "river", "stone", "window", "planet", "forest",
                                 "silver", "castle", "bridge", "market", "winter", "summer", "letter",
                                 "mirror", "harbor", "valley", "thunder", "candle", "rocket", "pillow")]


class VocabTokenizer:
    """A duck-typed tokenizer over letters + WORDS: whole words map to their own id when
    ``merges`` is true, else every word is spelt letter by letter (the wrong rebuild)."""

    def __init__(self, merges: bool, words=WORDS):
        letters = ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
        self.vocab = {t: i for i, t in enumerate(letters + list(words))}
        self.merges = merges
        self.unmerged: set[str] = set()  # in the vocabulary but never produced whole

    def get_vocab(self):
        return dict(self.vocab)

    def __call__(self, text, add_special_tokens=False):
        pieces = []
        for word in text.split():
            whole = "\u2581" + word
            pieces += [whole] if self.merges and whole in self.vocab and whole not in self.unmerged else ["\u2581", *word]
        return type("Encoding", (), {"input_ids": [self.vocab[p] for p in pieces]})()

    def convert_ids_to_tokens(self, ids):
        inverse = {i: t for t, i in self.vocab.items()}
        return [inverse[i] for i in ids]


def test_whole_words_that_encode_to_themselves_pass():
    loading.check_tokenizer_segments(VocabTokenizer(merges=True), "model.gguf")


def test_words_split_into_letters_are_one_error_naming_the_release():
    with pytest.raises(MlakitError, match=r"model\.gguf: transformers \S+ builds this model's tokenizer wrongly "
                                          r"\(22 of 22 whole words .*'\u2581\w+' -> \['\u2581', "):
        loading.check_tokenizer_segments(VocabTokenizer(merges=False), "model.gguf")


def test_a_few_odd_words_are_tolerated_but_not_more():
    tokenizer = VocabTokenizer(merges=True)
    tokenizer.vocab["\u2581zzzzzz"] = len(tokenizer.vocab)
    tokenizer.unmerged.add("\u2581zzzzzz")
    loading.check_tokenizer_segments(tokenizer, "model.gguf")  # 1 of 23 split: a real vocabulary has such
    for i in range(3):
        tokenizer.vocab["\u2581zzzzz" + "abc"[i]] = len(tokenizer.vocab)
        tokenizer.unmerged.add("\u2581zzzzz" + "abc"[i])
    with pytest.raises(MlakitError, match="4 of 26"):
        loading.check_tokenizer_segments(tokenizer, "model.gguf")


def test_tiny_vocabularies_are_not_judged():
    loading.check_tokenizer_segments(VocabTokenizer(merges=False, words=WORDS[:5]), "model.gguf")


def test_the_default_models_tokenizer_passes():
    pytest.importorskip("transformers")
    try:
        path = loading.default_model_path()
    except MlakitError:
        pytest.skip("the default model is not installed")
    tokenizer = loading.load(path).tokenizer
    loading.check_tokenizer_segments(tokenizer, str(path))
    assert tokenizer(" Valkyria Chronicles", add_special_tokens=False).input_ids == [717, 1727, 105, 5484, 34471]
