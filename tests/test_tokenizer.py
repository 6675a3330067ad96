"""The serving-side tokenizer (tokenizer.json + open_clip's cleaning) gives open_clip's token ids.

Reference: open_clip's own tokenizers for ViT-B-32 (context 77) and the demo model
vitrine-digits-tiny (context 32, same CLIP BPE), run on the same strings.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
from tokenizers import Tokenizer

from export import ExportError
from export.loading import register_demo_configs
from export.tokenizer_json import build_tokenizer, write_tokenizer_json
from vitrine.tokenizer import TextTokenizer

TEXTS: dict[str, str] = {
    "english": "a photo of a cat",
    "mixed_case": "A PHOTO of a DoG!!!",
    "whitespace": "  lots   of\t\nwhitespace \r\n here  ",
    "nbsp_em_space": "tab\tsep\u00a0nbsp\u2003em space",
    "chinese": "手写数字零",
    "chinese_punctuation": "一座中国古建筑的照片，很漂亮。",
    "japanese": "日本語のテキスト、句読点。",
    "korean": "한국어 문장",
    "russian": "русский текст с Заглавными",
    "arabic": "العربية",
    "hindi": "हिन्दी",
    "emoji": "emoji 😀🎉 sunset 🌅",
    "emoji_zwj": "family 👨‍👩‍👧 flag 🇫🇷",
    "html_entities": "AT&amp;T &lt;b&gt;bold&lt;/b&gt; &amp;amp; caf&eacute;",
    "contractions": "it's they're I'VE we'LL you'D she'S",
    "apostrophes": "a'''s b''s x'sy 'S 'T",
    "greek_final_sigma": "ΟΔΟΣ Σίσυφος",
    "special_casing": "İstanbul ǅ ß ẞ Ǆ",
    "fullwidth": "ｆｕｌｌｗｉｄｔｈ，ＡＢＣ１２３",
    "curly_quotes": "“curly quotes” ‘single’",
    "mojibake": "mojibake: sÃ©ance",
    "ligatures": "ﬁ ligature ﬂ",
    "combining": "e\u0301 combining accent",
    "numbers": "numbers 12345 3.14159 1,000,000",
    "special_tokens_in_text": "<start_of_text> injected <end_of_text>",
    "special_tokens_upper": "<START_OF_TEXT>x abc<end_of_text>def",
    "zero_width": "zero\u200bwidth",
    "control_chars": "\x1c\x1dsep\x07bell",
    "punctuation_runs": "wow!!! ... ??? -- ##tag @user",
    "long_english": "a very long caption about a busy street market at night " * 12,
    "long_chinese": "中文" * 60,
    "long_emoji": "🙂" * 40,
}


@pytest.fixture(scope="module", params=["ViT-B-32", "vitrine-digits-tiny"])
def tokenizers_pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(open_clip tokenizer, TextTokenizer from the written tokenizer.json, tokenizer.json path)."""
    register_demo_configs()
    reference = open_clip.get_tokenizer(request.param)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    pad_id = write_tokenizer_json(reference, path, reference.context_length)
    return reference, TextTokenizer(path, reference.context_length, pad_id), path


@pytest.mark.parametrize("text", list(TEXTS.values()), ids=list(TEXTS))
def test_ids_equal_open_clip(tokenizers_pair, text: str) -> None:
    reference, runtime, _ = tokenizers_pair
    expected = reference([text]).numpy()
    got = runtime.encode_batch([text])
    assert got.dtype == np.int64
    assert got.shape == (1, reference.context_length)
    np.testing.assert_array_equal(got, expected)


def test_batch_equals_open_clip(tokenizers_pair) -> None:
    reference, runtime, _ = tokenizers_pair
    texts = list(TEXTS.values())
    np.testing.assert_array_equal(runtime.encode_batch(texts), reference(texts).numpy())


def test_truncation_keeps_eot_last(tokenizers_pair) -> None:
    reference, runtime, _ = tokenizers_pair
    ids = runtime.encode_batch([TEXTS["long_english"], "short"])
    ctx = reference.context_length
    assert ids[0, 0] == reference.sot_token_id
    assert ids[0, ctx - 1] == reference.eot_token_id  # truncated: <eot> replaces the last kept id
    assert (ids[0] != 0).all()
    assert ids[1, 2] == reference.eot_token_id and (ids[1, 3:] == 0).all()  # padded with 0


def test_tokenizer_json_alone_matches_on_clean_text(tokenizers_pair) -> None:
    """Without the Python cleaning, the file itself reproduces open_clip on already-clean text."""
    reference, _, path = tokenizers_pair
    plain = Tokenizer.from_file(str(path))
    texts = [TEXTS["english"], TEXTS["mixed_case"], TEXTS["chinese"], TEXTS["emoji"], TEXTS["contractions"],
             TEXTS["long_english"]]
    ids = np.asarray([e.ids for e in plain.encode_batch(texts)], dtype=np.int64)
    np.testing.assert_array_equal(ids, reference(texts).numpy())


def test_decode_round_trip(tokenizers_pair) -> None:
    _, runtime, path = tokenizers_pair
    plain = Tokenizer.from_file(str(path))
    ids = runtime.encode_batch(["A Photo of 2 cats 🐱 中文"])[0]
    assert plain.decode(ids[ids != 0].tolist()) == "a photo of 2 cats 🐱 中文"


@pytest.mark.parametrize("text", ["", "   ", "\n\t ", "&nbsp;", "\u3000"])
def test_empty_text_is_rejected(tokenizers_pair, text: str) -> None:
    _, runtime, _ = tokenizers_pair
    with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
        runtime.encode_batch(["fine", text])


def test_bad_input_types(tokenizers_pair) -> None:
    _, runtime, _ = tokenizers_pair
    with pytest.raises(TypeError, match="single str"):
        runtime.encode_batch("not a list")
    with pytest.raises(TypeError, match=r"texts\[0\] must be str"):
        runtime.encode_batch([b"bytes"])  # type: ignore[list-item]
    assert runtime.encode_batch([]).shape == (0, runtime.context_length)


def test_missing_file_and_bad_context(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        TextTokenizer(tmp_path / "absent.json", 77)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid"):
        TextTokenizer(bad, 77)
    with pytest.raises(ValueError, match="context_length"):
        TextTokenizer(bad, 1)


@pytest.mark.parametrize("kwargs", [{"reduction_mask": "simple"}, {"clean": "canonicalize"}])
def test_unsupported_open_clip_tokenizers(kwargs: dict) -> None:
    with pytest.raises(ExportError):
        build_tokenizer(open_clip.tokenizer.SimpleTokenizer(**kwargs), 77)


def test_whitespace_clean_mode_keeps_case(tmp_path: Path) -> None:
    reference = open_clip.tokenizer.SimpleTokenizer(clean="whitespace")
    write_tokenizer_json(reference, tmp_path / "tokenizer.json", 77)
    runtime = TextTokenizer(tmp_path / "tokenizer.json", 77)
    assert not runtime.lowercase
    texts = ["A Photo OF it'S &amp; ΟΔΟΣ", "lower case"]
    np.testing.assert_array_equal(runtime.encode_batch(texts), reference(texts).numpy())


def test_serving_modules_import_without_torch() -> None:
    """The serving side (tokenizer, Triton config reader) must not pull in torch or open_clip."""
    code = (
        "import sys, vitrine.tokenizer, vitrine.triton_config; "
        "bad = [m for m in ('torch', 'open_clip') if m in sys.modules]; "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
