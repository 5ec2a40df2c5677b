"""Answer checkers for sampled completions (used by scripts/sample.py).

* ``exact``: the whole completion equals the reference after normalisation
  (lowercase, whitespace collapsed, trailing punctuation dropped).
* ``boxed``: the last ``\\boxed{...}`` of the completion (nested braces allowed) or,
  without one, its last number; compared numerically with the reference when both
  read as numbers, else as normalised text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

_TRAILING_PUNCT = ".,;:!?"
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_FRAC = re.compile(r"^(-?)\\d?frac\{([^{}]+)\}\{([^{}]+)\}$")


def normalize(text: str) -> str:
    """Lowercase, collapse whitespace, strip, drop trailing punctuation."""
    text = " ".join(text.lower().split())
    return text.rstrip(_TRAILING_PUNCT).rstrip()


def check_exact(completion: str, answer: str) -> bool:
    return normalize(completion) == normalize(answer)


def extract_boxed(text: str) -> str | None:
    """Content of the last balanced ``\\boxed{...}``, or None."""
    start = text.rfind("\\boxed{")
    while start != -1:
        depth, pos = 0, start + len("\\boxed")
        for end in range(pos, len(text)):
            if text[end] == "{":
                depth += 1
            elif text[end] == "}":
                depth -= 1
                if depth == 0:
                    return text[pos + 1 : end]
        # Unbalanced (e.g. cut by max_new_tokens): try the previous one.
        start = text.rfind("\\boxed{", 0, start)
    return None


def extract_last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def to_number(text: str) -> float | None:
    """Read '1,234', '$5', '50\\%', '3/4', '\\frac{3}{4}', '-2.5' as a float; else None."""
    s = text.strip().strip("$").replace("\\$", "").replace("\\%", "").rstrip("%")
    s = s.replace("\\!", "").replace(" ", "").rstrip(_TRAILING_PUNCT)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    frac = _FRAC.match(s)
    if frac:
        s = f"{frac[1]}{frac[2]}/{frac[3]}"
    if "_" in s:  # float() would accept "1_000"
        return None
    try:
        if s.count("/") == 1:
            num, den = s.split("/")
            return float(num) / float(den)
        value = float(s)
    except (ValueError, ZeroDivisionError):
        return None
    return value if math.isfinite(value) else None


def check_boxed(completion: str, answer: str) -> bool:
    predicted = extract_boxed(completion)
    if predicted is None:
        predicted = extract_last_number(completion)
    if predicted is None:
        return False
    a, b = to_number(predicted), to_number(answer)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return normalize(predicted) == normalize(answer)


CHECKERS: dict[str, Callable[[str, str], bool]] = {"exact": check_exact, "boxed": check_boxed}
