"""The Japanese operations guide (docs/ja/運用手順書.md) and the alert rules point at each
other, and the guide stays true to the commands it teaches.

- Every alert of conf/prometheus/gateway-alerts.yml has a Japanese ``summary_ja`` with the
  template variables of its English ``summary``, and a ``runbook_url`` into the guide as
  installed, at an explicit ``<a id="...">`` anchor of its own under 障害時の対応.
- Every ``gatewayctl COMMAND [ACTION] [--option [VALUE]]`` in a code span or block of the
  guide is a real (sub)command of ``gateway.cli.gatewayctl._parser()``, with options it
  has and values they take.
- The guide links nothing outside the repository, and shows no personal data.

The rules file is read line by line (the project has no YAML parser): annotations are
one-line double-quoted scalars, which are JSON strings. ``promtool check rules`` and
``promtool test rules`` (tests/e2e/test_prometheus.py) check the same file as YAML.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from gateway.cli.gatewayctl import _parser

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "ja" / "運用手順書.md"
RULES = ROOT / "conf" / "prometheus" / "gateway-alerts.yml"
DOC_ROOT = PurePosixPath("/usr/share/doc/gateway")
"""Where the documents are installed: docs/X becomes /usr/share/doc/gateway/X."""
INSTALLED_GUIDE = DOC_ROOT / GUIDE.relative_to(ROOT / "docs").as_posix()
RUNBOOK_PREFIX = f"file://{INSTALLED_GUIDE}#"
ALERTS_SECTION = "障害時の対応"

JAPANESE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]")
TEMPLATE = re.compile(r"\{\{.*?\}\}")
ANCHOR = re.compile(r'^<a id="([a-z0-9-]+)"></a>$', re.MULTILINE)
HEADING = re.compile(r"^(#{1,6}) (.+)$", re.MULTILINE)
FENCE = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.MULTILINE | re.DOTALL)
"""A fenced code block, also indented in a list item."""
CODE_SPAN = re.compile(r"`([^`\n]+)`")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
URL = re.compile(r"\b(?:https?|file)://[^\s)`'\"<>]+")
PUBLIC_DOCS = {
    "prometheus.io",
    "grafana.com",
    "docs.clamav.net",
    "www.freedesktop.org",
    "systemd.io",
    "man7.org",
    "www.debian.org",
}
"""Well-known public documentation the guide may link to."""
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
"""The admin listener on loopback (curl examples), not a link out of the repository."""
SHELL_BREAKS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "(", ")"}
REQUIRED_SECTIONS = (
    "この手順書について",
    "導入",
    "設定の確認",
    "日常の点検",
    "紛失した端末の無効化",
    "職員",
    "保留（held）になった申請の扱い",
    "毎月の消去証明書",
    "毎月のアクセスログ点検",
    "ウイルス対策",
    "バックアップと障害からの復旧",
    "マスター鍵の交換",
    "証明書の更新と設定の再読込",
    ALERTS_SECTION,
    "終了コード一覧",
)


# ------------------------------------------------------------------ the alert rules


@dataclass
class Rule:
    alert: str
    line: int
    annotations: dict[str, str] = field(default_factory=dict)


@cache
def rules() -> tuple[Rule, ...]:
    """Each rule with its one-line (double-quoted) annotations, in file order."""
    found: list[Rule] = []
    in_annotations = -1  # the indentation of the current ``annotations:`` key, or -1
    for number, line in enumerate(RULES.read_text("utf-8").splitlines(), 1):
        indent = len(line) - len(line.lstrip())
        if match := re.match(r"^\s*- alert: (\w+)\s*$", line):
            found.append(Rule(match.group(1), number))
            in_annotations = -1
        elif re.match(r"^\s*annotations:\s*$", line):
            in_annotations = indent
        elif in_annotations >= 0 and line.strip() and indent <= in_annotations:
            in_annotations = -1
        elif in_annotations >= 0 and (match := re.match(r'^\s*(\w+): (".*")\s*$', line)):
            key, value = match.group(1), json.loads(match.group(2))
            assert key not in found[-1].annotations, f"line {number}: {key} twice"
            found[-1].annotations[key] = value
    defined = re.findall(r"^\s*- alert: \w+\s*$", RULES.read_text("utf-8"), re.MULTILINE)
    assert len(found) == len(defined) >= 20
    return tuple(found)


def test_every_alert_has_a_japanese_summary_with_the_english_variables() -> None:
    for rule in rules():
        where = f"{rule.alert} (line {rule.line})"
        summary, summary_ja = rule.annotations.get("summary"), rule.annotations.get("summary_ja")
        assert summary, f"{where}: no one-line summary"
        assert summary_ja, f"{where}: no summary_ja"
        assert JAPANESE.search(summary_ja), f"{where}: summary_ja is not Japanese"
        english = Counter(re.sub(r"\s+", " ", t) for t in TEMPLATE.findall(summary))
        japanese = Counter(re.sub(r"\s+", " ", t) for t in TEMPLATE.findall(summary_ja))
        assert japanese == english, f"{where}: summary_ja uses {japanese}, summary {english}"


# ------------------------------------------------------------------ the guide


@cache
def guide() -> str:
    return GUIDE.read_text("utf-8")


def anchors() -> dict[str, int]:
    """Each explicit anchor of the guide and the offset of its line."""
    found: dict[str, int] = {}
    for match in ANCHOR.finditer(guide()):
        assert match.group(1) not in found, f"anchor {match.group(1)!r} twice"
        found[match.group(1)] = match.start()
    return found


def section_span(title: str) -> tuple[int, int]:
    """Where the level-2 section whose heading starts with ``title`` begins and ends."""
    headings = [(m.start(), len(m.group(1)), m.group(2)) for m in HEADING.finditer(guide())]
    for index, (start, level, text) in enumerate(headings):
        if level == 2 and text.startswith(title):
            end = next((s for s, lv, _ in headings[index + 1 :] if lv <= 2), len(guide()))
            return start, end
    raise AssertionError(f"the guide has no section {title!r}")


def heading_after(offset: int) -> str:
    """The first heading after ``offset`` (the one an anchor line stands before)."""
    match = HEADING.search(guide(), offset)
    assert match, f"no heading after offset {offset}"
    return match.group(2)


def test_the_guide_has_the_sections_the_ward_needs() -> None:
    titles = [m.group(2) for m in HEADING.finditer(guide()) if len(m.group(1)) == 2]
    for wanted in REQUIRED_SECTIONS:
        assert any(t.startswith(wanted) for t in titles), f"no section {wanted!r}"


def test_every_alert_links_its_own_section_of_the_guide() -> None:
    known = anchors()
    start, end = section_span(ALERTS_SECTION)
    by_alert: dict[str, str] = {}
    for rule in rules():
        where = f"{rule.alert} (line {rule.line})"
        url = rule.annotations.get("runbook_url")
        assert url, f"{where}: no runbook_url"
        assert url.startswith(RUNBOOK_PREFIX), f"{where}: {url} is not {RUNBOOK_PREFIX}..."
        anchor = url.removeprefix(RUNBOOK_PREFIX)
        assert anchor in known, f"{where}: the guide has no anchor {anchor!r}"
        assert start < known[anchor] < end, f"{where}: #{anchor} is not under {ALERTS_SECTION}"
        assert heading_after(known[anchor]).startswith(rule.alert), (
            f"{where}: #{anchor} stands before {heading_after(known[anchor])!r}"
        )
        assert by_alert.setdefault(rule.alert, anchor) == anchor, f"{where}: two anchors"
    assert len(set(by_alert.values())) == len(by_alert), "two alerts share an anchor"


def test_the_guide_links_only_to_anchors_it_has() -> None:
    known = anchors()
    for target in MD_LINK.findall(guide()):
        if target.startswith("#"):
            assert target[1:] in known, f"link to missing anchor {target}"


# ------------------------------------------------------------------ gatewayctl commands


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: action for action in parser._actions for s in action.option_strings}


def code_lines() -> list[str]:
    """Every line of a fenced block (continuations joined) and every inline code span."""
    text = guide()
    lines = []
    for block in FENCE.findall(text):
        lines += block.replace("\\\n", " ").splitlines()
    lines += CODE_SPAN.findall(FENCE.sub("", text))
    return lines


def invocations() -> list[list[str]]:
    """The words after each ``gatewayctl`` in the guide's code, up to a shell break."""
    found = []
    for line in code_lines():
        if "gatewayctl" not in line:
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        try:
            words = list(lexer)
        except ValueError:  # an unbalanced quote in prose: plain words will do
            words = line.split()
        for index, word in enumerate(words):
            if word == "gatewayctl" or word.endswith("/gatewayctl"):
                rest = words[index + 1 :]
                cut = next((i for i, w in enumerate(rest) if w in SHELL_BREAKS), len(rest))
                found.append(rest[:cut])
    return found


def command_path(words: list[str]) -> tuple[str, ...]:
    """The (sub)command ``gatewayctl WORDS`` runs. Fails on a command, an option or an
    option's value (of a fixed set, such as ``--format``) the parser does not have."""
    parser, path = _parser(), []
    said = f"`gatewayctl {' '.join(words)}`"
    remaining = iter(words)
    for word in remaining:
        choices = subcommands(parser)
        if word.startswith("-"):
            known = options(parser)
            name, _, inline = word.partition("=")
            assert name in known, (
                f"{said}: {name} is not an option of `gatewayctl {' '.join(path)}`"
            )
            if name in ("-h", "--help", "--version"):
                break
            action = known[name]
            if action.nargs != 0:
                value = inline or next(remaining, "")
                if action.choices is not None:
                    assert value in action.choices, f"{said}: {name} {value}?"
        elif choices:
            assert word in choices, (
                f"{said}: {word!r} is not a command of "
                f"`gatewayctl {' '.join(path)}` ({', '.join(sorted(choices))})"
            )
            parser, path = choices[word], [*path, word]
    return tuple(path)


def test_every_gatewayctl_command_and_option_in_the_guide_exists() -> None:
    commands = {command_path(words) for words in invocations() if words}
    # not vacuous: the procedures the guide exists for are found
    for wanted in (
        ("check-config",),
        ("device", "revoke"),
        ("user", "disable"),
        ("user", "deny"),
        ("spool", "list"),
        ("spool", "show"),
        ("spool", "requeue"),
        ("spool", "erase"),
        ("erasure-report",),
        ("access-log", "verify"),
        ("access-report",),
        ("audit", "verify"),
        ("keys", "new-master"),
        ("keys", "rotate-master"),
    ):
        assert wanted in commands, f"the guide never shows `gatewayctl {' '.join(wanted)}`"


# ------------------------------------------------------------------ links and examples


def test_the_guide_links_nothing_outside_the_repository() -> None:
    text = guide()
    for target in MD_LINK.findall(text):
        if target.startswith("#") or re.match(r"^(?:https?|file|mailto):", target):
            continue  # anchors are checked above, URLs below
        path = (GUIDE.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT), f"link out of the repository: {target}"
        assert path.exists(), f"link to missing {target}"
    for url in URL.findall(text):
        parts = urlsplit(url)
        if parts.scheme == "file":
            assert PurePosixPath(parts.path).is_relative_to(DOC_ROOT), url
        else:
            assert parts.hostname in LOCAL_HOSTS | PUBLIC_DOCS, f"link out: {url}"


def test_the_guide_shows_no_personal_data() -> None:
    """Examples are fictional: no 個人番号 or 申請書ID, phone number or real-looking mail
    address, and names on a certificate are placeholders."""
    text = guide()
    assert not re.search(r"(?<![0-9a-f])\d{12,}(?![0-9a-f])", text), "a long number"
    assert not re.search(r"\b0\d{1,4}-\d{1,4}-\d{3,4}\b", text), "a phone number"
    for address in re.findall(r"[\w.+-]+@([\w-]+(?:\.[\w-]+)+)", text):
        assert address.startswith("example."), f"a mail address at {address}"
    for option in ("--operator", "--organization"):
        for value in re.findall(rf'{option} "([^"]*)"', text):
            assert "〇" in value, f"{option} {value!r} is not a placeholder"
