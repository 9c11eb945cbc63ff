"""Conditions: a small, safe comparison language over the saga's data.

A step may run only when its condition holds, and an event may start a saga only when it passes
a filter. A condition is text, parsed once when the definition loads, then evaluated purely:
there is no ``eval``, no attribute access and no calls, only paths, literals and comparisons.

    $.input.total > 100
    $.steps.risk.output.level == "high" or $.input.vip == true
    not exists($.input.coupon) and $.input.country in ["FR", "BE"]

The grammar, loosest first::

    condition  := and ("or" and)*
    and        := not ("and" not)*
    not        := "not" not | primary
    primary    := "(" condition ")" | "exists" "(" PATH ")" | comparison
    comparison := operand ("==" | "!=" | "<" | "<=" | ">" | ">=" | "in" | "not" "in") operand
    operand    := PATH | literal
    literal    := NUMBER | STRING | "true" | "false" | "null" | list
    list       := "[" [literal ("," literal)* [","]] "]"

Paths are the templates of `saga.core.dataflow` (``$.input...``, ``$.steps.NAME.output...``,
``$.saga_id``) and are resolved by it, plus ``$.item...``, an item of a fan-out (for
conditions evaluated per item; a step's ``when`` is checked before the step fans out, so the
definition rules refuse ``$.item`` there). A path's names are letters, ASCII digits,
``_`` and ``-``; digits index lists. Strings take double or single quotes and the escapes
``\\\\ \\" \\' \\n \\r \\t \\/ \\uXXXX``; numbers are JSON numbers. Keywords are lowercase.

Semantics, chosen so that evaluation is total (it never raises) and deterministic:

- Equality is JSON equality: ``1 == 1.0`` holds, ``true == 1`` does not, lists and objects
  compare element by element; strings compare by code point (no Unicode normalisation).
- Ordering (``< <= > >=``) holds only between two numbers or two strings; any other pair
  (a number and a string, ``null``, lists, booleans) simply does not hold.
- ``x in L`` holds when the list ``L`` has an element equal to ``x``; ``not in`` is its
  negation. When ``L`` is not a list, neither holds.
- A comparison that reads a missing path is *undecided*. ``not``, ``and`` and ``or`` follow
  three-valued (Kleene) logic: ``false and undecided`` is false, ``true or undecided`` is true,
  ``not undecided`` is undecided, and a condition that ends undecided is false. So a missing
  path makes the condition false unless the rest decides it regardless; ``exists($.path)``
  (true even when the value is ``null``) is how to test for presence.

`Condition.explain` says which comparisons decided the outcome, with the values it saw.
A condition is at most 1000 characters and 32 levels of nesting; `parse` raises
`ConditionError` (with the 1-based position and what was expected) for anything else.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from saga.core import dataflow
from saga.errors import SagaError

__all__ = ["MAX_DEPTH", "MAX_LENGTH", "NO_ITEM", "Condition", "ConditionError", "Scope", "parse"]

MAX_LENGTH: Final = 1000
"""The longest condition `parse` accepts, in characters."""

MAX_DEPTH: Final = 32
"""The deepest nesting of parentheses, ``not`` and list literals `parse` accepts."""


class ConditionError(SagaError, ValueError):
    """A condition's text is not in the language.

    Attributes:
        position: The 1-based character position where the problem was found (one past the
            end for a condition that stops too early), or 0 when the text is not a string.
        expected: What was expected there, in words.
        text: The condition's text.
    """

    def __init__(self, expected: str, position: int, text: str) -> None:
        super().__init__(f"at {position}: {expected}" if position else expected)
        self.position = position
        self.expected = expected
        self.text = text


class _NoItem:
    def __repr__(self) -> str:
        return "NO_ITEM"


NO_ITEM: Final = _NoItem()
"""The `Scope.item` of a step that does not run for a fan-out item."""


@dataclass(frozen=True)
class Scope:
    """The data a condition reads: what `dataflow.render` resolves against, plus a fan-out item."""

    saga_id: str = ""
    """The saga's id (``$.saga_id``)."""
    saga_input: Mapping[str, Any] = field(default_factory=dict)
    """The saga's input (``$.input...``)."""
    outputs: Mapping[str, Any] = field(default_factory=dict)
    """The outputs of the steps that have one, by step name (``$.steps.NAME.output...``)."""
    item: object = NO_ITEM
    """The fan-out item the step runs for (``$.item...``), or `NO_ITEM`."""


# -- the syntax tree ------------------------------------------------------------------------------
# Each node keeps its span in the text so `explain` can quote what the user wrote.


@dataclass(frozen=True, eq=False)
class _Path:
    ref: str


@dataclass(frozen=True, eq=False)
class _Literal:
    value: Any


_Operand = _Path | _Literal


@dataclass(frozen=True, eq=False)
class _Compare:
    op: str
    left: _Operand
    right: _Operand
    source: str


@dataclass(frozen=True, eq=False)
class _Exists:
    path: _Path


@dataclass(frozen=True, eq=False)
class _Not:
    operand: _Node


@dataclass(frozen=True, eq=False)
class _Junction:
    op: str  # "and" or "or"
    operands: tuple[_Node, ...]


_Node = _Compare | _Exists | _Not | _Junction


# -- the lexer ------------------------------------------------------------------------------------

_KEYWORDS = frozenset({"and", "or", "not", "in", "exists", "true", "false", "null"})
_DIGITS = "0123456789"
_DIGIT_CHARS = frozenset(_DIGITS)  # for slices, which may be "" (and "" is in every string)
_HEX = "0123456789abcdefABCDEF"
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "r": "\r", "t": "\t", "/": "/"}
_PUNCTUATION = "()[],"
_SPACE = " \t\r\n"


@dataclass(frozen=True)
class _Token:
    kind: str  # "path", "number", "string", "word", "op", a punctuation mark, or "end"
    text: str  # as written
    start: int  # 0-based offset
    value: Any = None  # a literal's value


def _segment_char(ch: str) -> bool:
    # Only ASCII digits: dataflow indexes lists with int(key), which other digits would break.
    return ch.isalpha() or ch in _DIGITS or ch in "_-"


class _Lexer:
    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0

    def fail(self, expected: str, at: int) -> ConditionError:
        return ConditionError(expected, at + 1, self.text)

    def tokens(self) -> Iterator[_Token]:
        text = self.text
        while True:
            while self.i < len(text) and text[self.i] in _SPACE:
                self.i += 1
            if self.i >= len(text):
                yield _Token("end", "", self.i)
                return
            start, ch = self.i, text[self.i]
            if ch == "$":
                yield self.path()
            elif ch in "\"'":
                yield self.string()
            elif ch in _DIGITS or (ch == "-" and text[start + 1 : start + 2] in _DIGIT_CHARS):
                yield self.number()
            elif ch in _PUNCTUATION:
                self.i += 1
                yield _Token(ch, ch, start)
            elif ch in "=!<>":
                two = text[start : start + 2]
                if two in ("==", "!=", "<=", ">="):
                    self.i += 2
                    yield _Token("op", two, start)
                elif ch in "<>":
                    self.i += 1
                    yield _Token("op", ch, start)
                else:
                    raise self.fail(
                        f"expected '{ch}=' (a comparison is ==, !=, <, <=, > or >=)", start
                    )
            elif ch.isascii() and (ch.isalpha() or ch == "_"):
                yield self.word()
            else:
                raise self.fail(f"expected a condition, found the character {ch!r}", start)

    def path(self) -> _Token:
        text, start = self.text, self.i
        self.i += 1
        segments: list[tuple[str, int]] = []
        while self.i < len(text) and text[self.i] == ".":
            self.i += 1
            begin = self.i
            while self.i < len(text) and _segment_char(text[self.i]):
                self.i += 1
            if self.i == begin:
                raise self.fail("expected a name after '.' in a path", begin)
            segments.append((text[begin : self.i], begin))
        if not segments:
            raise self.fail("expected '.' after '$' (a path such as $.input.total)", self.i)
        if self.i < len(text) and not _ends_token(text[self.i]):
            raise self.fail(
                f"expected the end of the path, found {text[self.i]!r} (a path's names are "
                "letters, digits, '_' and '-')",
                self.i,
            )
        root, root_at = segments[0]
        if root == "saga_id" and len(segments) > 1:
            raise self.fail("expected nothing after $.saga_id", segments[1][1] - 1)
        if root == "steps":
            if len(segments) < 2:
                raise self.fail("expected a step's name after $.steps", self.i)
            if len(segments) < 3 or segments[2][0] != "output":
                at = segments[2][1] if len(segments) >= 3 else self.i
                raise self.fail(f"expected 'output' after $.steps.{segments[1][0]}", at)
        elif root not in ("input", "saga_id", "item"):
            raise self.fail(
                "expected $.input, $.steps.NAME.output, $.saga_id or $.item at the start of a path",
                root_at,
            )
        return _Token("path", text[start : self.i], start)

    def string(self) -> _Token:
        text, start = self.text, self.i
        quote = text[start]
        self.i += 1
        chars: list[str] = []
        while True:
            if self.i >= len(text):
                raise self.fail(f"expected a closing {quote} for the string opened here", start)
            ch = text[self.i]
            if ch == quote:
                self.i += 1
                break
            if ch != "\\":
                chars.append(ch)
                self.i += 1
                continue
            escape = text[self.i + 1 : self.i + 2]
            if escape in _ESCAPES:
                chars.append(_ESCAPES[escape])
                self.i += 2
            elif escape == "u":
                chars.append(self.unicode_escape())
            else:
                raise self.fail(
                    "expected an escape: \\\\, \\\", \\', \\n, \\r, \\t, \\/ or \\uXXXX", self.i
                )
        self.check_end("string")
        return _Token("string", text[start : self.i], start, "".join(chars))

    def unicode_escape(self) -> str:
        # A surrogate pair becomes one character; a lone surrogate is refused (it is no text).
        at = self.i
        high = self.hex4()
        if 0xDC00 <= high <= 0xDFFF:
            raise self.fail("expected a \\u escape that is not a lone surrogate", at)
        if 0xD800 <= high <= 0xDBFF:
            if self.text[self.i : self.i + 2] != "\\u":
                raise self.fail("expected a \\u escape that is not a lone surrogate", at)
            low = self.hex4()
            if not 0xDC00 <= low <= 0xDFFF:
                raise self.fail("expected a \\u escape that is not a lone surrogate", at)
            return chr(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))
        return chr(high)

    def hex4(self) -> int:
        digits = self.text[self.i + 2 : self.i + 6]
        if len(digits) != 4 or any(d not in _HEX for d in digits):
            raise self.fail("expected four hexadecimal digits after \\u", self.i)
        self.i += 6
        return int(digits, 16)

    def number(self) -> _Token:
        text, start = self.text, self.i
        if text[self.i] == "-":
            self.i += 1
        self.digits()
        is_float = False
        if text[self.i : self.i + 1] == ".":
            self.i += 1
            if not self.digits():
                raise self.fail("expected digits after the decimal point", self.i)
            is_float = True
        if text[self.i : self.i + 1] in ("e", "E"):
            self.i += 1
            if text[self.i : self.i + 1] in ("+", "-"):
                self.i += 1
            if not self.digits():
                raise self.fail("expected digits in the exponent", self.i)
            is_float = True
        self.check_end("number")
        written = text[start : self.i]
        value: int | float = float(written) if is_float else int(written)
        return _Token("number", written, start, value)

    def digits(self) -> bool:
        begin = self.i
        while self.i < len(self.text) and self.text[self.i] in _DIGITS:
            self.i += 1
        return self.i > begin

    def word(self) -> _Token:
        text, start = self.text, self.i
        while self.i < len(text) and (
            (text[self.i].isascii() and text[self.i].isalnum()) or text[self.i] == "_"
        ):
            self.i += 1
        word = text[start : self.i]
        if word not in _KEYWORDS:
            hint = {"True": "true", "False": "false", "None": "null", "AND": "and", "OR": "or"}
            if word in hint or word.lower() in _KEYWORDS:
                expected = f"expected {hint.get(word, word.lower())!r} (keywords are lowercase)"
            else:
                expected = (
                    f"expected a path, a literal or a keyword, found the word {word!r} "
                    "(strings need quotes, paths start with $.)"
                )
            raise self.fail(expected, start)
        return _Token("word", word, start)

    def check_end(self, what: str) -> None:
        if self.i < len(self.text) and not _ends_token(self.text[self.i]):
            raise self.fail(
                f"expected a space or an operator after the {what}, found {self.text[self.i]!r}",
                self.i,
            )


def _ends_token(ch: str) -> bool:
    return ch in _SPACE or ch in _PUNCTUATION or ch in "=!<>"


# -- the parser -----------------------------------------------------------------------------------


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = list(_Lexer(text).tokens())
        self.k = 0
        self.depth = 0

    @property
    def token(self) -> _Token:
        return self.tokens[self.k]

    def fail(self, expected: str, token: _Token | None = None) -> ConditionError:
        token = token or self.token
        found = "" if token.kind == "end" else f", found {_describe(token)}"
        return ConditionError(f"{expected}{found}", token.start + 1, self.text)

    def is_word(self, word: str, offset: int = 0) -> bool:
        token = self.tokens[min(self.k + offset, len(self.tokens) - 1)]
        return token.kind == "word" and token.text == word

    def advance(self) -> _Token:
        token = self.token
        if token.kind != "end":
            self.k += 1
        return token

    def nest(self, token: _Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ConditionError(
                f"expected at most {MAX_DEPTH} levels of nesting", token.start + 1, self.text
            )

    def parse(self) -> _Node:
        node = self.condition("expected a condition")
        if self.token.kind != "end":
            raise self.fail("expected 'and', 'or' or the end of the condition")
        return node

    def condition(self, expected: str) -> _Node:
        return self.junction("or", lambda e: self.junction("and", self.negation, e), expected)

    def junction(self, op: str, operand: Callable[[str], _Node], expected: str) -> _Node:
        operands = [operand(expected)]
        while self.is_word(op):
            self.advance()
            operands.append(operand(f"expected a condition after '{op}'"))
        return operands[0] if len(operands) == 1 else _Junction(op, tuple(operands))

    def negation(self, expected: str) -> _Node:
        if self.is_word("not") and not self.is_word("in", 1):
            token = self.advance()
            self.nest(token)
            node = _Not(self.negation("expected a condition after 'not'"))
            self.depth -= 1
            return node
        return self.primary(expected)

    def primary(self, expected: str) -> _Node:
        token = self.token
        if token.kind == "(":
            self.advance()
            self.nest(token)
            node = self.condition("expected a condition after '('")
            if self.token.kind != ")":
                raise self.fail(f"expected ')' to close the '(' at {token.start + 1}")
            self.advance()
            self.depth -= 1
            return node
        if self.is_word("exists"):
            self.advance()
            if self.token.kind != "(":
                raise self.fail("expected '(' after 'exists'")
            self.advance()
            if self.token.kind != "path":
                raise self.fail("expected a path such as $.input.total inside exists(...)")
            path = _Path(self.advance().text)
            if self.token.kind != ")":
                raise self.fail("expected ')' after the path in exists(...)")
            self.advance()
            return _Exists(path)
        return self.comparison(expected)

    def comparison(self, expected: str) -> _Node:
        first = self.token
        left = self.operand(expected)
        op_token = self.token
        if op_token.kind == "op" or self.is_word("in"):
            op = self.advance().text
        elif self.is_word("not") and self.is_word("in", 1):
            self.advance()
            self.advance()
            op = "not in"
        else:
            raise self.fail(
                "expected a comparison (==, !=, <, <=, >, >=, in or not in) after the value"
            )
        right = self.operand(f"expected a value after '{op}'")
        end = self.tokens[self.k - 1]
        source = self.text[first.start : end.start + len(end.text)]
        return _Compare(op, left, right, source)

    def operand(self, expected: str) -> _Operand:
        if self.token.kind == "path":
            return _Path(self.advance().text)
        return _Literal(self.literal(expected))

    def literal(self, expected: str) -> Any:
        token = self.token
        if token.kind in ("number", "string"):
            self.advance()
            return token.value
        if token.kind == "word" and token.text in ("true", "false", "null"):
            self.advance()
            return {"true": True, "false": False, "null": None}[token.text]
        if token.kind == "[":
            self.advance()
            self.nest(token)
            items: list[Any] = []
            while self.token.kind != "]":
                if self.token.kind == "path":
                    raise self.fail("expected a literal in a list (a list holds no paths)")
                items.append(self.literal("expected a literal or ']' in the list"))
                if self.token.kind == ",":
                    self.advance()
                elif self.token.kind != "]":
                    raise self.fail(f"expected ',' or ']' in the list opened at {token.start + 1}")
            self.advance()
            self.depth -= 1
            return items
        raise self.fail(expected)


def _describe(token: _Token) -> str:
    if token.kind == "end":
        return "the end"
    shown = token.text if len(token.text) <= 30 else token.text[:27] + "..."
    return repr(shown)


# -- evaluation -----------------------------------------------------------------------------------

# None stands for "undecided": a comparison read a missing path.
_Truth = bool | None


def _resolve(ref: str, scope: Scope) -> tuple[bool, Any]:
    """Returns ``(True, value)``, or ``(False, why)`` when the path is missing."""
    item: dict[str, Any] = {} if scope.item is NO_ITEM else {"item": scope.item}
    if not item and (ref == "$.item" or ref.startswith("$.item.")):
        return False, f"{ref}: there is no fan-out item here (only for_each steps have one)"
    try:
        return True, dataflow.render(
            ref, saga_id=scope.saga_id, saga_input=scope.saga_input, outputs=scope.outputs, **item
        )
    except dataflow.ResolveError as exc:
        return False, str(exc)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _json_equal(a: object, b: object) -> bool:
    # Iterative, with a guard against cycles, so that no data can make evaluation raise.
    stack = [(a, b)]
    seen: set[tuple[int, int]] = set()
    while stack:
        x, y = stack.pop()
        if _is_number(x) and _is_number(y):
            if x != y:
                return False
        elif (isinstance(x, bool) and isinstance(y, bool)) or (x is None and y is None):
            if x is not y:
                return False
        elif isinstance(x, str) and isinstance(y, str):
            if x != y:
                return False
        elif isinstance(x, list | tuple) and isinstance(y, list | tuple):
            if (id(x), id(y)) in seen:
                continue
            seen.add((id(x), id(y)))
            if len(x) != len(y):
                return False
            stack.extend(zip(x, y, strict=True))
        elif isinstance(x, Mapping) and isinstance(y, Mapping):
            if (id(x), id(y)) in seen:
                continue
            seen.add((id(x), id(y)))
            if len(x) != len(y) or any(key not in y for key in x):
                return False
            stack.extend((x[key], y[key]) for key in x)
        else:
            return False
    return True


def _show(value: object) -> str:
    try:
        shown = json.dumps(value, ensure_ascii=False, allow_nan=True, default=_type_name)
    except (ValueError, TypeError, RecursionError):
        shown = _type_name(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _type_name(value: object) -> str:
    return f"<{type(value).__name__}>"


def _compare(op: str, left: object, right: object) -> tuple[bool, str]:
    """Whether ``left op right`` holds, and why not when it is a matter of types."""
    if op == "==":
        return _json_equal(left, right), ""
    if op == "!=":
        return not _json_equal(left, right), ""
    if op in ("in", "not in"):
        if not isinstance(right, list | tuple):
            return False, f"; {op} needs a list on the right, not {_kind(right)}"
        found = any(_json_equal(left, element) for element in right)
        return found == (op == "in"), ""
    if isinstance(left, str) and isinstance(right, str):
        return _order(op, left < right, left == right, left > right), ""
    if _is_number(left) and _is_number(right):
        assert isinstance(left, int | float)  # _is_number said so; mypy cannot see it
        assert isinstance(right, int | float)
        return _order(op, left < right, left == right, left > right), ""
    return (
        False,
        f"; {op} compares two numbers or two strings, not {_kind(left)} and {_kind(right)}",
    )


def _order(op: str, lt: bool, eq: bool, gt: bool) -> bool:
    # Three separate answers rather than one sign, so that NaN is in no order with anything.
    return {"<": lt, "<=": lt or eq, ">": gt, ">=": gt or eq}[op]


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if _is_number(value):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return _type_name(value)


def _evaluate(node: _Node, scope: Scope) -> tuple[_Truth, list[str]]:
    """The node's truth and the reasons that decided it."""
    if isinstance(node, _Compare):
        values: list[Any] = []
        for operand in (node.left, node.right):
            if isinstance(operand, _Literal):
                values.append(operand.value)
                continue
            found, value = _resolve(operand.ref, scope)
            if not found:
                return None, [f"{node.source} is undecided ({value})"]
            values.append(value)
        holds, note = _compare(node.op, values[0], values[1])
        seen = f"{_show(values[0])} {node.op} {_show(values[1])}{note}"
        return holds, [f"{node.source} {'holds' if holds else 'does not hold'} ({seen})"]
    if isinstance(node, _Exists):
        found, why = _resolve(node.path.ref, scope)
        if found:
            return True, [f"{node.path.ref} exists"]
        return False, [f"{node.path.ref} does not exist ({why})"]
    if isinstance(node, _Not):
        truth, reasons = _evaluate(node.operand, scope)
        return (None if truth is None else not truth), reasons
    results = [_evaluate(operand, scope) for operand in node.operands]
    decisive = node.op == "or"  # the value that decides a junction on its own
    for truth, reasons in results:
        if truth is decisive:
            return decisive, reasons
    undecided = [reason for truth, reasons in results if truth is None for reason in reasons]
    if undecided:
        return None, undecided
    return not decisive, [reason for _truth, reasons in results for reason in reasons]


def _paths(node: _Node) -> Iterator[str]:
    if isinstance(node, _Compare):
        for operand in (node.left, node.right):
            if isinstance(operand, _Path):
                yield operand.ref
    elif isinstance(node, _Exists):
        yield node.path.ref
    elif isinstance(node, _Not):
        yield from _paths(node.operand)
    else:
        for child in node.operands:
            yield from _paths(child)


class Condition:
    """A parsed condition (make one with `parse`). Equal conditions have equal text."""

    __slots__ = ("_paths", "_root", "text")

    def __init__(self, text: str, root: _Node) -> None:
        self.text = text
        """The condition as written."""
        self._root = root
        self._paths = tuple(dict.fromkeys(_paths(root)))

    def paths(self) -> tuple[str, ...]:
        """Every template path the condition reads, once each, in the order written.

        They are `saga.core.dataflow` templates (``dataflow.references`` splits them into
        roots), except ``$.item...``, which `dataflow.references` reports as the root ``item``.
        """
        return self._paths

    def evaluate(self, scope: Scope) -> bool:
        """Whether the condition holds over ``scope``; never raises (see the module docstring)."""
        truth, _reasons = _evaluate(self._root, scope)
        return truth is True

    def explain(self, scope: Scope) -> str:
        """`evaluate`'s answer with the comparisons that decided it and the values they saw.

        For example ``false: $.input.total > 100 does not hold (40 > 100)``, or
        ``false (undecided): $.input.total > 100 is undecided ($.input.total: no 'total' in the
        data)``. The first word is always ``true`` or ``false``, as `evaluate` answers.
        """
        truth, reasons = _evaluate(self._root, scope)
        head = "true" if truth is True else "false" if truth is False else "false (undecided)"
        return f"{head}: {'; '.join(reasons)}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Condition) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"parse({self.text!r})"

    def __str__(self) -> str:
        return self.text


def parse(text: str) -> Condition:
    """Parses a condition.

    Raises:
        ConditionError: The text is not a condition; the message gives the 1-based position
            and what was expected there, e.g. ``at 16: expected a value after '>', found the
            end``.
    """
    if not isinstance(text, str):
        raise ConditionError(
            f"expected a condition as a string, not {type(text).__name__}", 0, repr(text)
        )
    if len(text) > MAX_LENGTH:
        raise ConditionError(
            f"expected at most {MAX_LENGTH} characters, got {len(text)}", MAX_LENGTH + 1, text
        )
    return Condition(text, _Parser(text).parse())
