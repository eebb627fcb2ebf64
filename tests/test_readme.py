"""The documentation: docs/nodes.md names every input and output of every MoMA node as the real host serves the node
definitions (so a new input cannot go undocumented); every relative link and image in README.md, CHANGELOG.md and
docs/*.md resolves, anchors included; the README stays a short page for users."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from comfyui_moma.nodes import NODES

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
NODE_REFERENCE = REPO / "docs" / "nodes.md"
DOCUMENTS = [README, REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 250
NODE_HEADING = re.compile(r"^## (?P<display>[^(\n]+?) \(`(?P<node_id>\w+)`\)\s*$", re.MULTILINE)
LINK = re.compile(r"!?\[(?:[^\]`]|`[^`]*`)*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")


def node_reference_sections(text: str) -> dict[str, tuple[str, str]]:
    """node id -> (display name, its section: from its "## Display (`NodeId`)" heading to the next "## " heading)."""
    headings = list(NODE_HEADING.finditer(text))
    sections = {}
    for match in headings:
        following = re.search(r"^## ", text[match.end() :], re.MULTILINE)
        end = match.end() + following.start() if following else len(text)
        sections[match["node_id"]] = (match["display"], text[match.start() : end])
    return sections


def moma_nodes() -> dict[str, object]:
    """The pack's nodes as ComfyUI registered them (node id -> the class ComfyUI calls)."""
    import nodes

    ids = [node.define_schema().node_id for node in NODES]
    missing = [node_id for node_id in ids if node_id not in nodes.NODE_CLASS_MAPPINGS]
    assert not missing, f"ComfyUI did not register {missing}"
    return {node_id: nodes.NODE_CLASS_MAPPINGS[node_id] for node_id in ids}


def display_and_outputs(cls) -> tuple[str, list[str]]:
    """(display name, output names) as /object_info gives them to the frontend."""
    import nodes

    if hasattr(cls, "GET_NODE_INFO_V1"):
        info = cls.GET_NODE_INFO_V1()
        return info["display_name"], list(info["output_name"])
    node_id = next(key for key, value in nodes.NODE_CLASS_MAPPINGS.items() if value is cls)
    return nodes.NODE_DISPLAY_NAME_MAPPINGS.get(node_id, node_id), list(getattr(cls, "RETURN_NAMES", ()) or ())


def test_every_node_has_its_section() -> None:
    sections = node_reference_sections(NODE_REFERENCE.read_text(encoding="utf-8"))
    registered = moma_nodes()
    assert set(registered) <= set(sections), (
        f"docs/nodes.md has no section for {sorted(set(registered) - set(sections))}"
    )
    for node_id, cls in registered.items():
        display, _ = display_and_outputs(cls)
        assert sections[node_id][0] == display, (node_id, sections[node_id][0], display)


@pytest.mark.parametrize("node_id", sorted(node.define_schema().node_id for node in NODES))
def test_node_reference_names_every_input_and_output(node_id: str) -> None:
    section = node_reference_sections(NODE_REFERENCE.read_text(encoding="utf-8"))[node_id][1]
    cls = moma_nodes()[node_id]
    inputs = cls.INPUT_TYPES()
    names = [name for group in ("required", "optional") for name in inputs.get(group, {})]
    assert names, f"{node_id}: the host lists no inputs"
    undocumented = [name for name in names if f"`{name}`" not in section]
    assert not undocumented, f"docs/nodes.md, {node_id}: inputs {undocumented} are not listed"
    _, outputs = display_and_outputs(cls)
    unnamed = [name for name in outputs if f"`{name}`" not in section]
    assert not unnamed, f"docs/nodes.md, {node_id}: outputs {unnamed} are not named"


def test_the_section_check_sees_a_missing_input() -> None:
    """The section split is what the checks rely on: a node's section ends at the next "## " heading."""
    text = (
        "# Node reference\n\n## A Node (`NodeA`)\n\n-> `out`.\n| `alpha` |\n\n## B Node (`NodeB`)\n\n`beta`\n"
        "\n## Other notes\n`gamma`\n"
    )
    sections = node_reference_sections(text)
    assert set(sections) == {"NodeA", "NodeB"} and sections["NodeA"][0] == "A Node"
    assert "`alpha`" in sections["NodeA"][1] and "`beta`" not in sections["NodeA"][1]
    assert "`beta`" in sections["NodeB"][1] and "`gamma`" not in sections["NodeB"][1]


# --------------------------------------------------------------------------------------------------------------
# links


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code (where brackets are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings (lower case, punctuation dropped, spaces to '-',
    repeats numbered)."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(
        r"^#{1,6} +(.+?)\s*#*\s*$", re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL), re.MULTILINE
    ):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(document: Path, root: Path = REPO) -> list[str]:
    """Each relative link or image of ``document`` whose file, or anchor in it, does not exist (or lies outside
    ``root``)."""
    problems = []
    for match in LINK.finditer(prose(document.read_text(encoding="utf-8"))):
        target = match["target"]
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        path = (document.parent / path_part).resolve() if path_part else document
        if not path.exists():
            problems.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path.read_text(encoding="utf-8")):
            problems.append(f"{target}: no heading with anchor #{anchor} in {path.name}")
        elif path_part and root.resolve() not in path.parents:
            problems.append(f"{target}: outside the repository")
    return problems


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(REPO)))
def test_every_relative_link_resolves(document: Path) -> None:
    problems = broken_links(document)
    assert not problems, f"{document.relative_to(REPO)}: " + "; ".join(problems)


def test_the_link_check_sees_broken_links(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## Node A (`NodeA`)\n\n## Same\n\n## Same\n")
    (tmp_path / "picture.png").write_bytes(b"")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md#node-a-nodea) [ok](other.md#same-1) ![ok](picture.png) [ok](#page)\n"
        "[web](https://example.com/x.md) `[code](missing.md)`\n```\n[block](missing.md)\n```\n"
        "[gone](missing.md) [bad anchor](other.md#nope) ![gone](missing.png) [self](#nope)\n"
    )
    assert broken_links(page, tmp_path) == [
        "missing.md: no such file",
        "other.md#nope: no heading with anchor #nope in other.md",
        "missing.png: no such file",
        "#nope: no heading with anchor #nope in page.md",
    ]


# --------------------------------------------------------------------------------------------------------------
# the README


def test_readme_is_short_and_starts_with_the_quick_start() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines: keep it under {README_MAX_LINES}"
    quick_start = lines.index("## Quick start")
    commands = [
        number
        for number, line in enumerate(lines)
        if line.startswith(("bash scripts/run.sh --demo", "bash scripts/test.sh"))
    ]
    assert quick_start < 40 and len(commands) == 2 and max(commands) < quick_start + 10, (quick_start, commands)
    assert "## Supported ComfyUI versions" in lines
