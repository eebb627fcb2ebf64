"""The pack's help inside ComfyUI: locales/ (English and Chinese node names, input/output names and tooltips) and
web/docs/ (the node library's help pages) are what scripts/make_node_docs.py makes from the node definitions the
real host serves, complete for every node, and ComfyUI serves them where its frontend looks."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import node_docs
import pytest
from comfyui_moma.nodes import NODES

NODE_IDS = [cls.GET_SCHEMA().node_id for cls in NODES]
REGENERATE = "run `python scripts/make_node_docs.py` with the host's Python"


@pytest.fixture(scope="module")
def infos() -> dict[str, dict]:
    """node id -> the definition /object_info serves (what the frontend translates and documents)."""
    import nodes

    return {node_id: nodes.NODE_CLASS_MAPPINGS[node_id].GET_NODE_INFO_V1() for node_id in NODE_IDS}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_english_locale_is_what_the_schemas_say(infos):
    """Tooltips and names in locales/en cannot go stale: they are the schemas' own text."""
    for name, content in (("nodeDefs", node_docs.en_node_defs(infos)), ("main", node_docs.en_main(infos))):
        assert read_json(node_docs.LOCALES / "en" / f"{name}.json") == content, f"locales/en/{name}.json: {REGENERATE}"


def test_chinese_strings_translate_the_current_english(infos):
    english = {"nodeDefs": node_docs.en_node_defs(infos), "main": node_docs.en_main(infos)}
    strings = node_docs.load_strings("zh")
    stale = [
        f"{name}.{line}"
        for name, content in english.items()
        for line in node_docs.stale_translations(content, strings.get(name, {}))
    ]
    assert not stale, (
        "re-translate in tools/node_docs/src/zh/strings.json (set 'en' to the new English and 'zh' to "
        f"its translation), then {REGENERATE}:\n" + "\n".join(stale)
    )


def test_chinese_locale_is_generated_from_its_strings(infos):
    files = node_docs.locale_files(infos)
    for name in ("nodeDefs", "main"):
        path = node_docs.LOCALES / "zh" / f"{name}.json"
        assert read_json(path) == files[path], f"locales/zh/{name}.json: {REGENERATE}"


@pytest.mark.parametrize("lang", node_docs.LANGUAGES)
def test_every_node_input_and_output_has_an_entry(infos, lang):
    defs = read_json(node_docs.LOCALES / lang / "nodeDefs.json")
    missing = []
    for node_id, info in infos.items():
        entry = defs.get(node_id, {})
        missing += [f"{node_id}.{key}" for key in ("display_name", "description") if not entry.get(key)]
        for port in node_docs.node_inputs(info):
            found = entry.get("inputs", {}).get(port.name, {})
            missing += [
                f"{node_id}.inputs.{port.name}.{key}"
                for key in ("name", "tooltip")
                if not found.get(key) and (key == "name" or port.tooltip)
            ]
        for index, port in enumerate(node_docs.node_outputs(info)):
            found = entry.get("outputs", {}).get(str(index), {})
            missing += [
                f"{node_id}.outputs.{index}.{key}"
                for key in ("name", "tooltip")
                if not found.get(key) and (key == "name" or port.tooltip)
            ]
    assert not missing, f"locales/{lang}/nodeDefs.json lacks {missing}"
    main = read_json(node_docs.LOCALES / lang / "main.json")
    custom_types = {
        port.type for info in infos.values() for port in node_docs.node_outputs(info) if port.type.startswith("MOMA_")
    }
    assert custom_types and custom_types <= set(main.get("dataTypes", {})), f"locales/{lang}/main.json: dataTypes"
    assert main.get("nodeCategories", {}).get("MoMA")


def test_a_changed_english_string_is_named_and_left_out():
    """The drift check itself: an entry whose English changed since its translation is reported, and the Chinese
    locale leaves it out (the frontend then shows the new English rather than an outdated translation)."""
    english = {
        "MomaApply": {
            "display_name": "Apply MoMA Attention",
            "inputs": {"strength": {"name": "strength", "tooltip": "New text."}},
        }
    }
    strings = {
        "MomaApply": {
            "display_name": {"en": "Apply MoMA Attention", "zh": "应用 MoMA 注意力"},
            "inputs": {
                "strength": {"name": {"en": "strength", "zh": "强度"}, "tooltip": {"en": "Old text.", "zh": "旧文本。"}}
            },
            "outputs": {"0": {"name": {"en": "MODEL", "zh": "模型"}}},
        }
    }
    problems = node_docs.stale_translations(english, strings)
    assert len(problems) == 2
    assert (
        problems[0].startswith("MomaApply.inputs.strength.tooltip: the English changed")
        and "'New text.'" in problems[0]
    )
    assert problems[1] == "MomaApply.outputs.0.name: translates something the pack no longer has"
    assert node_docs.translated(english, strings) == {
        "MomaApply": {"display_name": "应用 MoMA 注意力", "inputs": {"strength": {"name": "强度"}}}
    }
    untranslated = copy.deepcopy(english)
    untranslated["MomaApply"]["description"] = "A description."
    assert "MomaApply.description: not translated; English: 'A description.'" in node_docs.stale_translations(
        untranslated, strings
    )


@pytest.mark.parametrize("lang", node_docs.LANGUAGES)
@pytest.mark.parametrize("node_id", NODE_IDS)
def test_help_page_lists_every_input_and_output(infos, node_id, lang):
    """Each page's input table names exactly the schema's inputs, in its order (and the output table its outputs)."""
    path = node_docs.help_page_path(node_id, lang)
    assert path.is_file(), f"no help page {path.relative_to(node_docs.REPO)}: {REGENERATE}"
    text = path.read_text(encoding="utf-8")
    assert node_docs.table_ids(text, lang, "input") == [port.name for port in node_docs.node_inputs(infos[node_id])]
    assert node_docs.table_ids(text, lang, "output") == [port.name for port in node_docs.node_outputs(infos[node_id])]


@pytest.mark.default_host_only
def test_help_pages_are_generated(infos):
    """Every page is what the generator makes now (the default host's schemas: ComfyUI 0.3.75 has no 'advanced'
    inputs, which the pages mark); no page is left over for a node the pack no longer has."""
    pages = node_docs.help_pages(infos)
    stale = [
        str(path.relative_to(node_docs.REPO))
        for path, text in pages.items()
        if path.read_text(encoding="utf-8") != text
    ]
    assert not stale, f"{stale}: {REGENERATE}"
    assert set(node_docs.HELP_DIR.rglob("*.md")) == set(pages)


def test_help_pages_pictures_exist():
    """The frontend resolves a page's relative links against /extensions/<pack>/docs/ (whatever the page's own
    folder): each must name a file there, and stay small."""
    for page in node_docs.HELP_DIR.rglob("*.md"):
        for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)", page.read_text(encoding="utf-8")):
            if not re.match(r"^[a-z]+:|^#|^/", target):
                file = node_docs.HELP_DIR / target
                assert file.is_file(), f"{page.relative_to(node_docs.REPO)}: {target} is not in web/docs/"
                assert file.stat().st_size < 100_000, f"{target}: keep the help pages' pictures under 100 KB"


def test_comfyui_serves_the_pages_and_translations():
    """ComfyUI registers web/ under the pack's folder name, the name the frontend builds help URLs from
    (/extensions/<folder>/docs/<NodeId>/<locale>.md, then <NodeId>.md), and merges locales/ into its /i18n."""
    from app.custom_node_manager import CustomNodeManager

    import nodes

    module = nodes.NODE_CLASS_MAPPINGS["MomaApply"].RELATIVE_PYTHON_MODULE
    folder = module.split(".", 1)[1]
    assert module == f"custom_nodes.{folder}"
    assert Path(nodes.EXTENSION_WEB_DIRS[folder]).resolve() == (node_docs.REPO / "web").resolve()
    assert (node_docs.REPO / "web" / "docs" / "MomaApply" / "zh.md").is_file()
    translations = CustomNodeManager().build_translations()
    assert translations["zh"]["nodeDefs"]["MomaApply"]["display_name"] == "应用 MoMA 注意力"
    assert translations["zh"]["dataTypes"]["MOMA_CONTEXT"] == "MoMA 上下文"
    assert translations["en"]["nodeDefs"]["MomaApply"]["inputs"]["strength"]["name"] == "strength"
