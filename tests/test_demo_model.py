"""The demo model and data set (`export/demo/`): split, rendering, captions, training cache, quality.

The first run trains the demo checkpoint (a few minutes on 2 CPU cores) into the `cache_dir`
fixture's folder; later runs reuse it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from export.demo import MODEL_NAME, register_model_config
from export.demo import data as demo_data
from export.demo.captions import (
    DIGIT_WORDS,
    EVALUATION_ONLY_CHARACTERS,
    EVALUATION_ONLY_WORDS,
    EVALUATION_TEMPLATES,
    FILLER_WORDS,
    TRAINING_TEMPLATES,
    Template,
    is_number_character,
    sample_caption,
)
from export.demo.data import (
    METADATA_FILE,
    RENDER_SIZE,
    load_digit_arrays,
    load_split,
    read_metadata,
    render_digit,
    split_indices,
    write_dataset,
)
from export.demo.cache import (
    cache_key,
    cached_checkpoint,
    checkpoint_paths,
    ensure_checkpoint,
    read_checkpoint_info,
)
from export.demo.evaluate import evaluate
from export.demo.model import create_demo_model, encode_text_bucketed
from export.demo.recipe import Recipe

MIN_PRECISION = 0.95


# --- data -------------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_complete() -> None:
    train, heldout = split_indices("train"), split_indices("heldout")
    demo_data._split_indices.cache_clear()  # recompute from scratch
    assert np.array_equal(train, split_indices("train"))
    assert np.array_equal(heldout, split_indices("heldout"))
    assert len(train) == 1400 and len(heldout) == 397
    assert set(train.tolist()).isdisjoint(heldout.tolist())
    assert sorted(train.tolist() + heldout.tolist()) == list(range(1797))
    _, labels = load_digit_arrays()
    assert np.bincount(labels[heldout], minlength=10).min() >= 30  # stratified: every digit held out
    with pytest.raises(ValueError, match="unknown split"):
        split_indices("test")  # type: ignore[arg-type]


def test_render_digit_maps_ink_to_gray_levels() -> None:
    pixels = np.zeros((8, 8))
    pixels[0, 0], pixels[7, 7], pixels[3, 4] = 16, 8, 4
    image = render_digit(pixels)
    assert image.mode == "RGB" and image.size == (RENDER_SIZE, RENDER_SIZE)
    array = np.asarray(image)
    assert (array[:16, :16] == 0).all()  # full ink is black, a 16x16 square
    assert (array[112:, 112:] == 128).all()  # round(255 * (1 - 8/16))
    assert (array[48:64, 64:80] == 191).all()  # round(255 * (1 - 4/16))
    assert (array[16:48, :] == 255).all()  # paper is white
    assert (array[..., 0] == array[..., 2]).all()  # gray in all three channels


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((8, 7)), "8x8"),
        (np.full((8, 8), 17.0), r"\[0, 16\]"),
        (np.full((8, 8), np.nan), r"\[0, 16\]"),
    ],
)
def test_render_digit_rejects_bad_input(bad: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_digit(bad)


def test_write_dataset_writes_labelled_pngs_and_is_idempotent(tmp_path: Path) -> None:
    items = write_dataset(tmp_path, split="heldout")
    assert [item.source_index for item in items] == split_indices("heldout").tolist()
    images, labels = load_digit_arrays()
    lines = [json.loads(line) for line in (tmp_path / METADATA_FILE).read_text().splitlines()]
    assert len(lines) == len(items) == len(list(tmp_path.glob("*.png")))
    assert set(lines[0]) == {"filename", "label", "split", "source_index"}
    for line in lines:
        assert line["split"] == "heldout"
        assert line["label"] == labels[line["source_index"]]
        assert line["filename"] == f"digit_{line['source_index']:04d}_{line['label']}.png"
    for item in items[::40]:
        with Image.open(tmp_path / item.filename) as png:
            assert png.mode == "RGB"
            assert np.array_equal(np.asarray(png), np.asarray(render_digit(images[item.source_index])))
    assert read_metadata(tmp_path) == items

    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.png")}
    metadata = (tmp_path / METADATA_FILE).read_bytes()
    assert write_dataset(tmp_path, split="heldout") == items
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.png")} == mtimes  # nothing rewritten
    assert (tmp_path / METADATA_FILE).read_bytes() == metadata


def test_read_metadata_without_dataset_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="write_dataset"):
        read_metadata(tmp_path)


# --- captions -----------------------------------------------------------------------------------


@pytest.mark.parametrize("language", ["en", "zh"])
def test_caption_templates_name_digits_in_words_and_numerals(language: str) -> None:
    training = [t for t in TRAINING_TEMPLATES if t.language == language]
    evaluation = [t for t in EVALUATION_TEMPLATES if t.language == language]
    assert len(training) >= 5 and len(evaluation) >= 2
    assert any("{word}" in t.text for t in training) and any("{numeral}" in t.text for t in training)
    for template in training + evaluation:
        assert "{word}" in template.text or "{numeral}" in template.text
    seven = Template("{word}/{numeral}", language).format(7)  # type: ignore[arg-type]
    assert seven == f"{DIGIT_WORDS[language][7]}/7"  # type: ignore[index]


def test_evaluation_phrasings_match_no_training_template() -> None:
    training_captions = {t.format(label) for t in TRAINING_TEMPLATES for label in range(10)}
    for template in EVALUATION_TEMPLATES:
        assert template.text not in {t.text for t in TRAINING_TEMPLATES}
        assert not {template.format(label) for label in range(10)} & training_captions
    assert {"scan", "wrote"} <= EVALUATION_ONLY_WORDS and {"扫", "描"} <= EVALUATION_ONLY_CHARACTERS


def test_filler_never_names_a_digit_nor_borrows_evaluation_wording() -> None:
    for word in FILLER_WORDS["en"]:
        assert word not in DIGIT_WORDS["en"] and not any(c.isdigit() for c in word)
        assert word not in EVALUATION_ONLY_WORDS
    for item in FILLER_WORDS["zh"]:
        assert not set(item) & EVALUATION_ONLY_CHARACTERS
        assert item in ("一张", "一个", "一幅") or not any(is_number_character(c) for c in item)
    rng = random.Random(0)
    for label in range(10):
        for _ in range(50):
            caption = sample_caption(label, TRAINING_TEMPLATES, rng, filler_probability=1.0)
            others = [str(d) for d in range(10) if d != label] + [
                w for d, w in enumerate(DIGIT_WORDS["zh"]) if d not in (label, 1)
            ]
            assert not any(o in caption for o in others), caption


def test_sample_caption_is_deterministic_and_validates() -> None:
    first = [sample_caption(3, TRAINING_TEMPLATES, random.Random(5)) for _ in range(3)]
    assert len(set(first)) == 1
    with pytest.raises(ValueError, match="0..9"):
        TRAINING_TEMPLATES[0].format(10)
    with pytest.raises(ValueError, match="filler_probability"):
        sample_caption(3, TRAINING_TEMPLATES, random.Random(0), filler_probability=1.5)


def test_all_captions_fit_the_context_length() -> None:
    tokenizer = open_clip.get_tokenizer(register_model_config())
    for template in TRAINING_TEMPLATES + EVALUATION_TEMPLATES:
        for label in range(10):
            assert len(tokenizer.encode(template.format(label))) + 2 <= tokenizer.context_length


# --- model --------------------------------------------------------------------------------------


def test_bucketed_text_encoding_equals_open_clip_encode_text() -> None:
    torch.manual_seed(0)
    model, _, tokenizer = create_demo_model()
    rng = random.Random(0)
    tokens = tokenizer([sample_caption(i % 10, TRAINING_TEMPLATES, rng) for i in range(70)])
    with torch.no_grad():
        expected = model.encode_text(tokens, normalize=True)
        got = encode_text_bucketed(model, tokens, bucket_size=16)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_cache_key_covers_the_recipe_and_recipe_validates() -> None:
    assert cache_key(Recipe()) == cache_key(Recipe())
    assert cache_key(Recipe()) != cache_key(Recipe(epochs=Recipe().epochs + 1))
    with pytest.raises(ValueError, match="captions_per_image"):
        Recipe(captions_per_image=3)


def test_incomplete_cache_entry_is_not_used(tmp_path: Path) -> None:
    checkpoint, info = checkpoint_paths(tmp_path)
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"half a checkpoint")  # a run killed before its JSON was written
    assert cached_checkpoint(tmp_path) is None
    info.write_text(json.dumps({"key": "another recipe"}))
    assert cached_checkpoint(tmp_path) is None
    info.write_text(json.dumps({"key": cache_key()}))
    assert cached_checkpoint(tmp_path) == checkpoint


@pytest.fixture(scope="module")
def demo_checkpoint(cache_dir: Path) -> Path:
    return ensure_checkpoint(cache_dir, progress=False)


@pytest.mark.slow
def test_checkpoint_loads_with_open_clip(demo_checkpoint: Path) -> None:
    register_model_config()
    model = open_clip.create_model(MODEL_NAME, pretrained=str(demo_checkpoint))
    saved = torch.load(demo_checkpoint, map_location="cpu", weights_only=True)
    assert set(saved) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    info = read_checkpoint_info(demo_checkpoint)
    assert info["key"] == cache_key() and info["model_name"] == MODEL_NAME and info["train_seconds"] > 0


@pytest.mark.slow
def test_second_call_returns_the_cached_checkpoint(cache_dir: Path, demo_checkpoint: Path) -> None:
    info_path = demo_checkpoint.with_suffix(".json")
    before = (demo_checkpoint.stat().st_mtime_ns, info_path.stat().st_mtime_ns)
    assert ensure_checkpoint(cache_dir, progress=False) == demo_checkpoint
    assert (demo_checkpoint.stat().st_mtime_ns, info_path.stat().st_mtime_ns) == before


@pytest.mark.slow
def test_heldout_precision_at_10(demo_checkpoint: Path) -> None:
    model, preprocess, tokenizer = create_demo_model(demo_checkpoint)
    result = evaluate(model, tokenizer, preprocess, "heldout")
    assert result["num_items"] == 397 and result["k"] == 10
    assert len(result["text_queries"]) == 10 * (len(TRAINING_TEMPLATES) + len(EVALUATION_TEMPLATES))
    evaluation = [t for t in result["templates"] if t["kind"] == "evaluation"]
    assert {t["language"] for t in evaluation} == {"en", "zh"}
    low = {t["template"]: t["mean_precision"] for t in evaluation if t["mean_precision"] < MIN_PRECISION}
    assert not low, f"evaluation phrasings below precision@10 {MIN_PRECISION}: {low}"
    assert result["image_to_image"]["mean_precision"] >= MIN_PRECISION
    # the number recorded next to the checkpoint is the same measurement
    recorded = read_checkpoint_info(demo_checkpoint)["evaluation"]
    assert recorded["summary"] == pytest.approx(result["summary"], abs=1e-6)
