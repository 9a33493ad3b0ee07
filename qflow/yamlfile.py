"""Reading the YAML and JSON text of recipes and target files, strictly and safely.

:func:`load_yaml` is ``yaml.safe_load`` (no Python tags: nothing is evaluated or
unpickled) through a loader that also refuses what ``safe_load`` lets through or turns
into a traceback:

- a key given twice in one mapping, at any depth (``safe_load`` keeps the last one);
- a mapping key that is not a string (``1:``, ``null:``, and YAML 1.1's ``on:``/``no:``,
  which are booleans): every qflow file is keyed by names;
- an integer of more than 64 bits (no setting needs one, and printing one of more than
  4,300 digits in a message would fail);
- a document nested deeper than :data:`MAX_DEPTH` levels (``safe_load`` recurses, and
  100,000 nested ``[`` end in a RecursionError; the scanner also slows down
  quadratically with the flow depth, so the limit is checked while scanning, before it
  costs anything, and again while composing);
- values that PyYAML's constructors fail on with a plain Python exception
  (``0x_``, ``2001-13-45``, an integer of 5,000 digits).

Every problem becomes one line, with the line number where YAML knows it. The
exception class is :class:`~qflow.errors.QflowError` unless the caller names a subclass
(the config parser raises :class:`~qflow.errors.ConfigError`).

>>> load_yaml("bits: 8\\nrounding: RND\\n", "recipe.yaml")
{'bits': 8, 'rounding': 'RND'}
>>> load_yaml("bits: 8\\nbits: 4\\n", "recipe.yaml")
Traceback (most recent call last):
qflow.errors.QflowError: recipe.yaml: duplicate key 'bits' at line 2
>>> load_json_text('{"bits": 8,}', "config.json")
Traceback (most recent call last):
qflow.errors.QflowError: config.json: malformed JSON at line 1: Expecting property name \
enclosed in double quotes (column 12)
"""

from __future__ import annotations

import json

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.error import MarkedYAMLError

from qflow.errors import QflowError

#: the deepest nesting of collections (mappings and lists) a document may have
MAX_DEPTH = 100
#: integers must be smaller than this in magnitude (no qflow setting needs more)
MAX_INT = 2**64
#: how much of a key or value a message quotes
_QUOTE_CHARS = 60


class _TooDeepError(MarkedYAMLError):
    """A document nested deeper than the loader's limit."""


class _DuplicateKeyError(MarkedYAMLError):
    """A key given twice in one mapping."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with a depth limit, no duplicate keys and string keys only."""

    max_depth = MAX_DEPTH

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._depth = 0
        self._open_anchors: list[str] = []  # anchors of the collections being composed

    # -- scanner: refuse deep flow or block nesting before the scanner's simple-key
    #    bookkeeping (one entry per flow level, walked per token) grows with it
    def fetch_flow_collection_start(self, TokenClass) -> None:  # noqa: N803 (PyYAML's name)
        if self.flow_level >= self.max_depth:
            raise _TooDeepError(problem=_too_deep(self.max_depth), problem_mark=self.get_mark())
        super().fetch_flow_collection_start(TokenClass)

    def add_indent(self, column: int) -> bool:
        added = super().add_indent(column)
        if added and len(self.indents) > self.max_depth:
            raise _TooDeepError(problem=_too_deep(self.max_depth), problem_mark=self.get_mark())
        return added

    # -- composer: the nesting as built (indentless sequences add levels the scanner's
    #    indents do not count)
    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) and event.anchor in self._open_anchors:
            raise ComposerError(None, None, f"alias *{event.anchor} refers to a collection "
                                "that contains it (recursive data)", event.start_mark)
        if not isinstance(event, yaml.CollectionStartEvent):
            return super().compose_node(parent, index)
        if self._depth >= self.max_depth:
            raise _TooDeepError(problem=_too_deep(self.max_depth),
                                problem_mark=event.start_mark)
        self._depth += 1
        self._open_anchors.append(event.anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open_anchors.pop()

    # -- constructor
    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except (yaml.YAMLError, RecursionError):
            raise
        except Exception as exc:  # PyYAML's constructors fail on some values with
            # ValueError, AttributeError or OverflowError instead of a YAMLError
            raise ConstructorError(None, None, f"cannot read the value {short_repr(node.value)}: "
                                   f"{_one_line(str(exc))}", node.start_mark) from None

    def construct_bounded_int(self, node) -> int:
        value = self.construct_yaml_int(node)
        if abs(value) >= MAX_INT:
            raise ConstructorError(None, None, f"integer {short_repr(node.value)} is too "
                                   "large (more than 64 bits)", node.start_mark)
        return value

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # "<<: *base" merges a mapping; its keys may be overridden
                key = self.construct_object(key_node, deep=False)
                if not isinstance(key, str):
                    shown = (f" {short_repr(key_node.value)} (quote it)"
                             if isinstance(key_node, yaml.ScalarNode) else "")
                    raise ConstructorError(
                        None, None, f"a key must be a string, not {type_name(key)}{shown}",
                        key_node.start_mark)
                if key in seen:
                    raise _DuplicateKeyError(problem=f"duplicate key {short_repr(key)}",
                                        problem_mark=key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_bounded_int)


def _too_deep(limit: int) -> str:
    return f"YAML nested too deeply (more than {limit} levels)"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def short_repr(value, limit: int = _QUOTE_CHARS) -> str:
    """``repr(value)`` on one line, shortened to about ``limit`` characters.

    >>> short_repr("x" * 100, 12), short_repr(2**20000)
    ("'xxxxxxxx...", 'an integer of 20001 bits')
    """
    try:
        text = repr(value)
    except ValueError:  # an integer too long to print (over 4,300 digits)
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def type_name(value) -> str:
    """The name of ``value``'s type as a YAML or JSON file would call it.

    >>> type_name(None), type_name(True), type_name(3), type_name([1]), type_name({})
    ('null', 'bool', 'int', 'list', 'mapping')
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list | tuple):
        return "list"
    return type(value).__name__


def _decode(text: str | bytes, prefix: str, error: type[QflowError]) -> str:
    """``text`` as str; bytes that are not UTF-8 are a one-line error."""
    if not isinstance(text, bytes):
        return text
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{prefix}not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def _yaml_message(exc: yaml.YAMLError, text: str) -> str:
    """One line for a PyYAML error: the problem and its line."""
    if isinstance(exc, yaml.reader.ReaderError):
        char = chr(exc.character) if isinstance(exc.character, int) else exc.character
        line = text.count("\n", 0, exc.position) + 1
        return f"malformed YAML at line {line}: {exc.reason} ({char!r})"
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = f" at line {mark.line + 1}" if mark is not None else ""
    if isinstance(exc, _TooDeepError | _DuplicateKeyError):
        return f"{exc.problem}{line}"
    problem, context = getattr(exc, "problem", None), getattr(exc, "context", None)
    if problem and context:
        at = getattr(exc, "context_mark", None)
        problem = f"{problem} ({context}{f' at line {at.line + 1}' if at else ''})"
    return f"malformed YAML{line}: {_one_line(str(problem or context or exc))}"


def load_yaml(text: str | bytes, where: str = "", *, error: type[QflowError] = QflowError,
              max_depth: int = MAX_DEPTH):
    """The data of one YAML document, or an ``error`` with a one-line message.

    ``where`` names the input (a file) and starts every message; ``bytes`` are decoded
    as UTF-8. Messages: ``<where>: malformed YAML at line N: <problem>``, ``<where>:
    duplicate key 'bits' at line N``, ``<where>: YAML nested too deeply (more than 100
    levels) at line N``, ``<where>: not UTF-8 text (...)``.

    >>> load_yaml("a: {b: [1, 2]}")
    {'a': {'b': [1, 2]}}
    >>> load_yaml("[" * 100_000, "deep.yaml")
    Traceback (most recent call last):
    qflow.errors.QflowError: deep.yaml: YAML nested too deeply (more than 100 levels) at line 1
    >>> load_yaml("a: !!python/object/apply:os.system ['true']", "r.yaml")
    Traceback (most recent call last):
    qflow.errors.QflowError: r.yaml: malformed YAML at line 1: could not determine a \
constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'
    """
    prefix = _prefix(where)
    text = _decode(text, prefix, error)
    loader = None
    try:
        loader = _StrictLoader(text)  # the reader checks every character here
        loader.max_depth = max_depth
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise error(prefix + _yaml_message(exc, text)) from None
    except RecursionError:  # the caller's own stack was already deep
        raise error(f"{prefix}{_too_deep(max_depth)}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{prefix}not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    finally:
        if loader is not None:
            loader.dispose()


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    data = {}
    for key, value in pairs:
        if key in data:
            raise _JSONDuplicateKeyError(key)
        data[key] = value
    return data


def _bounded_int(digits: str) -> int:
    value = int(digits)
    if abs(value) >= MAX_INT:
        raise ValueError(f"integer {short_repr(digits)} is too large (more than 64 bits)")
    return value


class _JSONDuplicateKeyError(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def load_json_text(text: str | bytes, where: str = "", *,
                   error: type[QflowError] = QflowError):
    """The data of a JSON text, or an ``error`` with a one-line message.

    Messages: ``<where>: malformed JSON at line N: <problem> (column C)``, ``<where>:
    duplicate key 'bits'``, ``<where>: JSON nested too deeply``, ``<where>: not UTF-8
    text (...)``.

    >>> load_json_text('{"a": [1, 2.5, null]}')
    {'a': [1, 2.5, None]}
    >>> load_json_text("[" * 100_000, "deep.json")
    Traceback (most recent call last):
    qflow.errors.QflowError: deep.json: JSON nested too deeply
    """
    prefix = _prefix(where)
    text = _decode(text, prefix, error)
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_int=_bounded_int)
    except json.JSONDecodeError as exc:
        raise error(f"{prefix}malformed JSON at line {exc.lineno}: {exc.msg} "
                    f"(column {exc.colno})") from None
    except _JSONDuplicateKeyError as exc:
        raise error(f"{prefix}duplicate key {short_repr(exc.key)}") from None
    except RecursionError:
        raise error(f"{prefix}JSON nested too deeply") from None
    except ValueError as exc:  # an integer of more than 64 bits
        raise error(f"{prefix}malformed JSON: {_one_line(str(exc))}") from None
