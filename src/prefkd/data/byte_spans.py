"""UTF-8 byte spans of a response's tokens: the shared coordinate that aligns two tokenizations of one text
(`prefkd.losses.uld.byte_span_groups`)."""

from __future__ import annotations

import functools
import re

from prefkd.errors import PrefkdError

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves, the others are shifted
    to 256 + n (a space is 'Ġ', a newline 'Ċ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _is_byte_level(tokenizer) -> bool:
    backend = tokenizer.backend_tokenizer
    return "ByteLevel" in repr(backend.pre_tokenizer) or "ByteLevel" in repr(backend.decoder)


def _token_bytes(token: str, byte_level: bool) -> bytes | None:
    """The bytes a token stands for, where its string says so exactly: a byte-fallback token `<0xNN>`, or a token of
    a byte-level tokenizer written in the byte-level alphabet. None otherwise."""
    m = _BYTE_FALLBACK.fullmatch(token)
    if m:
        return bytes([int(m.group(1), 16)])
    if byte_level:
        decoder = byte_level_decoder()
        if token and all(c in decoder for c in token):
            return bytes(decoder[c] for c in token)
    return None


def _place(piece: bytes, text: bytes, start: int, cursor: int) -> int | None:
    """Where `piece` sits in `text`: right after the previous token (tokens that carry their bytes tile the text;
    this also corrects offsets that begin inside the previous token or were trimmed of whitespace), else at the
    offsets' start (the tokenizer dropped some text before it); None if neither holds the piece."""
    for at in dict.fromkeys((cursor, max(start, cursor))):
        if text[at: at + len(piece)] == piece:
            return at
    return None


def response_byte_spans(tokenizer, text: str, split_special_tokens: bool = True
                        ) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, spans): a response text's tokens, encoded alone and without special tokens, and each token's
    (start, end) UTF-8 byte span in `text`.

    The ids are those of `prefkd.logprobs.text_ids` (with `split_special_tokens=True`, a special token's string in
    the text is read as characters; False reads it as the token, as `Renderer.encode` does). Needs a fast tokenizer:
    the spans come from its character offsets (`return_offsets_mapping`), converted to bytes. A tokenizer that cuts a
    multi-byte character between tokens reports the whole character (or more) for each of them, so offsets overlap;
    where a token's bytes are known exactly (byte-level BPE, or a byte-fallback token `<0xNN>`) it is placed at its
    exact bytes instead, which also undoes offsets trimmed of whitespace (`trim_offsets`) and leaves out a prefix
    space the tokenizer added. Spans never overlap and end in increasing order; a token with no bytes of the text
    gets an empty span where the previous one ends. Append an EOS's span yourself:
    (len(text bytes),) * 2.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise PrefkdError("byte spans of tokens need a fast tokenizer (character offsets); this one is not")
    enc = tokenizer(text, add_special_tokens=False, split_special_tokens=split_special_tokens,
                    return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    tokens = tokenizer.convert_ids_to_tokens(ids)
    raw = text.encode("utf-8")
    char_to_byte = [0]
    for ch in text:
        char_to_byte.append(char_to_byte[-1] + len(ch.encode("utf-8")))
    byte_level = _is_byte_level(tokenizer)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, ((c_start, c_end), token) in enumerate(zip(enc["offset_mapping"], tokens, strict=True)):
        start, end = char_to_byte[c_start], char_to_byte[c_end]
        piece = _token_bytes(token, byte_level)
        at = _place(piece, raw, start, cursor) if piece else None
        if at is None and piece and len(piece) > 1 and piece.startswith(b" "):
            piece = piece[1:]  # a prefix space the tokenizer added (add_prefix_space)
            at = _place(piece, raw, start, cursor)
        if at is not None:
            start, end = at, at + len(piece)
        elif start == end:  # no characters (an added prefix space alone, say)
            start = end = max(start, cursor)
        elif start < cursor:
            raise PrefkdError(f"token {i} ({token!r}) of this tokenizer overlaps the previous one in the text (a "
                              "character split across tokens) and its bytes are unknown; byte spans need a byte-level "
                              "or byte-fallback tokenizer here")
        spans.append((start, end))
        cursor = end
    return ids, spans
