"""README's "Node reference" names every input and output of every MoMA node, as the real host serves the node
definitions (so a new input cannot go undocumented)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from comfyui_moma.nodes import NODES

README = Path(__file__).resolve().parents[1] / "README.md"
NODE_HEADING = re.compile(r"^\*\*(?P<display>[^*]+)\*\* \(`(?P<node_id>\w+)`\)", re.MULTILINE)


def node_reference_sections(text: str) -> dict[str, tuple[str, str]]:
    """node id -> (display name, its part of the "## Node reference" section: from its bold heading to the next)."""
    start = text.index("\n## Node reference\n")
    end = text.index("\n## ", start + 1)
    section = text[start:end]
    headings = list(NODE_HEADING.finditer(section))
    return {match["node_id"]: (match["display"], section[match.start(): following.start() if following else None])
            for match, following in zip(headings, [*headings[1:], None])}


def moma_nodes() -> dict[str, object]:
    """The pack's nodes as ComfyUI registered them (node id -> the class ComfyUI calls)."""
    import nodes

    ids = [node.define_schema().node_id for node in NODES]
    missing = [node_id for node_id in ids if node_id not in nodes.NODE_CLASS_MAPPINGS]
    assert not missing, f"ComfyUI did not register {missing}"
    return {node_id: nodes.NODE_CLASS_MAPPINGS[node_id] for node_id in ids}


def test_every_node_has_its_section() -> None:
    sections = node_reference_sections(README.read_text(encoding="utf-8"))
    registered = moma_nodes()
    assert set(registered) <= set(sections), f"no Node reference entry for {sorted(set(registered) - set(sections))}"
    for node_id, cls in registered.items():
        display, _ = display_and_outputs(cls)
        assert sections[node_id][0] == display, (node_id, sections[node_id][0], display)


def display_and_outputs(cls) -> tuple[str, list[str]]:
    """(display name, output names) as /object_info gives them to the frontend."""
    import nodes

    if hasattr(cls, "GET_NODE_INFO_V1"):
        info = cls.GET_NODE_INFO_V1()
        return info["display_name"], list(info["output_name"])
    node_id = next(key for key, value in nodes.NODE_CLASS_MAPPINGS.items() if value is cls)
    return nodes.NODE_DISPLAY_NAME_MAPPINGS.get(node_id, node_id), list(getattr(cls, "RETURN_NAMES", ()) or ())


@pytest.mark.parametrize("node_id", sorted(node.define_schema().node_id for node in NODES))
def test_node_reference_names_every_input_and_output(node_id: str) -> None:
    section = node_reference_sections(README.read_text(encoding="utf-8"))[node_id][1]
    cls = moma_nodes()[node_id]
    inputs = cls.INPUT_TYPES()
    names = [name for group in ("required", "optional") for name in inputs.get(group, {})]
    assert names, f"{node_id}: the host lists no inputs"
    undocumented = [name for name in names if f"`{name}`" not in section]
    assert not undocumented, f"README Node reference, {node_id}: inputs {undocumented} are not listed"
    _, outputs = display_and_outputs(cls)
    unnamed = [name for name in outputs if f"`{name}`" not in section]
    assert not unnamed, f"README Node reference, {node_id}: outputs {unnamed} are not named"


def test_the_check_sees_a_missing_input() -> None:
    """The section split is what the checks rely on: a heading's part ends at the next heading."""
    text = ("intro\n## Node reference\n\n**A Node** (`NodeA`) -> `out`.\n| `alpha` |\n\n**B Node** (`NodeB`): `beta`\n"
            "\n## Troubleshooting\n`gamma`\n")
    sections = node_reference_sections(text)
    assert set(sections) == {"NodeA", "NodeB"} and sections["NodeA"][0] == "A Node"
    assert "`alpha`" in sections["NodeA"][1] and "`beta`" not in sections["NodeA"][1]
    assert "`beta`" in sections["NodeB"][1] and "`gamma`" not in sections["NodeB"][1]
