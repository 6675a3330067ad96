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
"""

from __future__ import annotations

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
