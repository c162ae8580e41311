"""The Shapes word tokenizer: covers every caption the grammar produces, CLIP-style framing."""

import numpy as np
import pytest

from flash_jax.data import shapes, tokenizer


def test_every_caption_of_every_split_and_category_round_trips():
    tok = tokenizer.WordTokenizer()
    captions = [
        shapes.sample_record(0, split, i, category)["caption"]
        for split in shapes.SPLITS
        for category in shapes.CATEGORIES
        for i in range(40)
    ]
    ids = tok(captions)
    assert ids.shape == (len(captions), tok.max_length) and ids.dtype == np.int32
    assert tok.decode(ids) == captions


def test_framing_bos_words_eos_then_padding():
    tok = tokenizer.WordTokenizer(max_length=8)
    ids = tok(["a red circle", ""])
    np.testing.assert_array_equal(
        ids[0],
        [tokenizer.BOS, tok.ids["a"], tok.ids["red"], tok.ids["circle"], tokenizer.EOS, 0, 0, 0],
    )
    np.testing.assert_array_equal(ids[1], [tokenizer.BOS, tokenizer.EOS, 0, 0, 0, 0, 0, 0])
    assert tokenizer.EOS != 2  # CLIP pools at the first <eos>, not at argmax(ids)


def test_unknown_words_and_overflow_are_errors_naming_the_caption():
    tok = tokenizer.WordTokenizer(max_length=6)
    with pytest.raises(ValueError, match=r"'a mauve circle'.*\['mauve'\]"):
        tok(["a mauve circle"])
    with pytest.raises(ValueError, match="max_length=6"):
        tok(["a red circle and a blue square"])
