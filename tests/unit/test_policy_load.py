"""Policy files to a PolicySet: every mistake is reported, each at its exact file:line.

Operators only see the error list when a reload fails, so each case pins the location and
the words that tell them what to fix. Also covers the YAML reader underneath (duplicate
keys, syntax errors, anchors and merges keep their lines).
"""

from __future__ import annotations

from textwrap import dedent

import pytest

from watcher.core.errors import ConfigError, Problem
from watcher.core.policy import DomainRule, ImageSpec
from watcher.core.policy_load import parse_policies
from watcher.core.yamlsource import LineList, LineMap, parse_yaml

UBUNTU = """\
images:
  ubuntu:
    bucket: vm-images
    key: ubuntu/ubuntu-24.04.qcow2
    format: qcow2
"""


def problems_of(sources: list[tuple[str, str]]) -> list[Problem]:
    with pytest.raises(ConfigError) as caught:
        parse_policies(sources)
    return caught.value.problems


# --- valid files -------------------------------------------------------------------------


def test_a_full_policy_builds_images_and_rules_with_their_origins() -> None:
    text = dedent("""\
        images:
          ubuntu:
            bucket: vm-images
            key: ubuntu/ubuntu-24.04.qcow2
            format: qcow2
          debian:
            bucket: vm-images
            prefix: debian/12/
            format: raw
            checksum: optional
        domains:
          - match: "web-*"
            image: ubuntu
            root_disk: vdb
            grow: true
            start: true
            snapshot: 2GiB
          - match: "*"
            image: debian
        """)
    policies = parse_policies([("p.yaml", text)])
    assert policies.images == {
        "ubuntu": ImageSpec(name="ubuntu", bucket="vm-images", key="ubuntu/ubuntu-24.04.qcow2",
                            prefix=None, format="qcow2", checksum_required=True,
                            origin="p.yaml:2"),
        "debian": ImageSpec(name="debian", bucket="vm-images", key=None, prefix="debian/12/",
                            format="raw", checksum_required=False, origin="p.yaml:6"),
    }
    assert policies.rules == (
        DomainRule(match="web-*", image="ubuntu", root_disk="vdb", grow=True, start=True,
                   snapshot=2 * 1024**3, origin="p.yaml:12"),
        DomainRule(match="*", image="debian", origin="p.yaml:18"),
    )


@pytest.mark.parametrize("text", [
    pytest.param("", id="empty-file"),
    pytest.param("# only a comment\n", id="only-comments"),
    pytest.param("images:\ndomains:\n", id="empty-sections"),
    pytest.param("images: {}\ndomains: []\n", id="empty-collections"),
])
def test_a_file_without_content_defines_nothing(text: str) -> None:
    policies = parse_policies([("empty.yaml", text)])
    assert dict(policies.images) == {}
    assert policies.rules == ()


def test_no_files_give_an_empty_policy_set() -> None:
    assert parse_policies([]).rules == ()


def test_rules_keep_file_order_then_in_file_order() -> None:
    rules_a = 'domains:\n  - {match: "a-1", image: ubuntu}\n  - {match: "a-2", image: ubuntu}\n'
    rules_b = 'domains:\n  - {match: "b-1", image: ubuntu}\n'
    policies = parse_policies([("10-images.yaml", UBUNTU), ("20-a.yaml", rules_a),
                               ("30-b.yaml", rules_b)])
    assert [(r.match, r.origin) for r in policies.rules] == [
        ("a-1", "20-a.yaml:2"), ("a-2", "20-a.yaml:3"), ("b-1", "30-b.yaml:2")]


def test_a_rule_may_name_an_image_defined_in_a_later_file() -> None:
    rules = "domains:\n  - match: web-*\n    image: ubuntu\n"
    policies = parse_policies([("00-rules.yaml", rules), ("99-images.yaml", UBUNTU)])
    rule = policies.rule_for("web-1")
    assert rule is not None and rule.image == "ubuntu"


def test_clone_is_auto_unless_a_rule_says_never() -> None:
    text = UBUNTU + ("domains:\n  - {match: a, image: ubuntu}\n"
                     "  - {match: b, image: ubuntu, clone: never}\n"
                     "  - {match: c, image: ubuntu, clone: auto}\n")
    rules = parse_policies([("p.yaml", text)]).rules
    assert [rule.clone for rule in rules] == ["auto", "never", "auto"]


def test_null_root_disk_and_snapshot_mean_the_defaults() -> None:
    text = UBUNTU + "domains:\n  - match: x\n    image: ubuntu\n    root_disk:\n    snapshot:\n"
    (rule,) = parse_policies([("p.yaml", text)]).rules
    assert (rule.root_disk, rule.snapshot) == (None, None)


def test_unquoted_yaml_booleans_are_booleans() -> None:
    text = UBUNTU + "domains:\n  - {match: x, image: ubuntu, grow: yes, start: off}\n"
    (rule,) = parse_policies([("p.yaml", text)]).rules
    assert (rule.grow, rule.start) == (True, False)


def test_anchors_and_merge_keys_share_image_settings() -> None:
    text = dedent("""\
        images:
          base: &common
            bucket: vm-images
            format: qcow2
            key: base.qcow2
          other:
            <<: *common
            key: other.qcow2
        """)
    policies = parse_policies([("p.yaml", text)])
    assert policies.images["other"].key == "other.qcow2"
    assert policies.images["other"].bucket == "vm-images"


# --- errors: one row per mistake, with its exact location ---------------------------------

ERROR_CASES = [
    pytest.param([("p.yaml", "- a\n- b\n")],
                 [("p.yaml:1", "a policy file must be a mapping")], id="top-level-is-a-list"),
    pytest.param([("p.yaml", "just text\n")],
                 [("p.yaml:1", "must be a mapping")], id="top-level-is-a-string"),
    pytest.param([("p.yaml", "images: {}\nrules: []\n")],
                 [("p.yaml:2", "unknown key 'rules'; allowed keys: domains, images")],
                 id="unknown-top-level-key"),
    pytest.param([("p.yaml", UBUNTU + "    fromat: raw\n")],
                 [("p.yaml:6", "images.ubuntu: unknown key 'fromat'; allowed keys: "
                               "bucket, checksum, format, hosts, key, prefix")],
                 id="unknown-image-key"),
    pytest.param([("p.yaml", UBUNTU + "domains:\n  - match: x\n    image: ubuntu\n"
                                      "    autostart: true\n")],
                 [("p.yaml:9", "domains[0]: unknown key 'autostart'; allowed keys: clone, "
                               "grow, hosts, image, match, root_disk, snapshot, start")],
                 id="unknown-rule-key"),
    pytest.param([("p.yaml", "images:\n  u:\n    key: k\n    format: qcow2\n")],
                 [("p.yaml:2", "images.u: missing required key 'bucket'")],
                 id="image-without-bucket"),
    pytest.param([("p.yaml", "images:\n  u:\n    bucket: b\n    key: k\n")],
                 [("p.yaml:2", "images.u: missing required key 'format'")],
                 id="image-without-format"),
    pytest.param([("p.yaml", "images:\n  u:\n    bucket: b\n    format: raw\n")],
                 [("p.yaml:2", "images.u: missing 'key' (one object) or 'prefix'")],
                 id="image-without-key-or-prefix"),
    pytest.param([("p.yaml", UBUNTU + "    prefix: ubuntu/\n")],
                 [("p.yaml:6", "images.ubuntu: set either 'key' or 'prefix', not both")],
                 id="image-with-key-and-prefix"),
    pytest.param([("p.yaml", "images:\n  u:\n    bucket: ''\n    key: k\n    format: raw\n")],
                 [("p.yaml:3", "images.u.bucket: must not be empty")], id="empty-bucket"),
    pytest.param([("p.yaml", "images:\n  u:\n    bucket: b\n    key: ' '\n    format: raw\n")],
                 [("p.yaml:4", "images.u.key: must not be empty")], id="blank-key"),
    pytest.param([("p.yaml", "images:\n  u:\n    bucket: b\n    prefix: ''\n    format: raw\n")],
                 [("p.yaml:4", "images.u.prefix: must not be empty")], id="empty-prefix"),
    pytest.param([("p.yaml", "images:\n  u:\n    bucket: [b]\n    key: k\n    format: raw\n")],
                 [("p.yaml:3", "images.u.bucket: expected a string, got a list")],
                 id="bucket-not-a-string"),
    pytest.param([("p.yaml", "images:\n  u:\n    bucket: b\n    key: k\n    format: vmdk\n")],
                 [("p.yaml:5", "images.u.format: expected one of qcow2, raw, "
                               "got the string 'vmdk'")],
                 id="unsupported-format"),
    pytest.param([("p.yaml", UBUNTU + "    checksum: maybe\n")],
                 [("p.yaml:6", "images.ubuntu.checksum: expected one of required, optional")],
                 id="bad-checksum-mode"),
    pytest.param([("p.yaml", "images:\n  u:\n")],
                 [("p.yaml:2", "images.u: expected a mapping")], id="image-without-body"),
    pytest.param([("p.yaml", "images:\n  24.04: {bucket: b, key: k, format: raw}\n")],
                 [("p.yaml:2", "an image name must be a non-empty string, got the number "
                               "24.04 (quote it)")],
                 id="image-name-not-a-string"),
    pytest.param([("p.yaml", "images:\n  ../../x: {bucket: b, key: k, format: raw}\n")],
                 [("p.yaml:2", "images: image name '../../x' is not valid: use letters, "
                               "digits")],
                 id="image-name-climbing-out-of-the-cache"),
    pytest.param([("p.yaml", "images:\n  ubuntu/24.04: {bucket: b, key: k, format: raw}\n"
                             "domains:\n  - {match: '*', image: ubuntu/24.04}\n")],
                 [("p.yaml:2", "images: image name 'ubuntu/24.04' is not valid")],
                 id="image-name-with-a-slash-and-a-rule-naming-it"),
    pytest.param([("p.yaml", "images:\n  .hidden: {bucket: b, key: k, format: raw}\n")],
                 [("p.yaml:2", "images: image name '.hidden' is not valid")],
                 id="image-name-starting-with-a-dot"),
    pytest.param([("p.yaml", "images:\n  " + "a" * 65 + ": {bucket: b, key: k, format: raw}\n")],
                 [("p.yaml:2", "is not valid")], id="image-name-too-long"),
    pytest.param([("p.yaml", UBUNTU + "domains:\n  - {match: 'web-[', image: ubuntu}\n")],
                 [("p.yaml:7", "domains[0].match: 'web-[' has a '[' without its ']'")],
                 id="broken-glob"),
    pytest.param([("p.yaml", "images: [a]\n")],
                 [("p.yaml:1", "images: expected a mapping, got a list")],
                 id="images-not-a-mapping"),
    pytest.param([("a.yaml", UBUNTU), ("b.yaml", "\n" + UBUNTU)],
                 [("b.yaml:3", "images.ubuntu: image 'ubuntu' is already defined at a.yaml:2")],
                 id="image-defined-in-two-files"),
    pytest.param([("p.yaml", UBUNTU + "  ubuntu:\n    bucket: b\n    key: k\n    format: raw\n")],
                 [("p.yaml:6", "duplicate key 'ubuntu' (first defined on line 2)")],
                 id="image-defined-twice-in-one-file"),
    pytest.param([("p.yaml", UBUNTU + "    bucket: other\n")],
                 [("p.yaml:6", "duplicate key 'bucket' (first defined on line 3)")],
                 id="duplicate-field"),
    pytest.param([("p.yaml", UBUNTU + "domains:\n  - match: x\n    image: debian\n")],
                 [("p.yaml:8", "domains[0].image: unknown image 'debian' "
                               "(known images: ubuntu)")],
                 id="rule-names-unknown-image"),
    pytest.param([("p.yaml", "domains:\n  - {match: x, image: ubuntu}\n")],
                 [("p.yaml:2", "unknown image 'ubuntu' (known images: none are defined)")],
                 id="rule-names-an-image-when-none-exist"),
    pytest.param([("p.yaml", UBUNTU + "domains:\n  - image: ubuntu\n")],
                 [("p.yaml:7", "domains[0]: missing required key 'match'")],
                 id="rule-without-match"),
    pytest.param([("p.yaml", UBUNTU + "domains:\n  - match: x\n")],
                 [("p.yaml:7", "domains[0]: missing required key 'image'")],
                 id="rule-without-image"),
    pytest.param([("p.yaml", UBUNTU + "domains:\n  - match: ''\n    image: ubuntu\n")],
                 [("p.yaml:7", "domains[0].match: must not be empty")], id="empty-match-glob"),
    pytest.param([("p.yaml", UBUNTU + "domains:\n  - {match: x, image: ''}\n")],
                 [("p.yaml:7", "domains[0].image: must not be empty")], id="empty-image-name"),
    pytest.param([("p.yaml", UBUNTU + "domains:\n  - {match: x, image: ubuntu, grow: 'yes'}\n")],
                 [("p.yaml:7", "domains[0].grow: expected true or false, got the string 'yes'")],
                 id="grow-quoted-yes"),
    pytest.param([("p.yaml", UBUNTU + "domains:\n  - {match: x, image: ubuntu, start: 1}\n")],
                 [("p.yaml:7", "domains[0].start: expected true or false, got the number 1")],
                 id="start-a-number"),
    pytest.param([("p.yaml", UBUNTU + "domains:\n  - {match: x, image: ubuntu, root_disk: 7}\n")],
                 [("p.yaml:7", "domains[0].root_disk: expected a string, got the number 7")],
                 id="root-disk-not-a-string"),
    pytest.param([("p.yaml", UBUNTU + "domains:\n  - {match: x, image: ubuntu, root_disk: ''}\n")],
                 [("p.yaml:7", "domains[0].root_disk: must not be empty")], id="empty-root-disk"),
    pytest.param([("p.yaml", UBUNTU + "domains:\n  - {match: x, image: ubuntu, snapshot: big}\n")],
                 [("p.yaml:7", "domains[0].snapshot: expected a size such as 100GiB")],
                 id="snapshot-not-a-size"),
    pytest.param([("p.yaml", UBUNTU + "domains:\n  - {match: x, image: ubuntu, snapshot: 0}\n")],
                 [("p.yaml:7", "domains[0].snapshot: the snapshot size must be larger than 0")],
                 id="snapshot-zero"),
    pytest.param([("p.yaml", UBUNTU + "domains:\n  - {match: x, image: ubuntu, clone: always}\n")],
                 [("p.yaml:7", "domains[0].clone: expected one of auto, never, got the string "
                               "'always'")], id="clone-unknown-mode"),
    pytest.param([("p.yaml", UBUNTU + "domains:\n  - {match: x, image: ubuntu, clone: false}\n")],
                 [("p.yaml:7", "domains[0].clone: expected one of auto, never")],
                 id="clone-boolean"),
    pytest.param([("p.yaml", UBUNTU + "domains:\n  - {match: x, image: ubuntu, snapshot: true}\n")],
                 [("p.yaml:7", "domains[0].snapshot: expected a size")], id="snapshot-boolean"),
    pytest.param([("p.yaml", UBUNTU + "domains:\n  match: x\n  image: ubuntu\n")],
                 [("p.yaml:6", "domains: expected a list of rules, got a mapping")],
                 id="domains-not-a-list"),
    pytest.param([("p.yaml", UBUNTU + "domains: web-*\n")],
                 [("p.yaml:6", "domains: expected a list of rules, got the string 'web-*'")],
                 id="domains-a-string"),
    pytest.param([("p.yaml", UBUNTU + "domains:\n  - web-*\n")],
                 [("p.yaml:7", "domains[0]: expected a mapping")], id="rule-not-a-mapping"),
    pytest.param([("p.yaml", "images:\n  u: {bucket: b\n")],
                 [("p.yaml:3", "invalid YAML: expected ',' or '}'")], id="yaml-syntax-error"),
    pytest.param([("p.yaml", "images:\n\tu: 1\n")],
                 [("p.yaml:2", "invalid YAML: found character '\\t'")], id="yaml-tab-indent"),
    pytest.param([("p.yaml", "images: {}\n---\ndomains: []\n")],
                 [("p.yaml:2", "invalid YAML: expected a single document in the stream started on "
                               "line 1, but found another document")],
                 id="two-yaml-documents"),
    pytest.param([("p.yaml", "images: *nowhere\n")],
                 [("p.yaml:1", "invalid YAML: found undefined alias")], id="undefined-alias"),
    pytest.param([("p.yaml", "images: !!python/object:os.system {}\n")],
                 [("p.yaml:1", "unsupported tag")], id="python-tag-refused"),
]


@pytest.mark.parametrize(("sources", "expected"), ERROR_CASES)
def test_each_mistake_is_reported_at_its_line(
        sources: list[tuple[str, str]], expected: list[tuple[str, str]]) -> None:
    problems = problems_of(sources)
    assert [f"{p.file}:{p.line}" for p in problems] == [where for where, _ in expected]
    for problem, (_, words) in zip(problems, expected, strict=True):
        assert words in problem.message


def test_every_problem_of_every_file_is_reported_in_one_go() -> None:
    first = dedent("""\
        images:
          ubuntu:
            bucket: ''
            key: k
            format: vmdk
        domains:
          - match: web-*
            image: nope
            grow: 'no'
        """)
    second = "images: {}\nextra: 1\n"
    problems = problems_of([("a.yaml", first), ("b.yaml", second)])
    assert [str(p) for p in problems] == [
        "a.yaml:3: images.ubuntu.bucket: must not be empty",
        "a.yaml:5: images.ubuntu.format: expected one of qcow2, raw, got the string 'vmdk'",
        "a.yaml:8: domains[0].image: unknown image 'nope' (known images: ubuntu)",
        "a.yaml:9: domains[0].grow: expected true or false, got the string 'no'",
        "b.yaml:2: unknown key 'extra'; allowed keys: domains, images",
    ]


def test_a_rule_naming_an_invalid_image_reports_only_the_image() -> None:
    text = "images:\n  u:\n    bucket: b\n    key: k\n    format: vhd\n" \
           "domains:\n  - {match: x, image: u}\n"
    assert [str(p) for p in problems_of([("p.yaml", text)])] == [
        "p.yaml:5: images.u.format: expected one of qcow2, raw, got the string 'vhd'"]


def test_config_error_text_lists_each_problem_on_its_own_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_policies([("p.yaml", "a: 1\nb: 2\n")])
    assert str(caught.value).splitlines() == [
        "p.yaml:1: unknown key 'a'; allowed keys: domains, images",
        "p.yaml:2: unknown key 'b'; allowed keys: domains, images",
    ]


# --- the YAML reader underneath -----------------------------------------------------------


def test_yaml_values_are_plain_and_remember_their_lines() -> None:
    document = parse_yaml("a:\n  b: 1\n  c:\n    - x\n    - y\nd: text\n", "f.yaml")
    assert document.problems == []
    top = document.value
    assert top == {"a": {"b": 1, "c": ["x", "y"]}, "d": "text"}
    assert isinstance(top, LineMap)
    assert (top.key_line("a"), top.key_line("d"), top.value_line("d")) == (1, 6, 6)
    inner = top["a"]
    assert isinstance(inner, LineMap) and inner.line == 1
    assert (inner.key_line("c"), inner.value_line("b")) == (3, 2)
    items = inner["c"]
    assert isinstance(items, LineList)
    assert (items.item_line(0), items.item_line(1)) == (4, 5)


def test_yaml_reader_refuses_a_recursive_alias() -> None:
    document = parse_yaml("a: &x\n  - *x\n", "f.yaml")
    assert [str(p) for p in document.problems] == [
        "f.yaml:1: a recursive alias cannot be read"]


def test_yaml_reader_reports_control_characters_with_their_line() -> None:
    document = parse_yaml("a: 1\nb: \x07\n", "f.yaml")
    assert [p.line for p in document.problems] == [2]
    assert document.problems[0].message.startswith("invalid YAML: character #x0007 is not allowed")


def test_merged_keys_keep_the_lines_where_they_were_written() -> None:
    document = parse_yaml("base: &b\n  x: 1\nuse:\n  <<: *b\n  y: 2\n", "f.yaml")
    top = document.value
    assert isinstance(top, LineMap)
    use = top["use"]
    assert isinstance(use, LineMap)
    assert use == {"x": 1, "y": 2}
    assert (use.key_line("x"), use.key_line("y")) == (2, 5)


@pytest.mark.parametrize(("pattern", "fine"), [
    ("web-*", True), ("web-[0-9]*", True), ("web-[!a]", True), ("[]]x", True), ("[[]x", True),
    ("web-[", False), ("[!", False), ("a[b", False), ("", False),
])
def test_globs_are_checked_for_a_missing_bracket(pattern: str, fine: bool) -> None:
    from watcher.core.policy_load import glob_problem

    assert (glob_problem(pattern) is None) is fine
