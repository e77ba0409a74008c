"""Readable text for each token of a prompt, in any script.

Byte-level tokenizers (GPT-2's, SmolLM2's, Llama 3's) and sentencepiece with byte fallback split a
character outside their merges into several tokens that each hold a few of its UTF-8 bytes. Decoding such
a token alone gives '�'. `token_texts` decodes the prompt a prefix at a time instead: a token whose bytes
end inside a character is grouped with the tokens that complete it, and every token of the group shows the
group's text with its place in the group ('語' 1/3, '語' 2/3, '語' 3/3). Decoding prefixes also keeps the
leading spaces sentencepiece drops when a token is decoded on its own.

Shapes: T tokens.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

_REPLACEMENT = "\ufffd"  # what a decoder gives for bytes that do not (yet) form a character


@dataclass(frozen=True)
class TokenText:
    """The text a token contributes: its own, or (part > 0) that of a group of byte pieces it belongs to."""

    text: str
    part: int = 0  # 1-based place in a group of byte pieces; 0 = a whole token
    parts: int = 1

    def label(self) -> str:
        """`'text'` for a whole token, `'text' 2/3` for the second of three byte pieces of one text."""
        shown = repr(self.text)
        return f"{shown} {self.part}/{self.parts}" if self.part else shown


def token_texts(tokenizer, ids) -> list[TokenText]:
    """One TokenText per id in `ids` [T] (a list or a 1-d tensor), whatever the script."""
    ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
    out: list[TokenText] = []
    shown, start = "", 0  # decoded text of ids[:start]; the tokens from start on are not placed yet
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end])
        if text.endswith(_REPLACEMENT) and end < len(ids):
            # A character is cut: its remaining bytes come in the next token(s). (A '�' that the text really
            # holds is grouped with the token after it; rare, and the label then still shows it.)
            continue
        # Decoding is not always prefix-stable (clean-up of spaces before punctuation); then the group alone.
        new = text[len(shown):] if text.startswith(shown) else tokenizer.decode(ids[start:end])
        n = end - start
        out += [TokenText(new)] if n == 1 else [TokenText(new, k + 1, n) for k in range(n)]
        shown, start = text, end
    return out


def display_width(text: str) -> int:
    """Terminal columns `text` takes: East Asian wide and full-width characters take two, combining marks none."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def pad(text: str, width: int) -> str:
    """`text` left-aligned in `width` terminal columns (str.ljust counts characters, not columns)."""
    return text + " " * max(0, width - display_width(text))
