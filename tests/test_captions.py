"""Captioned digits for a text-to-image teacher (flashcore.data.captioned)."""
import re

import pytest

from flashcore import data as fdata


def _digit(text: str) -> int:
    """The digit a caption names, read back from its numeral or its word."""
    m = re.search(r"\b\d\b", text)
    if m:
        return int(m.group())
    words = [w for w in fdata.DIGIT_WORDS if re.search(rf"\b{w}\b", text)]
    assert len(words) == 1, text
    return fdata.DIGIT_WORDS.index(words[0])


def test_captions_name_the_label_and_keep_phrasings_apart():
    ds = fdata.load("digits")
    x, caps, y = fdata.captioned(ds, "train", seed=0)
    assert len(caps) == len(y) == len(x)
    assert all(_digit(c) == int(lab) for c, lab in zip(caps, y.tolist()))
    held = set(fdata.PHRASINGS[-fdata.HELD_OUT_PHRASINGS:])
    patterns = {p: re.compile("^" + re.escape(p).replace(r"\{n\}", r"\d").replace(r"\{w\}", r"[a-z]+") + "$")
                for p in fdata.PHRASINGS}

    def phrasing(c):
        hits = [p for p, r in patterns.items() if r.match(c)]
        assert len(hits) == 1, c
        return hits[0]
    seen = {phrasing(c) for c in caps}
    assert not seen & held and len(seen) == len(fdata.PHRASINGS) - fdata.HELD_OUT_PHRASINGS
    _, caps_ho, y_ho = fdata.captioned(ds, "eval", held_out=True, seed=0)
    assert {phrasing(c) for c in caps_ho} == held
    assert all(_digit(c) == int(lab) for c, lab in zip(caps_ho, y_ho.tolist()))
    assert fdata.captioned(ds, "train", seed=0)[1] == caps          # fixed by the seed
    assert fdata.captioned(ds, "train", seed=1)[1] != caps


def test_captions_refuse_non_digit_data():
    ds = fdata.Dataset("x", fdata.load("digits").images[:4], fdata.load("digits").labels[:4], ["a", "b"])
    with pytest.raises(ValueError, match="captions name digits"):
        fdata.captioned(ds)
