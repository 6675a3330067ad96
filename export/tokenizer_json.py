"""Write the model's open_clip tokenizer as a HF `tokenizers` file (tokenizer.json).

Two open_clip tokenizer kinds are supported:

- `open_clip.tokenizer.SimpleTokenizer` (OpenAI CLIP byte-level BPE; ViT-B-32, the demo model):
  rebuilt from the tokenizer's own `encoder` and `bpe_ranks` the way `transformers`'
  `CLIPConverter` does (src/transformers/convert_slow_tokenizer.py):
    normalizer     NFC, `\\s+` -> " ", strip, lowercase (lowercase only for open_clip clean='lower')
    pre-tokenizer  Split on CLIP's regex (isolating matches, dropping the rest) + ByteLevel(use_regex=False)
    model          BPE with end_of_word_suffix "</w>"
    post-processor <start_of_text> $A <end_of_text>
    truncation     context_length tokens including the two special tokens; padding to
                   context_length with id 0 (open_clip's `torch.zeros` padding).
  open_clip truncates `[sot] + ids + [eot]` to context_length and overwrites the last kept id with
  <eot>; that equals keeping the first context_length - 2 ids and appending <eot>, which is what
  `tokenizers` truncation (it reserves room for the post-processor's special tokens) does.
- `open_clip.tokenizer.HFTokenizer` (e.g. xlm-roberta-base-ViT-B-32): the wrapped fast tokenizer's
  own tokenizer.json with truncation and padding set to `max_length=context_length`, as
  HFTokenizer calls it (`padding='max_length', truncation=True`).

open_clip also cleans text in Python before tokenizing (`ftfy.fix_text`, `html.unescape` twice,
whitespace collapse, and for clean='lower' `str.lower`). The normalizer above cannot run ftfy, so
the serving side (`vitrine.tokenizer.TextTokenizer`) repeats that cleaning; it reads the
clean mode from this file: a `Lowercase` normalizer step means clean='lower', none means
clean='whitespace'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from export import ExportError

# open_clip.tokenizer.SimpleTokenizer.pat without the special-token alternatives (those are added
# tokens here). open_clip compiles it with re.IGNORECASE, which only matters for the contractions.
CLIP_SPLIT_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CLIP_PAD_ID = 0  # open_clip pads its result tensor with zeros
_CANONICALIZE = "open_clip clean='canonicalize' (punctuation removal) is not supported by the exporter"


def clean_mode(open_clip_tokenizer: Any) -> str:
    """Return the open_clip text-cleaning mode of a tokenizer: 'lower', 'whitespace' or 'canonicalize'.

    Raises:
        ExportError: the tokenizer's clean function is not one of open_clip's three.
    """
    from open_clip import tokenizer as oct

    fn = getattr(open_clip_tokenizer, "clean_fn", None)
    modes = {
        oct._clean_lower: "lower",
        oct._clean_whitespace: "whitespace",
        oct._clean_canonicalize: "canonicalize",
    }
    if fn not in modes:
        raise ExportError(
            f"unknown open_clip text clean function {fn!r} on {type(open_clip_tokenizer).__name__}"
        )
    return modes[fn]


def clip_bpe_tokenizer(open_clip_tokenizer: Any, context_length: int) -> Tokenizer:
    """Build a `tokenizers.Tokenizer` equal to an open_clip `SimpleTokenizer` (see module docstring).

    Args:
        open_clip_tokenizer: an `open_clip.tokenizer.SimpleTokenizer` without a reduction mask.
        context_length: tokens per row (the model's text context length, e.g. 77).

    Raises:
        ExportError: the tokenizer uses a token-reduction mask (random/syntax/simple masking) or
            the 'canonicalize' clean mode, which have no exact tokenizer.json equivalent.
    """
    tok = open_clip_tokenizer
    if getattr(tok, "reduction_fn", None) is not None:
        raise ExportError(
            "open_clip tokenizer with a reduction_mask (token dropping) cannot be exported exactly"
        )
    mode = clean_mode(tok)
    if mode == "canonicalize":
        raise ExportError(_CANONICALIZE)

    vocab: dict[str, int] = dict(tok.encoder)
    merges = [pair for pair, _ in sorted(tok.bpe_ranks.items(), key=lambda item: item[1])]
    special_ids = list(tok.all_special_ids)
    special_tokens = [tok.decoder[i] for i in special_ids]

    bpe = models.BPE(
        vocab=vocab,
        merges=merges,
        continuing_subword_prefix="",
        end_of_word_suffix="</w>",
        fuse_unk=False,
        dropout=None,
    )
    tokenizer = Tokenizer(bpe)
    steps = [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    if mode == "lower":
        steps.append(normalizers.Lowercase())
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    # Decoding (not used for serving): "</w>" -> byte-level space "Ġ", bytes -> text, drop the last space.
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("</w>", "\u0120"), decoders.ByteLevel(), decoders.Strip(" ", 0, 1)]
    )
    # normalized=True: open_clip's regex finds special tokens in the cleaned (lowercased) text too.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=True) for t in special_tokens])
    sot, eot = special_tokens[0], special_tokens[1]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{sot} $A {eot}",
        pair=f"{sot} $A {eot} $B {eot}",
        special_tokens=[(sot, tok.sot_token_id), (eot, tok.eot_token_id)],
    )
    tokenizer.enable_truncation(max_length=context_length)
    tokenizer.enable_padding(length=context_length, pad_id=CLIP_PAD_ID, pad_token=tok.decoder[CLIP_PAD_ID])
    return tokenizer


def hf_tokenizer(open_clip_tokenizer: Any, context_length: int) -> Tokenizer:
    """The `tokenizers.Tokenizer` inside an open_clip `HFTokenizer`, set up as HFTokenizer calls it.

    Raises:
        ExportError: the wrapped tokenizer is not a fast (Rust) tokenizer, or the HFTokenizer uses
            'clips' mode, `strip_sep_token` or clean='canonicalize' (no exact equivalent).
    """
    tok = open_clip_tokenizer
    if getattr(tok, "tokenizer_mode", ""):
        raise ExportError(f"open_clip HFTokenizer tokenizer_mode={tok.tokenizer_mode!r} is not supported")
    if getattr(tok, "strip_sep_token", False):
        raise ExportError("open_clip HFTokenizer with strip_sep_token=True is not supported")
    mode = clean_mode(tok)
    if mode == "canonicalize":
        raise ExportError(_CANONICALIZE)
    backend = getattr(tok.tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(
            f"{type(tok.tokenizer).__name__} is not a fast tokenizer; no tokenizer.json exists for it"
        )
    tokenizer = Tokenizer.from_str(backend.to_str())
    if mode == "lower":
        # Marks clean='lower' for the serving side (see module docstring); idempotent after str.lower.
        existing = [tokenizer.normalizer] if tokenizer.normalizer is not None else []
        tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), *existing])
    pad_id = tok.tokenizer.pad_token_id
    pad_token = tok.tokenizer.pad_token
    if pad_id is None or pad_token is None:
        raise ExportError(f"HF tokenizer {tok.tokenizer.name_or_path!r} has no pad token")
    tokenizer.enable_truncation(max_length=context_length)
    tokenizer.enable_padding(length=context_length, pad_id=pad_id, pad_token=pad_token)
    return tokenizer


def build_tokenizer(open_clip_tokenizer: Any, context_length: int) -> tuple[Tokenizer, int]:
    """Return (`tokenizers.Tokenizer` equal to `open_clip_tokenizer`, pad id).

    Raises:
        ExportError: an open_clip tokenizer kind without a tokenizer.json equivalent (e.g. SigLipTokenizer).
    """
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    if isinstance(open_clip_tokenizer, SimpleTokenizer):
        return clip_bpe_tokenizer(open_clip_tokenizer, context_length), CLIP_PAD_ID
    if isinstance(open_clip_tokenizer, HFTokenizer):
        tokenizer = hf_tokenizer(open_clip_tokenizer, context_length)
        return tokenizer, int(open_clip_tokenizer.tokenizer.pad_token_id)
    raise ExportError(
        f"open_clip tokenizer {type(open_clip_tokenizer).__name__} is not supported "
        "(supported: SimpleTokenizer, HFTokenizer)"
    )


def write_tokenizer_json(open_clip_tokenizer: Any, path: Path, context_length: int) -> int:
    """Write tokenizer.json for `open_clip_tokenizer` to `path`; returns the pad id.

    Raises:
        ExportError: see `build_tokenizer`.
    """
    tokenizer, pad_id = build_tokenizer(open_clip_tokenizer, context_length)
    tokenizer.save(str(path), pretty=False)
    return pad_id
