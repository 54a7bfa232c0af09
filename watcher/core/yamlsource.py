"""YAML as operators write it, read back with the line of every key and value.

Validation errors must point at ``file:line``, and PyYAML's ``safe_load`` forgets where
values came from (and silently keeps the last of two equal keys). This module composes
the node tree with the safe loader and walks it into plain dicts, lists and scalars that
remember their lines, reporting duplicate keys and syntax errors as ``Problem``s.
``FieldReader`` then reads typed fields out of those mappings for the config and policy
loaders, so both word their messages the same way. Pure: text in, values out.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from watcher.core.errors import Problem

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class LineMap(dict[Any, Any]):
    """A YAML mapping: a plain dict that also knows the line of each key and value.

    ``line`` is the line that introduces the mapping: the line of the key it is the value
    of, the line of its list item, or its own first line at the top of a document.
    """

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self._key_lines: dict[Any, int] = {}
        self._value_lines: dict[Any, int] = {}

    def set_located(self, key: Hashable, value: object, key_line: int, value_line: int) -> None:
        self[key] = value
        self._key_lines[key] = key_line
        self._value_lines[key] = value_line

    def key_line(self, key: Hashable) -> int:
        """Line of ``key``; the mapping's own line when the key is absent."""
        return self._key_lines.get(key, self.line)

    def value_line(self, key: Hashable) -> int:
        """Line of the value of ``key``: where a scalar is written, the key's own line for a
        list or mapping (whose first item may sit on the next line); the mapping's line when
        the key is absent."""
        return self._value_lines.get(key, self.line)


class LineList(list[Any]):
    """A YAML sequence: a plain list that also knows the line of each item."""

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self._item_lines: list[int] = []

    def append_located(self, value: object, line: int) -> None:
        self.append(value)
        self._item_lines.append(line)

    def item_line(self, index: int) -> int:
        return self._item_lines[index] if 0 <= index < len(self._item_lines) else self.line


@dataclass
class YamlDocument:
    """One parsed file: its value (None when empty or unreadable) and what was wrong."""

    value: object
    line: int
    """Line where the document's value starts (1 for an empty document)."""
    problems: list[Problem] = field(default_factory=list)


def parse_yaml(text: str, file: str) -> YamlDocument:
    """Parse one YAML document; syntax errors and duplicate keys become ``Problem``s."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        return YamlDocument(None, 1, [_syntax_problem(file, exc)])
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, max(exc.position, 0)) + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        reason = f"character #x{code:04x} is not allowed ({exc.reason})"
        return YamlDocument(None, 1, [Problem(file, line, f"invalid YAML: {reason}")])
    except yaml.YAMLError as exc:  # pragma: no cover - every PyYAML error carries a mark
        return YamlDocument(None, 1, [Problem(file, 1, f"invalid YAML: {exc}")])
    if root is None:
        return YamlDocument(None, 1)
    walker = _Walker(file)
    value = walker.convert(root, _line(root))
    return YamlDocument(value, _line(root), walker.problems)


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _syntax_problem(file: str, exc: yaml.MarkedYAMLError) -> Problem:
    mark = exc.problem_mark or exc.context_mark
    line = int(mark.line) + 1 if mark is not None else 1
    # Only PyYAML's own wording and line numbers: the snippet of the offending line is left
    # out because it may hold a secret.
    message = f"invalid YAML: {exc.problem or exc.context or 'syntax error'}"
    if exc.problem and exc.context:
        started = exc.context_mark
        where = f" started on line {int(started.line) + 1}" if started is not None else ""
        if exc.problem.startswith("but "):  # PyYAML splits "expected X, but found Y"
            message = f"invalid YAML: {exc.context}{where}, {exc.problem}"
        else:
            message += f" ({exc.context}{where})"
    return Problem(file, line, message)


class _Walker:
    """Turns a composed node tree into LineMap / LineList / scalars, collecting problems."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []
        self._scalars = SafeConstructor()
        self._done: dict[int, object] = {}  # aliases share nodes; convert each once
        self._active: set[int] = set()  # nodes being converted, to refuse recursive aliases

    def report(self, line: int, message: str) -> None:
        self.problems.append(Problem(self.file, line, message))

    def convert(self, node: Node, owner_line: int) -> object:
        if id(node) in self._done:
            return self._done[id(node)]
        if id(node) in self._active:
            self.report(_line(node), "a recursive alias cannot be read")
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, MappingNode):
                value: object = self._mapping(node, owner_line)
            elif isinstance(node, SequenceNode):
                value = self._sequence(node, owner_line)
            else:
                value = self._scalar(node)
        finally:
            self._active.discard(id(node))
        self._done[id(node)] = value
        return value

    def _scalar(self, node: Node) -> object:
        try:
            return self._scalars.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError):
            # The value itself stays out of the message: it may be a secret.
            self.report(_line(node), f"cannot read a value tagged {node.tag!r}")
            return None

    def _sequence(self, node: SequenceNode, owner_line: int) -> LineList:
        if node.tag != _SEQ_TAG:
            self.report(_line(node), f"unsupported tag {node.tag!r} on a list")
        result = LineList(owner_line)
        for item in node.value:
            result.append_located(self.convert(item, _line(item)), _line(item))
        return result

    def _mapping(self, node: MappingNode, owner_line: int) -> LineMap:
        if node.tag != _MAP_TAG:
            self.report(_line(node), f"unsupported tag {node.tag!r} on a mapping")
        result = LineMap(owner_line)
        merges: list[Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merges.append(value_node)
                continue
            key_line = _line(key_node)
            if not isinstance(key_node, ScalarNode):
                self.report(key_line, "a mapping key must be a plain value, not a list or mapping")
                continue
            key = self._scalar(key_node)
            if key in result:
                self.report(
                    key_line,
                    f"duplicate key {key!r} (first defined on line {result.key_line(key)})",
                )
                continue
            # A block collection starts on the line after its key; point at the key then.
            value_line = key_line if isinstance(value_node, (MappingNode, SequenceNode)) \
                else _line(value_node)
            result.set_located(key, self.convert(value_node, key_line), key_line, value_line)
        for merge_node in merges:
            self._merge_into(result, merge_node)
        return result

    def _merge_into(self, result: LineMap, merge_node: Node) -> None:
        """Apply a ``<<`` merge: keys written in the mapping win, then earlier sources."""
        sources = merge_node.value if isinstance(merge_node, SequenceNode) else [merge_node]
        for source in sources:
            merged = self.convert(source, _line(source))
            if not isinstance(merged, LineMap):
                self.report(_line(source), "'<<' merges only a mapping or a list of mappings")
                continue
            for key, value in merged.items():
                if key not in result:
                    result.set_located(key, value, merged.key_line(key), merged.value_line(key))


def describe(value: object, *, secret: bool = False) -> str:
    """Name a YAML value for a message; secrets are named by their kind only."""
    if value is None:
        return "an empty value"
    if isinstance(value, bool):
        return "a boolean" if secret else f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return "a number" if secret else f"the number {value}"
    if isinstance(value, str):
        return "a string" if secret else f"the string {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a value of type {type(value).__name__}"


def field_path(where: str, key: object) -> str:
    """``images.ubuntu`` + ``format`` -> ``images.ubuntu.format``."""
    return f"{where}.{key}" if where else str(key)


class FieldReader:
    """Reads typed fields out of located mappings, collecting one Problem per mistake.

    Every getter returns None when the field is absent or invalid, so callers fall back to
    their default and carry on: one pass reports every problem of a file.
    """

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []

    def report(self, line: int, message: str) -> None:
        self.problems.append(Problem(self.file, line, message))

    def section(self, parent: LineMap, key: str, where: str) -> LineMap | None:
        """The mapping under ``key``; absent or null gives an empty mapping."""
        if parent.get(key) is None:
            return LineMap(parent.key_line(key))
        value = parent[key]
        if isinstance(value, LineMap):
            return value
        self.report(parent.value_line(key),
                    f"{field_path(where, key)}: expected a mapping, got {describe(value)}")
        return None

    def check_keys(self, mapping: LineMap, allowed: Iterable[str], where: str) -> None:
        """Report every key that is not one of ``allowed``."""
        names = sorted(allowed)
        for key in mapping:
            if key not in names:
                label = f"{where}: unknown key" if where else "unknown key"
                self.report(mapping.key_line(key),
                            f"{label} {key!r}; allowed keys: {', '.join(names)}")

    def require(self, mapping: LineMap, keys: Iterable[str], where: str) -> None:
        """Report each of ``keys`` missing from ``mapping`` (at the mapping's line)."""
        for key in keys:
            if key not in mapping:
                label = f"{where}: missing" if where else "missing"
                self.report(mapping.line, f"{label} required key {key!r}")

    def string(self, mapping: LineMap, key: str, where: str, *, empty_ok: bool = False,
               null_ok: bool = False, secret: bool = False) -> str | None:
        """A string field; empty strings are refused unless ``empty_ok``."""
        if key not in mapping or (null_ok and mapping[key] is None):
            return None
        value = mapping[key]
        line = mapping.value_line(key)
        name = field_path(where, key)
        if not isinstance(value, str):
            self.report(line, f"{name}: expected a string, got {describe(value, secret=secret)}")
            return None
        if not empty_ok and not value.strip():
            self.report(line, f"{name}: must not be empty")
            return None
        return value

    def choice(self, mapping: LineMap, key: str, where: str, choices: Iterable[str]) -> str | None:
        """A string field that must be one of ``choices``."""
        if key not in mapping:
            return None
        allowed = list(choices)
        value = mapping[key]
        if not isinstance(value, str) or value not in allowed:
            self.report(mapping.value_line(key),
                        f"{field_path(where, key)}: expected one of {', '.join(allowed)}, "
                        f"got {describe(value)}")
            return None
        return value

    def boolean(self, mapping: LineMap, key: str, where: str) -> bool | None:
        """A true/false field; strings such as ``"yes"`` are refused, not guessed at."""
        if key not in mapping:
            return None
        value = mapping[key]
        if not isinstance(value, bool):
            self.report(mapping.value_line(key),
                        f"{field_path(where, key)}: expected true or false, got {describe(value)}")
            return None
        return value

    def positive_int(self, mapping: LineMap, key: str, where: str) -> int | None:
        """A whole number of at least 1."""
        if key not in mapping:
            return None
        value = mapping[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self.report(mapping.value_line(key),
                        f"{field_path(where, key)}: expected a whole number of at least 1, "
                        f"got {describe(value)}")
            return None
        return value

    def positive_number(self, mapping: LineMap, key: str, where: str) -> float | None:
        """A number (whole or not) larger than 0."""
        if key not in mapping:
            return None
        value = mapping[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                or value == float("inf"):
            self.report(mapping.value_line(key),
                        f"{field_path(where, key)}: expected a number larger than 0, "
                        f"got {describe(value)}")
            return None
        return float(value)

    def string_list(self, mapping: LineMap, key: str, where: str) -> list[tuple[str, int]] | None:
        """A list of non-empty strings, each with its line; null counts as an empty list."""
        if key not in mapping or mapping[key] is None:
            return None
        value = mapping[key]
        name = field_path(where, key)
        if not isinstance(value, LineList):
            self.report(mapping.value_line(key), f"{name}: expected a list, got {describe(value)}")
            return None
        items: list[tuple[str, int]] = []
        for index, item in enumerate(value):
            line = value.item_line(index)
            if not isinstance(item, str) or not item.strip():
                self.report(line, f"{name}[{index}]: expected a non-empty string, "
                                  f"got {describe(item)}")
                continue
            items.append((item, line))
        return items
