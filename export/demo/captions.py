"""Caption templates for the digits demo, English and Chinese.

A template is a format string with `{word}` (the digit's name: "seven", "七") and/or `{numeral}`
(the Arabic numeral: "7"). `TRAINING_TEMPLATES` are what the model is trained on;
`EVALUATION_TEMPLATES` are held-out phrasings that match no training template (and avoid the
words that make them distinctive, such as "scan", "wrote", "扫描", "阿拉伯"), used to check that
retrieval generalises to wording the model never saw.

Chinese note: the CLIP BPE tokenizer splits CJK text into UTF-8 byte tokens, and a character at
the end of a word gets a different (`</w>`) token than the same character followed by more CJK
text, so the Chinese templates put the digit's name both at the end and in the middle of a run.
"一张 / 一个 / 一幅" ("a", literally "one [measure word]") prefixes are included so the model learns
that they do not mean the digit one.

Caption noise (`sample_caption`): during training a caption may get random filler words (English)
or characters (Chinese, glued to the caption without spaces) before and/or after it, drawn from
`FILLER_WORDS`, which hold no digit names and none of the words that only the evaluation phrasings
use. Without it the text tower learns the positions the digit takes in the few training templates
and does not recognise a Chinese digit name after an unseen prefix.
"""

from __future__ import annotations

import random
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


# Filler items: English words, Chinese characters and measure-word phrases. None names a digit
# (一 only inside 一张 / 一个 / 一幅, "a"), none is a word that only the evaluation phrasings use.
FILLER_WORDS: dict[Language, tuple[str, ...]] = {
    "en": tuple(
        "image photo picture small big old new gray grey ink paper tiny clear blurry sample example "
        "of the with on in this that here shows is my your black white dark light page card simple "
        "neat messy quick little thick thin bold sketch character symbol figure and very nice".split()
    ),
    "zh": tuple(
        "这那是个图片像照上下左右中里在和好大小黑白色画面纸页格看见很真新旧清楚字样式号码幅的"
        "灰暗亮粗细整齐潦草简单漂亮符形状位置标记张单独它我你"
    )
    + ("一张", "一个", "一幅"),
}


def _filler(language: Language, rng: random.Random, max_items: int) -> str:
    sep = " " if language == "en" else ""
    return sep.join(rng.choice(FILLER_WORDS[language]) for _ in range(rng.randint(1, max_items)))


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
    (English: words joined by spaces; Chinese: characters glued on without spaces).

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
    sep = " " if template.language == "en" else ""
    if rng.random() < filler_probability:
        caption = _filler(template.language, rng, max_filler) + sep + caption
    if rng.random() < filler_probability:
        caption = caption + sep + _filler(template.language, rng, max_filler)
    return caption
