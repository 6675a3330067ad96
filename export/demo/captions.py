"""Caption templates for the digits demo, English and Chinese.

A template is a format string with `{word}` (the digit's name: "seven", "七") and/or `{numeral}`
(the Arabic numeral: "7"). `TRAINING_TEMPLATES` are what the model is trained on;
`EVALUATION_TEMPLATES` are held-out phrasings that match no training template (their distinctive
words, such as "scan", "wrote", "扫描", "阿拉伯", occur in no training template or filler list),
used to check that retrieval generalises to wording the model never saw.

Chinese note: the CLIP BPE tokenizer splits CJK text into UTF-8 byte tokens, and a character at
the end of a word gets a different (`</w>`) token than the same character followed by more CJK
text, so the Chinese templates put the digit's name both at the end and in the middle of a run.
"一张 / 一个 / 一幅" ("a", literally "one [measure word]") prefixes are included so the model learns
that they do not mean the digit one.

Caption noise (`sample_caption`): during training a caption may get random filler words (English)
or characters (Chinese, glued to the caption without spaces) before and/or after it. Without it
the text tower learns the positions the digit takes in the few training templates and does not
find a Chinese digit name after an unseen prefix. The hand-picked filler lists (`FILLER_WORDS`)
hold no digit names and none of the words that only the evaluation phrasings use. The Chinese
filler also draws from all CJK ideographs (U+4E00..U+9FA5) except number characters, with extra
weight on those that share UTF-8 bytes with a digit's name: the byte-level tokenizer cuts a
digit's name into two tokens that also occur inside other characters, and the model must see
those other characters to learn that only the exact pair names the digit. (An earlier variant
that also kept the evaluation-only characters out of these pools left, for example, 了 = E4 BA 86
as the only never-seen "lead byte of 二/五 + other byte" pair, and "有人用笔写了七" then retrieved
fives in some training runs.) So the evaluation phrasings are unseen as phrasings; their
characters may have occurred as random noise, as any character of a user's query may have.
"""

from __future__ import annotations

import random
import unicodedata
from dataclasses import dataclass
from typing import Literal

Language = Literal["en", "zh"]

DIGIT_WORDS: dict[Language, tuple[str, ...]] = {
    "en": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    "zh": ("零", "一", "二", "三", "四", "五", "六", "七", "八", "九"),
}


@dataclass(frozen=True)
class Template:
    """A caption template: `text` with `{word}` and/or `{numeral}` placeholders, in `language`."""

    text: str
    language: Language

    def format(self, label: int) -> str:
        """The caption for digit `label` (0-9).

        Raises:
            ValueError: `label` is not an integer in 0..9.
        """
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label <= 9:
            raise ValueError(f"digit label must be an int in 0..9, got {label!r}")
        return self.text.format(word=DIGIT_WORDS[self.language][label], numeral=str(label))


def _templates(language: Language, *texts: str) -> tuple[Template, ...]:
    return tuple(Template(text, language) for text in texts)


TRAINING_TEMPLATES: tuple[Template, ...] = _templates(
    "en",
    "a handwritten digit {word}",
    "the number {numeral}",
    "a photo of the digit {numeral}",
    "a handwritten {word}",
    "the digit {word}, written by hand",
    "an image of the number {word}",
    "a black and white picture of a {numeral}",
    "{word}",
    "{numeral}",
    "a small drawing of the number {numeral}",
    "this is a {word}",
    "handwriting showing the digit {numeral}",
) + _templates(
    "zh",
    "手写数字{word}",
    "数字{numeral}的图片",
    "一张手写的{word}",
    "数字{word}",
    "手写的{numeral}",
    "一个手写的数字{word}的图像",
    "这是{word}",
    "{word}",
    "图片里是{numeral}",
    "{word}的手写体",
    "一幅数字{word}的照片",
    "这张图上有一个{numeral}",
)

EVALUATION_TEMPLATES: tuple[Template, ...] = _templates(
    "en",
    "scan of a hand-drawn {numeral}",
    "somebody wrote the numeral {word}",
    "pen strokes forming a {word}",
) + _templates(
    "zh",
    "一张写着{word}的扫描图",
    "手写的阿拉伯数字{numeral}",
    "有人用笔写了{word}",
)


def training_captions(label: int) -> list[str]:
    """All training captions for digit `label`, in `TRAINING_TEMPLATES` order.

    Raises:
        ValueError: `label` is not an int in 0..9.
    """
    return [template.format(label) for template in TRAINING_TEMPLATES]


def _chinese_characters(templates: tuple[Template, ...]) -> set[str]:
    texts = (t.text.replace("{word}", "").replace("{numeral}", "") for t in templates if t.language == "zh")
    return {c for text in texts for c in text}


# Words / characters that only the evaluation phrasings use. The hand-picked filler lists below
# leave them out, so that no training caption borrows the evaluation wording.
EVALUATION_ONLY_CHARACTERS: frozenset[str] = frozenset(
    _chinese_characters(EVALUATION_TEMPLATES) - _chinese_characters(TRAINING_TEMPLATES)
)
EVALUATION_ONLY_WORDS: frozenset[str] = frozenset(
    {w for t in EVALUATION_TEMPLATES if t.language == "en" for w in t.text.split()}
    - {w for t in TRAINING_TEMPLATES if t.language == "en" for w in t.text.split()}
    - {"{word}", "{numeral}"}
)
# Number characters: a Unicode numeric value (unicodedata.numeric, from the Unihan database:
# 零〇一...九十百千万亿, financial 壹贰...) or one of the non-numeric number words 两 / 俩 / 仨 / 幺.
_NUMBER_WORDS_ZH = frozenset("两俩仨幺")


def is_number_character(char: str) -> bool:
    """True when `char` names a number (see `_NUMBER_WORDS_ZH` and `unicodedata.numeric`)."""
    return unicodedata.numeric(char, None) is not None or char in _NUMBER_WORDS_ZH


# CJK ideographs (U+4E00..U+9FA5) that share the first two UTF-8 bytes, or the last byte, with a
# digit's name. CLIP's byte-level BPE splits most CJK characters into byte tokens, so a digit's name
# is a pair of tokens (七 = E4 B8 | 83) and these characters contain one of the pair's tokens; as
# filler they teach the text tower to read a digit from the exact adjacent pair, not from a token
# that appears somewhere in the caption.
_DIGIT_LEAD_BYTES = {d.encode()[:2] for d in DIGIT_WORDS["zh"]}
_DIGIT_LAST_BYTES = {d.encode()[-1] for d in DIGIT_WORDS["zh"]}
_IDEOGRAPHS = tuple(map(chr, range(0x4E00, 0x9FA6)))
SAME_LEAD_CHARACTERS: tuple[str, ...] = tuple(
    c for c in _IDEOGRAPHS if c.encode()[:2] in _DIGIT_LEAD_BYTES and not is_number_character(c)
)
SAME_LAST_BYTE_CHARACTERS: tuple[str, ...] = tuple(
    c for c in _IDEOGRAPHS if c.encode()[-1] in _DIGIT_LAST_BYTES and not is_number_character(c)
)
# Per digit name: the characters that share its first two bytes / its last byte. A "decoy" filler
# puts one of each near each other without forming the digit: both tokens of the digit's name occur
# in the caption, but not as the adjacent pair, and the caption is about another digit.
DECOY_CHARACTERS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = tuple(
    (
        tuple(c for c in SAME_LEAD_CHARACTERS if c.encode()[:2] == d.encode()[:2]),
        tuple(c for c in SAME_LAST_BYTE_CHARACTERS if c.encode()[-1] == d.encode()[-1]),
    )
    for d in DIGIT_WORDS["zh"]
)
# Filler items: English words, common Chinese characters and measure-word phrases. None names a
# digit (一 only inside 一张 / 一个 / 一幅, "a") or is a word that only the evaluation phrasings use.
FILLER_WORDS: dict[Language, tuple[str, ...]] = {
    "en": tuple(
        w
        for w in (
            "image photo picture small big old new gray grey ink paper tiny clear blurry sample example "
            "of the with on in this that here shows is my your black white dark light page card simple "
            "neat messy quick little thick thin bold sketch character symbol figure and very nice"
        ).split()
        if w not in EVALUATION_ONLY_WORDS
    ),
    "zh": tuple(
        c
        for c in (
            "这那是个图片像照上下左右中里在和好大小黑白色画面纸页格看见很真新旧清楚字样式号码幅的"
            "灰暗亮粗细整齐潦草简单漂亮符形状位置标记张单独它我你"
        )
        if not is_number_character(c) and c not in EVALUATION_ONLY_CHARACTERS
    )
    + ("一张", "一个", "一幅"),
}


def _filler(language: Language, rng: random.Random, max_items: int) -> str:
    count = rng.randint(1, max_items)
    if language == "en":
        return " ".join(rng.choice(FILLER_WORDS["en"]) for _ in range(count))
    items = []
    for _ in range(count):
        kind = rng.randrange(5)  # common, two kinds of byte neighbour, any ideograph, decoy pair
        if kind == 0:
            items.append(rng.choice(FILLER_WORDS["zh"]))
        elif kind == 1:
            items.append(rng.choice(SAME_LEAD_CHARACTERS))
        elif kind == 2:
            items.append(rng.choice(SAME_LAST_BYTE_CHARACTERS))
        elif kind == 3:
            items.append(_random_ideograph(rng))
        else:
            same_lead, same_last = rng.choice(DECOY_CHARACTERS)
            pair = [rng.choice(same_lead), rng.choice(same_last)]
            rng.shuffle(pair)
            middle = _random_ideograph(rng) if rng.random() < 0.5 else ""
            items.append(pair[0] + middle + pair[1])
    return "".join(items)


def _random_ideograph(rng: random.Random) -> str:
    char = rng.choice(_IDEOGRAPHS)
    while is_number_character(char):
        char = rng.choice(_IDEOGRAPHS)
    return char


def sample_caption(
    label: int,
    templates: tuple[Template, ...] | list[Template],
    rng: random.Random,
    *,
    filler_probability: float = 0.5,
    max_filler: int = 4,
) -> str:
    """A random training caption for digit `label`: a random template from `templates`, and, each
    with probability `filler_probability`, 1..`max_filler` filler items before and after it
    (English: words joined by spaces, from `FILLER_WORDS["en"]`; Chinese: characters without
    spaces, 1/5 each from `FILLER_WORDS["zh"]`, `SAME_LEAD_CHARACTERS`, `SAME_LAST_BYTE_CHARACTERS`,
    all CJK ideographs U+4E00..U+9FA5 and decoy pairs (`DECOY_CHARACTERS`); never a number
    character).

    Deterministic for a given `rng` state.

    Raises:
        ValueError: bad label, empty `templates`, probability outside [0, 1] or max_filler < 1.
    """
    if not templates:
        raise ValueError("sample_caption needs at least one template")
    if not 0.0 <= filler_probability <= 1.0:
        raise ValueError(f"filler_probability must be in [0, 1], got {filler_probability}")
    if max_filler < 1:
        raise ValueError(f"max_filler must be >= 1, got {max_filler}")
    template = rng.choice(templates)
    caption = template.format(label)
    en = template.language == "en"
    if rng.random() < filler_probability:
        caption = _filler(template.language, rng, max_filler) + (" " if en else "") + caption
    if rng.random() < filler_probability:
        # Chinese: glued on half of the time, else after a space or a full-width comma, so that a
        # digit name at the end of the caption keeps its end-of-word token as often as not
        sep = " " if en else rng.choice(("", "", " ", "，"))
        caption = caption + sep + _filler(template.language, rng, max_filler)
    return caption
