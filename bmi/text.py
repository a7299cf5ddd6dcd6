"""Text from outside, shown to people: a PD's values, a remote host's answers, a client's request id."""
from __future__ import annotations


def printable(text: str, keep: str = "") -> str:
    """text with every character that is not printable (controls, ESC, CR, bidi overrides) but those in `keep`
    written as its Python escape (ESC -> \\x1b): shown as it is, unable to drive a terminal or forge a line."""
    plain = text
    for char in keep:
        plain = plain.replace(char, "")
    if plain.isprintable():         # (the usual case, at C speed)
        return text
    return "".join(c if c.isprintable() or c in keep else c.encode("unicode_escape").decode("ascii") for c in text)
