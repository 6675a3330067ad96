"""Filter expression validation (retrieval_service/adapters/milvus/filters.py): what is accepted, how it is
re-rendered, what is refused and how the refusal names the token; and that the renderings run on real Milvus Lite
and a Milvus server."""

from __future__ import annotations

import hashlib
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retrieval_service.errors import InvalidFilterError, InvalidInputError
from retrieval_service.adapters.milvus import (
    MAX_DEPTH,
    MAX_FILTER_CHARS,
    MAX_IN_VALUES,
    FilterSyntaxError,
    Row,
    VectorStore,
    validate_filter,
)

ACCEPTED = [
    ("", ""),
    ("   \n ", ""),
    ('metadata["label"] == 3', 'metadata["label"] == 3'),
    ('metadata["label"] == 1 or metadata["label"] == 4', 'metadata["label"] == 1 or metadata["label"] == 4'),
    ('filename like "img_00%"', 'filename like "img_00%"'),
    ("(metadata['label'] == 1 OR metadata[\"label\"] == 2) && ingest_time < 1700000000020",
     '(metadata["label"] == 1 or metadata["label"] == 2) and ingest_time < 1700000000020'),
    ('metadata["label"] in [1, 3]', '(metadata["label"] == 1 or metadata["label"] == 3)'),
    ('metadata["label"] not in [1, 3,]', '(metadata["label"] != 1 and metadata["label"] != 3)'),
    ('id in ["ab", "cd"]', 'id in ["ab", "cd"]'),
    ('id != ""', 'id != ""'),
    ('filename not in ["a.png"]', 'filename not in ["a.png"]'),
    ("filename == 'it\\'s \"quoted\"'", 'filename == "it\'s \\"quoted\\""'),
    ('filename == "back\\\\slash \\u00e9"', 'filename == "back\\\\slash é"'),
    ('metadata["s"] == "手写数字"', 'metadata["s"] == "手写数字"'),
    ("1001 <= ingest_time < 1003", "(ingest_time >= 1001 and ingest_time < 1003)"),
    ('3 > metadata["x"]', 'metadata["x"] < 3'),
    ('not metadata["a"] == true', 'not (metadata["a"] == true)'),
    ('!(filename like "x%")', 'not (filename like "x%")'),
    ('metadata["label"] in [2]', 'metadata["label"] == 2'),
    ('not (metadata["a"] == 1 or id == "b") and not metadata["label"] in [1, 2]',
     'not (metadata["a"] == 1 or id == "b") and not (metadata["label"] == 1 or metadata["label"] == 2)'),
    ('((filename == "a"))', '(filename == "a")'),
    ('filename not like "p%"', 'not (filename like "p%")'),
    ('metadata["a"]["b"][0] == -1.5e3', 'metadata["a"]["b"][0] == -1500.0'),
    ('metadata["flag"] == FALSE', 'metadata["flag"] == false'),
]

# (expression, offending token, position, words the message must contain)
REFUSED = [
    ('metadata["label"] ==== 3', "==", 20, "expected a string, number"),
    ("no_such_field > 3", "no_such_field", 0, "unknown field"),
    ("FILENAME == 'x'", "FILENAME", 0, "unknown field"),
    ("embedding == 1", "embedding", 0, "vector field"),
    ('json_contains(metadata["tags"], "x")', "json_contains", 0, "function calls"),
    ('metadata["label" == 1', "==", 17, "expected ']'"),
    ("filename like", "", 13, "needs a string pattern"),
    ("filename like 3", "3", 14, "needs a string pattern"),
    ("1 +", "+", 2, "unexpected character"),
    ('metadata["a"] + 1 > 2', "+", 14, "unexpected character"),
    ('id > "a"', ">", 3, "only ==, != and in"),
    ('ingest_time == "x"', '"x"', 15, "needs a number"),
    ("ingest_time == 1.5", "1.5", 15, "needs an integer"),
    ("ingest_time like 'x'", "like", 12, "string fields"),
    ("filename == 3", "3", 12, "needs a string"),
    ("metadata == 1", "==", 9, "needs a key"),
    ("filename['a'] == 1", "[", 8, "not a JSON field"),
    ('"abc', '"', 0, "unterminated string"),
    ("filename == 'a' ; drop collection", ";", 16, "unexpected character"),
    ('metadata["a"] in []', "]", 18, "expected a string, number"),
    ("filename", "", 8, "expected a comparison"),
    ('id == "a" id == "b"', "id", 10, "expected 'and', 'or'"),
    ("1 < ingest_time > 3", ">", 16, "a range needs"),
    ('filename == "\\q"', '"\\q"', 12, "unsupported escape"),
    ("ingest_time == 99999999999999999999", "99999999999999999999", 15, "int64"),
    ('metadata["a"] == 1 and', "", 22, "expected a field name"),
    ("not", "", 3, "expected a field name"),
    ('(metadata["a"] == 1', "", 19, "expected ')'"),
    ('metadata["a"] not == 1', "==", 18, "after 'not'"),
]


@pytest.mark.parametrize("expr,expected", ACCEPTED)
def test_accepted_filters_are_rendered_canonically(expr, expected):
    assert validate_filter(expr) == expected
    assert validate_filter(expected) == expected  # the rendering is a fixed point


@pytest.mark.parametrize("expr,token,position,words", REFUSED)
def test_refused_filters_name_the_token_and_position(expr, token, position, words):
    with pytest.raises(FilterSyntaxError) as info:
        validate_filter(expr)
    err = info.value
    assert isinstance(err, InvalidFilterError) and isinstance(err, InvalidInputError)  # -> INVALID_ARGUMENT
    assert (err.token, err.position) == (token, position)
    message = str(err)
    assert words in message and repr(expr) in message
    assert (f"at position {position}" in message) if token else ("at the end" in message or words in message)


def test_limits():
    with pytest.raises(FilterSyntaxError, match=f"the limit is {MAX_FILTER_CHARS}"):
        validate_filter('filename == "' + "x" * MAX_FILTER_CHARS + '"')
    deep = "(" * (MAX_DEPTH + 1) + 'id == "a"' + ")" * (MAX_DEPTH + 1)
    with pytest.raises(FilterSyntaxError, match="nesting deeper"):
        validate_filter(deep)
    shallow = "(" * (MAX_DEPTH - 1) + 'id == "a"' + ")" * (MAX_DEPTH - 1)
    assert validate_filter(shallow) == '(id == "a")'  # redundant parentheses collapse
    values = ", ".join(str(i) for i in range(MAX_IN_VALUES + 1))
    with pytest.raises(FilterSyntaxError, match=f"more than {MAX_IN_VALUES} values"):
        validate_filter(f'metadata["n"] in [{values}]', max_chars=100_000)
    with pytest.raises(InvalidFilterError, match="must be a string"):
        validate_filter(3)  # type: ignore[arg-type]


def test_custom_field_set():
    fields = {"color": "string"}
    assert validate_filter('color == "red"', fields=fields) == 'color == "red"'
    with pytest.raises(FilterSyntaxError, match="allowed: color"):
        validate_filter('filename == "a"', fields=fields)


# --- every accepted rendering runs on real Milvus (Lite and server) and selects what it says ----------------------

NAMES = ['a"b.png', "手写.png", "c'd.png", "plain.png", "back\\slash.png", "é.png"]


@pytest.fixture(scope="module", params=["lite", "server"])
def lite(request, tmp_path_factory):
    if request.param == "lite":
        uri = str(tmp_path_factory.mktemp("filters") / "milvus.db")
    else:
        uri = request.getfixturevalue("milvus_server_uri")
    store = VectorStore(uri, f"filters_{uuid.uuid4().hex[:12]}", 4, model_id="test")
    rows = [Row(hashlib.sha256(n.encode()).hexdigest(), np.array([1, i + 1, 0, 0], np.float32), n, 1000 + i,
                {"label": i, "s": n, "tags": ["x", str(i)], "nested": {"k": i}, "flag": i % 2 == 0})
            for i, n in enumerate(NAMES)]
    store.insert(rows)
    store.flush()
    yield store, rows
    store.close()


@pytest.mark.parametrize("expr,expected", [
    ('filename == \'a"b.png\'', ['a"b.png']),
    ('filename == "手写.png"', ["手写.png"]),
    ("filename == \"c'd.png\"", ["c'd.png"]),
    ('filename == "back\\\\slash.png"', ["back\\slash.png"]),
    ('filename == "\\u00e9.png"', ["é.png"]),
    ('metadata["label"] in [1, 3]', ["手写.png", "plain.png"]),
    ('metadata["label"] not in [0, 1, 2, 3]', ["back\\slash.png", "é.png"]),
    ('metadata["s"] like "手%"', ["手写.png"]),
    # (a Milvus 2.3 server takes only prefix patterns)
    ('filename not like "p%"', ['a"b.png', "手写.png", "c'd.png", "back\\slash.png", "é.png"]),
    ("1001 <= ingest_time < 1003", ["手写.png", "c'd.png"]),
    ('metadata["nested"]["k"] == 2', ["c'd.png"]),
    ('metadata["tags"][1] == "4"', ["back\\slash.png"]),
    ('not metadata["label"] >= 1', ['a"b.png']),
    ('metadata["flag"] == true and metadata["label"] > 0', ["c'd.png", "back\\slash.png"]),
    ('id in ["%s"]' % hashlib.sha256(b"plain.png").hexdigest(), ["plain.png"]),
])
def test_rendered_filters_select_on_milvus(lite, expr, expected):
    store, _ = lite
    hits = store.search(np.ones((1, 4), np.float32), 10, filter=expr)[0]
    assert sorted(h.filename for h in hits) == sorted(expected)
    assert store.count(expr) == len(expected)


def test_store_refuses_before_milvus(lite):
    store, rows = lite
    with pytest.raises(FilterSyntaxError, match="vector field"):
        store.search(np.ones((1, 4), np.float32), 5, filter="embedding == 1")
    with pytest.raises(FilterSyntaxError, match="function calls"):
        store.delete(filter='json_contains(metadata["tags"], "x")')
    assert store.count() == len(rows)


# --- any text: either a canonical expression (a fixed point) or FilterSyntaxError, never another exception -------

_PIECES = st.sampled_from(['metadata["label"]', "filename", "id", "ingest_time", "embedding", "and", "or", "not",
                           "like", "in", "==", "!=", "<", ">=", "(", ")", "[", "]", ",", "-", "1", "2.5", '"a%"',
                           "'b'", "true", "x", "f(", ";", '"\\u00e9"', '"\\', "\x00", " "])


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=60), st.lists(_PIECES, max_size=12).map(" ".join)))
def test_any_text_is_rendered_or_refused(expr):
    try:
        rendered = validate_filter(expr)
    except FilterSyntaxError as err:
        assert 0 <= err.position <= len(expr)
        assert expr[err.position:].startswith(err.token)
        return
    assert validate_filter(rendered) == rendered
