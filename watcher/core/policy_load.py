"""Policy files to a validated ``PolicySet``, with every mistake reported as ``file:line``.

Operators edit policy files by hand and reload on SIGHUP; a reload that fails keeps the old
policies running, so the only feedback they get is the error list. It must therefore be
complete (every problem of every file in one go) and precise (file, line, field, value).
Pure: callers read the files and hand over ``(name, text)`` pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from watcher.core.errors import ConfigError, Problem
from watcher.core.paths import IMAGE_NAME_RULE, is_image_name
from watcher.core.policy import CLONE_MODES, DomainRule, ImageFormat, ImageSpec, PolicySet
from watcher.core.units import parse_size
from watcher.core.yamlsource import FieldReader, LineList, LineMap, describe, parse_yaml

TOP_LEVEL_KEYS = ("images", "domains")
IMAGE_KEYS = ("bucket", "key", "prefix", "format", "checksum", "hosts")
RULE_KEYS = ("match", "image", "root_disk", "grow", "start", "snapshot", "clone", "hosts")
IMAGE_FORMATS: tuple[ImageFormat, ...] = ("qcow2", "raw")
CHECKSUM_MODES = ("required", "optional")


@dataclass(frozen=True)
class _PendingRule:
    """A rule whose image name can only be checked once every file has been read."""

    rule: DomainRule | None
    """None when the rule has other problems; its image name is still checked."""
    image: str
    reader: FieldReader
    image_line: int
    where: str


def parse_policies(sources: Sequence[tuple[str, str]]) -> PolicySet:
    """Merge policy files, given as ``(file name, YAML text)`` in reading order.

    Images from every file share one namespace and rules keep file order, then in-file
    order. Raises ``ConfigError`` carrying every problem found in any file.
    """
    images: dict[str, ImageSpec] = {}
    defined_at: dict[str, str] = {}  # every image name seen, valid or not -> "file:line"
    pending: list[_PendingRule] = []
    readers: list[FieldReader] = []
    for file, text in sources:
        reader = FieldReader(file)
        readers.append(reader)
        document = parse_yaml(text, file)
        reader.problems.extend(document.problems)
        top = document.value
        if top is None:
            continue  # an empty file (or one that did not parse) defines nothing
        if not isinstance(top, LineMap):
            reader.report(document.line, "a policy file must be a mapping with the keys "
                                         f"{' and '.join(TOP_LEVEL_KEYS)}, got {describe(top)}")
            continue
        reader.check_keys(top, TOP_LEVEL_KEYS, "")
        _read_images(reader, top, images, defined_at)
        pending.extend(_read_rules(reader, top))

    rules: list[DomainRule] = []
    for item in pending:
        if item.image in images:
            if item.rule is not None:
                rules.append(item.rule)
        elif item.image not in defined_at:  # an invalid image has its own problem
            known = ", ".join(sorted(defined_at)) or "none are defined"
            item.reader.report(item.image_line, f"{item.where}.image: unknown image "
                                                f"{item.image!r} (known images: {known})")

    problems: list[Problem] = []
    for reader in readers:
        problems.extend(sorted(reader.problems, key=lambda p: p.line))
    if problems:
        raise ConfigError(problems)
    return PolicySet(images=images, rules=tuple(rules))


def _read_images(reader: FieldReader, top: LineMap, images: dict[str, ImageSpec],
                 defined_at: dict[str, str]) -> None:
    section = reader.section(top, "images", "")
    if section is None:
        return
    for name, spec in section.items():
        line = section.key_line(name)
        if not isinstance(name, str) or not name.strip():
            hint = "" if isinstance(name, str) else " (quote it)"
            reader.report(line, f"images: an image name must be a non-empty string, "
                                f"got {describe(name)}{hint}")
            continue
        if not is_image_name(name):
            # Names become cache file names; one with a '/' or '..' must never get that far.
            reader.report(line, f"images: image name {name!r} is not valid: use "
                                f"{IMAGE_NAME_RULE}")
            defined_at.setdefault(name, f"{reader.file}:{line}")
            continue
        where = f"images.{name}"
        image = None
        if isinstance(spec, LineMap):
            image = _read_image(reader, name, spec, where)
        else:
            reader.report(section.value_line(name),
                          f"{where}: expected a mapping with {', '.join(IMAGE_KEYS)}, "
                          f"got {describe(spec)}")
        if name in defined_at:
            reader.report(line, f"{where}: image {name!r} is already defined "
                                f"at {defined_at[name]}")
            continue
        defined_at[name] = f"{reader.file}:{line}"
        if image is not None:
            images[name] = image


def _read_image(reader: FieldReader, name: str, spec: LineMap, where: str) -> ImageSpec | None:
    before = len(reader.problems)
    reader.check_keys(spec, IMAGE_KEYS, where)
    reader.require(spec, ("bucket", "format"), where)
    bucket = reader.string(spec, "bucket", where)
    key = reader.string(spec, "key", where)
    prefix = reader.string(spec, "prefix", where)
    if "key" in spec and "prefix" in spec:
        reader.report(spec.key_line("prefix"), f"{where}: set either 'key' or 'prefix', not both")
    elif "key" not in spec and "prefix" not in spec:
        reader.report(spec.line, f"{where}: missing 'key' (one object) or 'prefix' "
                                 "(the newest object under it)")
    image_format = reader.choice(spec, "format", where, IMAGE_FORMATS)
    checksum = reader.choice(spec, "checksum", where, CHECKSUM_MODES) or "required"
    hosts = _host_globs(reader, spec, where)
    if len(reader.problems) > before or bucket is None or image_format is None:
        return None
    return ImageSpec(
        name=name,
        bucket=bucket,
        key=key,
        prefix=prefix,
        format="qcow2" if image_format == "qcow2" else "raw",
        checksum_required=checksum == "required",
        origin=f"{reader.file}:{spec.line}",
        hosts=hosts,
    )


def _read_rules(reader: FieldReader, top: LineMap) -> list[_PendingRule]:
    rules = top.get("domains")
    if rules is None:
        return []
    if not isinstance(rules, LineList):
        reader.report(top.value_line("domains"),
                      f"domains: expected a list of rules, got {describe(rules)}")
        return []
    pending: list[_PendingRule] = []
    for index, item in enumerate(rules):
        where = f"domains[{index}]"
        line = rules.item_line(index)
        if not isinstance(item, LineMap):
            reader.report(line, f"{where}: expected a mapping with "
                                f"{', '.join(RULE_KEYS)}, got {describe(item)}")
            continue
        rule = _read_rule(reader, item, where)
        image = item.get("image")
        if isinstance(image, str) and image.strip():
            pending.append(_PendingRule(rule, image, reader, item.value_line("image"), where))
    return pending


def _read_rule(reader: FieldReader, item: LineMap, where: str) -> DomainRule | None:
    before = len(reader.problems)
    reader.check_keys(item, RULE_KEYS, where)
    reader.require(item, ("match", "image"), where)
    match = reader.string(item, "match", where)
    if match is not None and (problem := glob_problem(match)) is not None:
        reader.report(item.value_line("match"), f"{where}.match: {match!r} {problem}")
    image = reader.string(item, "image", where)
    root_disk = reader.string(item, "root_disk", where, null_ok=True)
    grow = reader.boolean(item, "grow", where)
    start = reader.boolean(item, "start", where)
    snapshot = _snapshot_size(reader, item, where)
    clone = reader.choice(item, "clone", where, CLONE_MODES)
    hosts = _host_globs(reader, item, where)
    if len(reader.problems) > before or match is None or image is None:
        return None
    return DomainRule(
        match=match,
        image=image,
        root_disk=root_disk,
        grow=bool(grow),
        start=bool(start),
        snapshot=snapshot,
        clone="never" if clone == "never" else "auto",
        origin=f"{reader.file}:{item.line}",
        hosts=hosts,
    )


def _snapshot_size(reader: FieldReader, item: LineMap, where: str) -> int | None:
    """``snapshot:`` is an optional size (``2GiB``) of the rollback snapshot; null = none."""
    value = item.get("snapshot")
    if value is None:
        return None
    try:
        size = parse_size(value)
    except ValueError as exc:
        reader.report(item.value_line("snapshot"), f"{where}.snapshot: {exc}")
        return None
    if size <= 0:
        reader.report(item.value_line("snapshot"),
                      f"{where}.snapshot: the snapshot size must be larger than 0")
        return None
    return size


def _host_globs(reader: FieldReader, item: LineMap, where: str) -> tuple[str, ...]:
    """``hosts:`` is an optional list of globs on host names (``["hv-*"]``); absent = all."""
    globs = reader.string_list(item, "hosts", where)
    raw = item.get("hosts")
    if isinstance(raw, LineList) and len(raw) == 0:
        reader.report(item.value_line("hosts"), f"{where}.hosts: an empty list matches no "
                                                "host; leave 'hosts' out for every host")
    for glob, line in globs or []:
        if (problem := glob_problem(glob)) is not None:
            reader.report(line, f"{where}.hosts: {glob!r} {problem}")
    return tuple(glob for glob, _line in globs or [])


def glob_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not the glob its author meant, or None.

    ``fnmatch`` takes a ``[`` without its ``]`` as a literal character, so ``web-[`` would
    quietly match only a domain named exactly that; an empty pattern matches nothing.
    """
    if not pattern:
        return "is empty and matches nothing"
    index = 0
    while index < len(pattern):
        if pattern[index] == "[":
            close = index + 1
            if close < len(pattern) and pattern[close] == "!":
                close += 1
            if close < len(pattern) and pattern[close] == "]":
                close += 1  # a ']' right after '[' (or '[!') is part of the set
            close = pattern.find("]", close)
            if close == -1:
                return "has a '[' without its ']'; write [[] for a literal '['"
            index = close
        index += 1
    return None
