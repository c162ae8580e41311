"""Word-level tokenizer for the Shapes testbed captions (a closed vocabulary, CLIP-style framing).

Ids: 0 `<pad>`, 1 `<bos>`, 2 `<unk>` (never produced: unknown words are errors), 3 `<eos>`, then the
words. Sequences are `<bos> w1 … wn <eos> <pad> …` of fixed length, like SD's 77-token prompts. The
eos id is not 2, so the CLIP text model pools at the first `<eos>` (not at the largest id).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flash_jax.data import shapes

PAD, BOS, UNK, EOS = 0, 1, 2, 3
SPECIAL = ("<pad>", "<bos>", "<unk>", "<eos>")
_FUNCTION_WORDS = ("a", "an", "and", ",", "to", "the", "of", "left", "right", "above", "below")


def shapes_vocabulary() -> tuple[str, ...]:
    """Every token a Shapes caption can contain, special tokens first (stable order)."""
    words = (
        *_FUNCTION_WORDS,
        *shapes.NUMBERS,
        *shapes.COLORS,
        *shapes.SHAPES,
        *shapes.SHAPE_PLURALS,
        *shapes.TEXTURES,
        *shapes.SIZES,
    )
    return SPECIAL + tuple(dict.fromkeys(words))


class WordTokenizer:
    """Splits on spaces (commas are their own token) and maps words to ids."""

    def __init__(self, vocabulary: Sequence[str] | None = None, max_length: int = 24):
        self.vocabulary = tuple(vocabulary or shapes_vocabulary())
        self.ids = {w: i for i, w in enumerate(self.vocabulary)}
        self.max_length = max_length

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    def __call__(self, captions: Sequence[str]) -> np.ndarray:
        """int32 `(len(captions), max_length)` token ids; an unknown word or overflow is an error."""
        out = np.full((len(captions), self.max_length), PAD, np.int32)
        for row, caption in enumerate(captions):
            words = str(caption).replace(",", " ,").split()
            unknown = [w for w in words if w not in self.ids]
            if unknown:
                raise ValueError(f"caption {caption!r}: words not in the vocabulary: {unknown}")
            if len(words) + 2 > self.max_length:
                raise ValueError(
                    f"caption {caption!r} has {len(words)} words; max_length={self.max_length} "
                    "fits max_length - 2"
                )
            ids = [BOS, *(self.ids[w] for w in words), EOS]
            out[row, : len(ids)] = ids
        return out

    def decode(self, ids: np.ndarray) -> list[str]:
        """Inverse of `__call__` for rows of ids (special tokens dropped)."""
        rows = []
        for row in np.atleast_2d(ids):
            words = [self.vocabulary[i] for i in row if i >= len(SPECIAL)]
            rows.append(" ".join(words).replace(" ,", ","))
        return rows
