"""Where the pack installs and what it relies on: the ComfyUI range the registry enforces, the one versioned node
API, and the host contract (nodes/host_contract.py) on this host and on hosts with one hook removed or changed."""

from __future__ import annotations

import ast
import importlib
import logging
import re
import sys
from pathlib import Path

import pytest
import tomllib
from comfyui_moma.moma.errors import MomaError
from comfyui_moma.nodes import host_contract
from comfyui_moma.nodes.node_api import API_VERSION
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
NEWEST_RELEASE = "0.47.1"  # ComfyUI's newest release when this was written (2026-12-02)
VERSION = re.compile(r"\b0\.\d+(?:\.\d+)?\b")


def listed_versions() -> set[str]:
    """The ComfyUI versions docs/compatibility.md's table lists (tested in CI or checked by hand), and every version
    in the README's "Supported ComfyUI versions" section when it has one."""
    table = [
        line for line in (REPO / "docs" / "compatibility.md").read_text().splitlines() if line.startswith("| ComfyUI ")
    ]
    versions = {match.group(0) for line in table for match in VERSION.finditer(line.split("|")[1])}
    readme = (REPO / "README.md").read_text()
    section = re.search(r"^## Supported ComfyUI versions\n(.*?)(?=^## |\Z)", readme, re.S | re.M)
    if section:
        versions |= set(VERSION.findall(section.group(1)))
    return versions


def test_requires_comfyui_admits_every_listed_version_and_newer_ones() -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["comfy"]["requires-comfyui"]
    supported = SpecifierSet(declared)
    versions = listed_versions()
    assert {"0.3.75", "0.30.0", "0.33.0"} <= versions, versions  # the table names what CI and hand checks ran
    for version in sorted(versions | {NEWEST_RELEASE, "1.0.0"}, key=Version):
        assert version in supported, f"requires-comfyui {declared!r} refuses ComfyUI {version}"
    assert "0.3.74" not in supported  # the floor is the oldest version tested


def _imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_only_node_api_imports_comfyuis_node_api(comfy_host) -> None:
    """Every file of the pack (what ComfyUI loads, and the runner and demo writers beside it) reaches comfy_api only
    through nodes/node_api.py, and the version it names is in this ComfyUI."""
    shipped = [
        REPO / "__init__.py",
        *(REPO / "nodes").glob("*.py"),
        *(REPO / "moma").glob("*.py"),
        *(REPO / "tools").rglob("*.py"),
        *(REPO / "scripts").glob("*.py"),
    ]
    importers = sorted(
        str(path.relative_to(REPO))
        for path in shipped
        if any(name.split(".")[0] == "comfy_api" for name in _imports_of(path))
    )
    assert importers == ["nodes/node_api.py"]
    assert _imports_of(REPO / "nodes" / "node_api.py") >= {f"comfy_api.{API_VERSION}"}
    versioned = importlib.import_module(f"comfy_api.{API_VERSION}")
    from comfyui_moma.nodes import node_api

    assert node_api.io is versioned.io and node_api.ComfyExtension is versioned.ComfyExtension


def test_the_host_contract_holds_here(comfy_host) -> None:
    import comfyui_version

    report = host_contract.check_host(refresh=True)
    assert report.ok, report.summary()
    assert report.comfyui_version == comfyui_version.__version__
    runner = host_contract.run_checks(host_contract.RUNNER_HOOKS)
    assert runner.ok, runner.summary()
    host_contract.require(host_contract.APPLY)  # nothing to refuse


def _drop_on_clone(monkeypatch) -> str:
    import comfy.patcher_extension

    monkeypatch.delattr(comfy.patcher_extension.CallbacksMP, "ON_CLONE")  # as if a release renamed it
    return "CallbacksMP.ON_CLONE"


def _no_three_tuple_lookup(monkeypatch) -> str:
    """A ComfyUI whose transformer block looks up replace patches only at (block, index), as before 3-tuple keys."""
    import comfy.ldm.modules.attention as attention

    forward = attention.BasicTransformerBlock.forward

    def two_tuple_only(self, x, context=None, transformer_options={}):  # noqa: B006  (ComfyUI's own signature)
        options = dict(transformer_options)
        options["patches_replace"] = {
            kind: {key: patch for key, patch in table.items() if len(key) == 2}
            for kind, table in transformer_options.get("patches_replace", {}).items()
        }
        return forward(self, x, context=context, transformer_options=options)

    monkeypatch.setattr(attention.BasicTransformerBlock, "forward", two_tuple_only)
    return "attn1/attn2 replace patches"


def _reordered_outer_sample(monkeypatch) -> str:
    import comfy.samplers

    def outer_sample(
        self,
        noise,
        sigmas,
        latent_image,
        sampler,
        denoise_mask=None,
        callback=None,
        disable_pbar=False,
        seed=None,
        latent_shapes=None,
    ):
        raise AssertionError("not called by the contract")

    monkeypatch.setattr(comfy.samplers.CFGGuider, "outer_sample", outer_sample)
    return "WrappersMP.OUTER_SAMPLE"


@pytest.mark.parametrize(
    "mutate",
    [_drop_on_clone, _no_three_tuple_lookup, _reordered_outer_sample],
    ids=["ON_CLONE renamed", "no 3-tuple key lookup", "outer_sample arguments reordered"],
)
def test_a_host_with_one_hook_changed_fails_the_contract_and_the_node_refuses(
    comfy_host, monkeypatch, caplog, mutate
) -> None:
    import comfyui_version

    hook_words = mutate(monkeypatch)
    try:
        with caplog.at_level(logging.ERROR):
            report = host_contract.check_host(refresh=True)
        assert [name for name in report.broken if hook_words in name], report.broken
        if mutate is not _drop_on_clone:  # (ComfyUI's own clone() uses ON_CLONE too: its other checks fail with it)
            assert len(report.broken) == 1, report.broken
        lines = [record.getMessage() for record in caplog.records if "[ComfyUI-MoMA]" in record.getMessage()]
        assert len(lines) == 1 and hook_words in lines[0] and f"ComfyUI {comfyui_version.__version__}" in lines[0]
        assert host_contract.APPLY in lines[0]
        from comfyui_moma.nodes.apply import apply_moma

        with pytest.raises(MomaError) as refused:  # refused before any input is read
            apply_moma(None, None, None, None, 1.0, 0.0, 1.0)
        message = str(refused.value)
        assert message.startswith("Apply MoMA Attention cannot run on this ComfyUI")
        assert hook_words in message and comfyui_version.__version__ in message
        host_contract.require(host_contract.LOADER)  # a node that does not need the hook still runs
    finally:
        monkeypatch.undo()
        assert host_contract.check_host(refresh=True).ok


def test_an_added_optional_parameter_does_not_trip_the_contract(comfy_host, monkeypatch) -> None:
    """Newer ComfyUIs add optional parameters (fast_disk on ModelPatcher, scale= on attention): harmless."""
    import comfy.model_patcher
    import comfy.samplers

    init = comfy.model_patcher.ModelPatcher.__init__
    outer = comfy.samplers.CFGGuider.outer_sample

    def init_with_fast_disk(self, *args, fast_disk=False, **kwargs):
        init(self, *args, **kwargs)
        self.fast_disk = fast_disk

    def outer_with_more(self, noise, latent_image, sampler, sigmas, *args, weight_cache=None, **kwargs):
        return outer(self, noise, latent_image, sampler, sigmas, *args, **kwargs)

    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "__init__", init_with_fast_disk)
    monkeypatch.setattr(comfy.samplers.CFGGuider, "outer_sample", outer_with_more)
    try:
        assert host_contract.check_host(refresh=True).ok
    finally:
        monkeypatch.undo()
        host_contract.check_host(refresh=True)


def test_every_pack_node_is_covered_by_the_contract() -> None:
    """Each node the pack registers is named by at least one hook (so require() guards it), and no hook names a
    node that does not exist."""
    from comfyui_moma.nodes import NODES

    display_names = {node.GET_SCHEMA().display_name for node in NODES}
    named = {node for hook in host_contract.HOOKS for node in hook.needed_by}
    assert named == display_names == set(host_contract.EVERY_NODE)
    assert sys.modules["comfyui_moma.nodes.host_contract"] is host_contract


def test_a_host_lacking_an_import_time_hook_is_named_by_the_contract_tool(comfy_host, monkeypatch) -> None:
    """Hooks the node modules import at load time (optimized_attention, SDTokenizer, comfy_api.v0_0_2) stop the pack
    from importing before any check can run: ``python -m moma_runner.contract`` (and so scripts/check_host.sh) then
    names what the import lacks, in one line, instead of only pointing at ComfyUI's IMPORT FAILED traceback."""
    import comfy.ldm.modules.attention as attention
    from moma_runner import contract

    monkeypatch.delattr(attention, "optimized_attention")  # as if a release renamed it
    reason = contract.import_error()
    assert reason.startswith("ImportError: ") and "optimized_attention" in reason and "\n" not in reason, reason
    monkeypatch.undo()
    assert contract.import_error().startswith("it imports here"), "the probe must see the restored host"
    assert not [name for name in sys.modules if name.startswith("comfyui_moma_import_probe")]
