r"""Validation of client filter expressions before they reach Milvus: the one home of the filter grammar.

A request's `filter` is a Milvus boolean expression. Sent as is, it could name any field of the collection
(the `embedding` vector field included), call Milvus functions, or hit parser differences between Milvus Lite
and a Milvus server. `validate_filter` parses it with the small grammar below, allows only the collection's
scalar fields (`FIELDS`, read from the schema table in retrieval_service.adapters.milvus.schema) and returns a
canonical re-rendering of the parse tree as a `FilterExpr`: Milvus only ever sees text this module produced,
never the client's text. The store (retrieval_service.adapters.milvus.store) validates a plain `str` filter
itself and passes a `FilterExpr` through, so a filter validated at the edge of a request is parsed once.

Grammar (EBNF; keywords are case-insensitive, `&&` `||` `!` are synonyms of `and` `or` `not`):

    filter     = [ or_expr ] ;                         (* empty or whitespace: no filter *)
    or_expr    = and_expr { ("or" | "||") and_expr } ;
    and_expr   = unary { ("and" | "&&") unary } ;
    unary      = ("not" | "!") unary | "(" or_expr ")" | predicate ;
    predicate  = field cmp literal
               | field ["not"] "like" string
               | field ["not"] "in" "[" literal { "," literal } [","] "]"
               | literal cmp field [ cmp literal ] ;   (* 3 < x, 1 <= x < 5; both cmp point the same way *)
    field      = "id" | "filename" | "ingest_time" | "metadata" "[" key "]" { "[" key "]" } ;
    key        = string | non-negative integer ;       (* JSON path: metadata["a"]["b"], metadata["tags"][0] *)
    cmp        = "==" | "!=" | "<" | "<=" | ">" | ">=" ;
    literal    = string | number | "true" | "false" ;
    string     = '"' chars '"' | "'" chars "'" ;       (* escapes: \\ \" \' \/ \n \t \r \uXXXX *)
    number     = ["-"] digits [ "." digits ] [ ("e"|"E") ["+"|"-"] digits ] ;

Types: `id` and `filename` are strings (`id` allows only ==, != and in: it is a content hash, ranges over it
mean nothing); `ingest_time` is an int64 (ms since the epoch; numbers only, no `like`); `metadata[...]` is JSON
and takes any literal. Anything else — other identifiers (`embedding`, other collections' fields), function
calls (`json_contains(...)`), arithmetic, bare fields — is rejected with the offending token and its 0-based
character position.

Rewrites, so both Milvus backends accept the result: `x in [a, b]` on a metadata path becomes
`(x == a or x == b)` (Milvus Lite 3.2.2 rejects `in` on JSON paths: 'left side of in must be a field reference'),
`not in` there becomes `(x != a and x != b)`; `a < x < b` becomes `(x > a and x < b)`; `not` always wraps its
operand in parentheses; strings are re-quoted with double quotes (JSON escapes, which Milvus' parser reads).

Limits: `MAX_FILTER_CHARS` characters, `MAX_DEPTH` nesting levels, `MAX_IN_VALUES` values per `in` list.

Backend differences left to Milvus (its refusal is INVALID_ARGUMENT with its own message): a Milvus 2.3 server
accepts only prefix `like` patterns ('ab%'); Milvus Lite and Milvus >= 2.4 also take '%ab' and '%ab%'.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

from retrieval_service.adapters.milvus.schema import FIELDS as SCHEMA_FIELDS, FilterKind
from retrieval_service.errors import InvalidFilterError

#: The filterable fields of a Vitrine collection and their kinds, from the schema table
#: (retrieval_service.adapters.milvus.schema.FIELDS). `embedding` (FLOAT_VECTOR) has no filter kind: absent.
FIELDS: Mapping[str, FilterKind] = {f.name: f.filter_kind for f in SCHEMA_FIELDS if f.filter_kind is not None}
#: Fields of the collection that no filter may name (the vector), refused with their own message.
_UNFILTERABLE = frozenset(f.name for f in SCHEMA_FIELDS if f.filter_kind is None)
#: Longest filter accepted, characters.
MAX_FILTER_CHARS = 4096
#: Deepest nesting of parentheses / not accepted.
MAX_DEPTH = 32
#: Most values in one `in [...]` list.
MAX_IN_VALUES = 1000
_INT64 = (-(2**63), 2**63 - 1)

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
    |(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    |(?P<number>(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)
    |(?P<name>[A-Za-z_][A-Za-z0-9_]*)
    |(?P<op>==|!=|<=|>=|&&|\|\||<|>|!|\(|\)|\[|\]|,|-)
    """,
    re.VERBOSE | re.DOTALL,
)
_KEYWORDS = {"and", "or", "not", "like", "in", "true", "false"}
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t", "r": "\r", "/": "/"}
_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|.)", re.DOTALL)
_CMP = ("==", "!=", "<", "<=", ">", ">=")
_FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}


class FilterExpr(str):
    """A filter expression already validated and rendered by `validate_filter` (the text Milvus will see).

    Only `validate_filter` makes one; the store sends it to Milvus as is, without parsing it again. A plain
    `str` is always validated first.
    """

    __slots__ = ()


class FilterSyntaxError(InvalidFilterError):
    """A filter expression was refused by `validate_filter`.

    Attributes:
        token: the offending token as written ('' at the end of the expression).
        position: its 0-based character offset in the expression.
    """

    def __init__(self, expr: str, problem: str, token: str, position: int) -> None:
        shown = expr if len(expr) <= 200 else expr[:200] + "..."
        super().__init__(f"invalid filter {shown!r}: {problem}")
        self.token = token
        self.position = position


@dataclass(frozen=True)
class _Tok:
    kind: str  # 'string' 'number' 'name' 'kw' 'op' 'end' 'bad' (a character no token starts with)
    text: str  # as written (keywords lowercased; '&&' '||' '!' mapped to and/or/not)
    pos: int
    raw: str


@dataclass(frozen=True)
class _Lit:
    kind: Literal["string", "number", "bool"]
    rendered: str


def _tokenize(expr: str) -> Iterator[_Tok]:
    """Yield tokens lazily, so a bad character is reported only if the parse gets that far (first error wins)."""
    pos = 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:  # reported by the parser when it reaches this token
            while True:
                yield _Tok("bad", expr[pos], pos, expr[pos])
        kind, raw = m.lastgroup or "", m.group()
        if kind != "ws":
            text = raw
            if kind == "name" and raw.lower() in _KEYWORDS:
                kind, text = "kw", raw.lower()
            elif kind == "op" and raw in ("&&", "||", "!"):
                kind, text = "kw", {"&&": "and", "||": "or", "!": "not"}[raw]
            yield _Tok(kind, text, pos, raw)
        pos = m.end()
    while True:
        yield _Tok("end", "", len(expr), "")


class _Parser:
    def __init__(self, expr: str, fields: Mapping[str, FilterKind]) -> None:
        self.expr = expr
        self.fields = fields
        self._stream = _tokenize(expr)
        self._tok = next(self._stream)
        self.depth = 0

    # --- helpers ---------------------------------------------------------------------------------------------

    @property
    def tok(self) -> _Tok:
        return self._tok

    def _next(self) -> _Tok:
        tok = self._tok
        self._tok = next(self._stream)
        return tok

    def _fail(self, problem: str, tok: _Tok | None = None) -> FilterSyntaxError:
        tok = tok or self.tok
        if tok.kind == "bad":
            problem = ("unterminated string starting at position" if tok.raw in "\"'"
                       else f"unexpected character {tok.raw!r} at position")
            return FilterSyntaxError(self.expr, f"{problem} {tok.pos}", tok.raw, tok.pos)
        where = "at the end" if tok.kind == "end" else f"{tok.raw!r} at position {tok.pos}"
        return FilterSyntaxError(self.expr, f"{problem}: {where}" if problem else f"unexpected {where}",
                                 tok.raw, tok.pos)

    def _is(self, kind: str, text: str | None = None) -> bool:
        return self.tok.kind == kind and (text is None or self.tok.text == text)

    def _expect_op(self, text: str, what: str) -> _Tok:
        if not self._is("op", text):
            raise self._fail(f"expected {what}")
        return self._next()

    def _allowed(self) -> str:
        return ", ".join(f'{name}["<key>"]' if kind == "json" else name for name, kind in self.fields.items())

    # --- grammar ---------------------------------------------------------------------------------------------

    # Each rule returns (text, wrapped): `wrapped` = the text is one parenthesized unit, so a group around it
    # adds no second pair of parentheses (the rendering is a fixed point: rendering it again gives it back).
    # `and` binds tighter than `or` in Milvus as here, so only groups and rewrites need parentheses.

    def parse(self) -> str:
        if self._is("end"):
            return ""
        out, _ = self._or()
        if not self._is("end"):
            raise self._fail("expected 'and', 'or' or the end of the filter")
        return out

    def _or(self) -> tuple[str, bool]:
        parts = [self._and()]
        while self._is("kw", "or"):
            self._next()
            parts.append(self._and())
        return parts[0] if len(parts) == 1 else (" or ".join(t for t, _ in parts), False)

    def _and(self) -> tuple[str, bool]:
        parts = [self._unary()]
        while self._is("kw", "and"):
            self._next()
            parts.append(self._unary())
        return parts[0] if len(parts) == 1 else (" and ".join(t for t, _ in parts), False)

    def _unary(self) -> tuple[str, bool]:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self._fail(f"nesting deeper than {MAX_DEPTH} levels")
        try:
            if self._is("kw", "not"):
                self._next()
                text, wrapped = self._unary()
                return (f"not {text}" if wrapped else f"not ({text})"), False
            if self._is("op", "("):
                self._next()
                text, wrapped = self._or()
                self._expect_op(")", "')'")
                return (text if wrapped else f"({text})"), True
            return self._predicate()
        finally:
            self.depth -= 1

    def _predicate(self) -> tuple[str, bool]:
        if self.tok.kind in ("string", "number") or self._is("op", "-") or self._is("kw", "true") \
                or self._is("kw", "false"):
            return self._literal_first()
        name, kind = self._field()
        tok = self.tok
        if tok.kind == "op" and tok.text in _CMP:
            self._next()
            lit_tok = self.tok
            lit = self._literal()
            self._check_cmp(name, kind, tok, lit, lit_tok)
            return f"{name} {tok.text} {lit.rendered}", False
        negate = False
        if self._is("kw", "not"):
            negate = True
            self._next()
            if not (self._is("kw", "like") or self._is("kw", "in")):
                raise self._fail("expected 'like' or 'in' after 'not'")
        if self._is("kw", "like"):
            like = self._next()
            if kind not in ("string", "json"):
                raise self._fail(f"'like' applies to string fields, not {name}", like)
            if self.tok.kind != "string":
                raise self._fail("'like' needs a string pattern")
            pattern = self._literal()
            out = f"{name} like {pattern.rendered}"
            return (f"not ({out})" if negate else out), False
        if self._is("kw", "in"):
            return self._in(name, kind, negate)
        raise self._fail(f"expected a comparison ({', '.join(_CMP)}), 'like' or 'in' after {name}")

    def _in(self, name: str, kind: FilterKind, negate: bool) -> tuple[str, bool]:
        self._next()
        self._expect_op("[", "'[' starting the list of 'in'")
        values: list[str] = []
        while True:
            if self._is("op", "]") and values:
                break
            lit_tok = self.tok
            lit = self._literal()
            self._check_cmp(name, kind, _Tok("op", "==", lit_tok.pos, "in"), lit, lit_tok)
            values.append(lit.rendered)
            if len(values) > MAX_IN_VALUES:
                raise self._fail(f"more than {MAX_IN_VALUES} values in an 'in' list", lit_tok)
            if self._is("op", ","):
                self._next()
                continue
            break
        self._expect_op("]", "',' or ']' in the list of 'in'")
        if kind == "json":
            op, joiner = ("!=", " and ") if negate else ("==", " or ")
            if len(values) == 1:
                return f"{name} {op} {values[0]}", False
            return "(" + joiner.join(f"{name} {op} {v}" for v in values) + ")", True
        return f"{name} {'not in' if negate else 'in'} [{', '.join(values)}]", False

    def _literal_first(self) -> tuple[str, bool]:
        lo_tok = self.tok
        lo = self._literal()
        op1 = self.tok
        if not (op1.kind == "op" and op1.text in _CMP):
            raise self._fail("expected a comparison after a literal")
        self._next()
        name, kind = self._field()
        self._check_cmp(name, kind, op1, lo, lo_tok)
        first = f"{name} {_FLIP[op1.text]} {lo.rendered}"
        op2 = self.tok
        if not (op2.kind == "op" and op2.text in _CMP):
            return first, False
        if {op1.text[0], op2.text[0]} not in ({"<"}, {">"}):
            raise self._fail("a range needs two '<'/'<=' or two '>'/'>=' comparisons", op2)
        self._next()
        hi_tok = self.tok
        hi = self._literal()
        self._check_cmp(name, kind, op2, hi, hi_tok)
        return f"({first} and {name} {op2.text} {hi.rendered})", True

    def _field(self) -> tuple[str, FilterKind]:
        tok = self.tok
        if tok.kind != "name":
            raise self._fail("expected a field name")
        self._next()
        if self._is("op", "("):
            raise self._fail("function calls are not allowed", tok)
        if tok.text in _UNFILTERABLE:
            raise self._fail("the vector field cannot be filtered", tok)
        kind = self.fields.get(tok.text)
        if kind is None:
            raise self._fail(f"unknown field (allowed: {self._allowed()})", tok)
        if kind != "json":
            if self._is("op", "["):
                raise self._fail(f"{tok.text} is not a JSON field; it takes no [key]")
            return tok.text, kind
        if not self._is("op", "["):
            raise self._fail(f'{tok.text} needs a key, e.g. {tok.text}["label"]')
        path = tok.text
        while self._is("op", "["):
            self._next()
            key = self.tok
            if key.kind == "string":
                path += f"[{self._literal().rendered}]"
            elif key.kind == "number" and key.text.isdigit():
                self._next()
                path += f"[{int(key.text)}]"
            else:
                raise self._fail("expected a string key or an array index")
            self._expect_op("]", "']'")
        return path, kind

    def _literal(self) -> _Lit:
        tok = self.tok
        if tok.kind == "string":
            self._next()
            return _Lit("string", json.dumps(self._unquote(tok), ensure_ascii=False))
        if tok.kind == "kw" and tok.text in ("true", "false"):
            self._next()
            return _Lit("bool", tok.text)
        sign = ""
        if self._is("op", "-"):
            sign = "-"
            self._next()
            if self.tok.kind != "number":
                raise self._fail("expected a number after '-'")
            tok = self.tok
        if tok.kind == "number":
            self._next()
            text = sign + tok.text
            if re.fullmatch(r"-?\d+", text):
                value = int(text)
                if not _INT64[0] <= value <= _INT64[1]:
                    raise self._fail("integer out of the int64 range", tok)
                return _Lit("number", str(value))
            number = float(text)
            if number in (float("inf"), float("-inf")):
                raise self._fail("number out of range", tok)
            return _Lit("number", repr(number))
        raise self._fail("expected a string, number, true or false")

    def _unquote(self, tok: _Tok) -> str:
        def replace(m: re.Match[str]) -> str:
            esc = m.group(1)
            if esc.startswith("u") and len(esc) == 5:
                if 0xD800 <= int(esc[1:], 16) <= 0xDFFF:  # a lone UTF-16 surrogate is no character (fuzzing found it)
                    raise FilterSyntaxError(self.expr, f"escape '\\{esc}' is a UTF-16 surrogate, not a character "
                                                       f"(string at position {tok.pos})", tok.raw, tok.pos)
                return chr(int(esc[1:], 16))
            if esc in _ESCAPES:
                return _ESCAPES[esc]
            raise FilterSyntaxError(self.expr, f"unsupported escape '\\{esc}' in the string at position {tok.pos}",
                                    tok.raw, tok.pos)

        return _ESCAPE.sub(replace, tok.raw[1:-1])

    def _check_cmp(self, name: str, kind: FilterKind, op: _Tok, lit: _Lit, lit_tok: _Tok) -> None:
        if kind == "json":
            return
        if kind == "id" and op.text not in ("==", "!="):
            raise self._fail("id (a content hash) takes only ==, != and in", op)
        want = "number" if kind == "int64" else "string"
        if lit.kind != want:
            raise self._fail(f"{name} is compared with a {lit.kind}; it needs a {want}", lit_tok)
        if kind == "int64" and not re.fullmatch(r"-?\d+", lit.rendered):
            raise self._fail(f"{name} is an integer (ms since the epoch); it needs an integer", lit_tok)


def validate_filter(expr: str, *, fields: Mapping[str, FilterKind] = FIELDS,
                    max_chars: int = MAX_FILTER_CHARS) -> FilterExpr:
    """Check a client filter expression and return the canonical expression to send to Milvus.

    Args:
        expr: the filter as the client wrote it (grammar in the module docstring); '' or whitespace = no filter.
        fields: filterable field names and kinds (default `FIELDS`, the Vitrine collection schema).
        max_chars: longest accepted expression, characters.

    Returns:
        The expression re-rendered from its parse tree, a `FilterExpr` (a str; '' for no filter); `in` on metadata
        and ranges rewritten as described in the module docstring.

    Raises:
        FilterSyntaxError (an InvalidFilterError -> INVALID_ARGUMENT): not a string, too long, or not in the
            grammar; the message names the offending token and its 0-based position.
    """
    if not isinstance(expr, str):
        raise InvalidFilterError(f"filter must be a string, got {type(expr).__name__}")
    if len(expr) > max_chars:
        raise FilterSyntaxError(expr, f"filter has {len(expr)} characters; the limit is {max_chars}",
                                expr[max_chars:max_chars + 1], max_chars)
    return FilterExpr(_Parser(expr, fields).parse())
