"""ComfyUI's input validation, for a graph and a server's ``/object_info``, and the runner's error texts.

``validate_with_object_info`` applies the rules of ComfyUI's ``execution.validate_prompt`` /
``validate_inputs`` (the installed host's source is the authority) to the node definitions a server
publishes, so ``--check --server`` rejects what the server would: unknown node types, a graph without
output nodes, missing required inputs, malformed links, links to a missing node or output, return-type
mismatches, values that do not convert to INT/FLOAT/BOOLEAN/STRING, values below ``min`` or above ``max``,
and combo values not among the choices. Like ComfyUI it validates only what an output node depends on.
What /object_info cannot show is left to the server: a node's own ``VALIDATE_INPUTS`` (LoadImage's file
check is done by the runner itself), and ComfyUI skipping min/max for the inputs such a function takes.
"""

from __future__ import annotations

from typing import Any

NodeErrors = dict[str, dict[str, Any]]
ANY_TYPES = {"*", "COMFY_MATCHTYPE_V3"}


def _error(kind: str, message: str, details: str) -> dict[str, str]:
    return {"type": kind, "message": message, "details": details}


def types_match(received: Any, wanted: Any) -> bool:
    """ComfyUI's ``validate_node_input`` (non-strict): equal, an any-type, or overlapping comma unions."""
    if received == wanted or received in ANY_TYPES or wanted in ANY_TYPES:
        return True
    if isinstance(received, list) and wanted == "COMBO":
        return True
    if not isinstance(received, str) or not isinstance(wanted, str):
        return False
    got, need = {t.strip() for t in received.split(",")}, {t.strip() for t in wanted.split(",")}
    return "*" in got or "*" in need or bool(got & need)


def _input_specs(info: dict) -> dict[str, tuple[str, list]]:
    """input name -> (category, spec) of a node's /object_info entry (required and optional)."""
    specs: dict[str, tuple[str, list]] = {}
    for category in ("required", "optional"):
        for name, spec in (info.get("input", {}).get(category) or {}).items():
            specs[name] = (category, spec if isinstance(spec, list) else [spec])
    return specs


def _literal_errors(name: str, value: Any, input_type: Any, options: dict) -> list[dict[str, str]]:
    if isinstance(value, dict) and "__value__" in value:
        value = value["__value__"]
    convert = (
        {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}.get(input_type)
        if isinstance(input_type, str)
        else None
    )
    if convert is not None:
        try:
            value = convert(value)
        except (TypeError, ValueError) as e:
            return [
                _error(
                    "invalid_input_type",
                    f"Failed to convert an input value to a {input_type} value",
                    f"{name}, {value}, {e}",
                )
            ]
    try:
        if "min" in options and value < options["min"]:
            return [_error("value_smaller_than_min", f"Value {value} smaller than min of {options['min']}", name)]
        if "max" in options and value > options["max"]:
            return [_error("value_bigger_than_max", f"Value {value} bigger than max of {options['max']}", name)]
    except TypeError:
        pass  # ComfyUI would raise here too; the server reports it
    if isinstance(input_type, list) or input_type == "COMBO":
        choices = list(input_type) if isinstance(input_type, list) else list(options.get("options", []))
        values = value if options.get("multiselect") and isinstance(value, list) else [value]
        invalid = [v for v in values if v not in choices]
        if invalid:
            listing = f"(list of length {len(choices)})" if len(choices) > 20 else str(choices)
            return [
                _error(
                    "value_not_in_list",
                    "Value not in list",
                    f"{name}: {', '.join(repr(v) for v in invalid)} not in {listing}",
                )
            ]
    return []


def validate_with_object_info(prompt: dict, object_info: dict) -> tuple[bool, dict | None, list[str], NodeErrors]:
    """(valid, error, good outputs, node errors), the shape of ComfyUI's ``validate_prompt`` result."""
    outputs = []
    for nid, node in prompt.items():
        class_type = node.get("class_type")
        if class_type is None or class_type not in object_info:
            title = node.get("_meta", {}).get("title", class_type or f"ID #{nid}")
            return (
                False,
                _error(
                    "missing_node_type",
                    f"Node '{title}' not found. The custom node may not be installed.",
                    f"Node ID '#{nid}'",
                ),
                [],
                {},
            )
        if object_info[class_type].get("output_node"):
            outputs.append(nid)
    if not outputs:
        return False, _error("prompt_no_outputs", "Prompt has no outputs", ""), [], {}

    validated: dict[str, tuple[bool, list]] = {}

    def check(nid: str, visiting: tuple[str, ...]) -> bool:
        if nid in validated:
            return validated[nid][0]
        if nid in visiting:
            validated[nid] = (False, [_error("dependency_cycle", "Dependency cycle detected", nid)])
            return False
        node = prompt[nid]
        inputs = node.get("inputs", {})
        errors: list[dict[str, str]] = []
        valid = True
        for name, (category, spec) in _input_specs(object_info[node["class_type"]]).items():
            input_type, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            if name not in inputs:
                if category == "required":
                    errors.append(_error("required_input_missing", "Required input is missing", name))
                continue
            value = inputs[name]
            if isinstance(value, list):
                if len(value) != 2:
                    errors.append(
                        _error(
                            "bad_linked_input",
                            "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                            name,
                        )
                    )
                    continue
                source_id, slot = value
                source = prompt.get(source_id)
                returned = object_info.get(source.get("class_type"), {}).get("output", []) if source else []
                if source is None or not isinstance(slot, int) or not 0 <= slot < len(returned):
                    errors.append(
                        _error(
                            "bad_linked_input",
                            "Linked node or output does not exist",
                            f"{name}: [{source_id!r}, {slot!r}]",
                        )
                    )
                    continue
                if not types_match(returned[slot], input_type):
                    errors.append(
                        _error(
                            "return_type_mismatch",
                            "Return type mismatch between linked nodes",
                            f"{name}, received_type({returned[slot]}) mismatch input_type({input_type})",
                        )
                    )
                    continue
                if not check(source_id, visiting + (nid,)):
                    valid = False
                continue
            errors += _literal_errors(name, value, input_type, options)
        validated[nid] = (valid and not errors, errors)
        return validated[nid][0]

    good, node_errors, failed = [], {}, []
    for output in outputs:
        if check(output, ()):
            good.append(output)
            continue
        failed.append(output)
        for nid, (ok, reasons) in validated.items():
            if not ok and reasons:
                entry = node_errors.setdefault(
                    nid, {"errors": reasons, "dependent_outputs": [], "class_type": prompt[nid]["class_type"]}
                )
                entry["dependent_outputs"].append(output)
    if not good:
        details = "\n".join(f"{e['message']}: {e['details']}" for info in node_errors.values() for e in info["errors"])
        return (
            False,
            _error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details),
            [],
            node_errors,
        )
    return True, None, good, node_errors


def format_validation_error(error: dict | None, node_errors: dict, prompt: dict) -> str:
    """ComfyUI's verdict on a graph, one line per failing input."""
    error = error or {}
    # ComfyUI's details repeat the node errors: show them once, per node
    head = f"{error.get('message', '')} {'' if node_errors else error.get('details', '')}".strip()
    if not head:
        skipped = sorted({o for info in node_errors.values() for o in info.get("dependent_outputs", [])})
        head = (
            f"ComfyUI would skip output node(s) {', '.join(skipped)} (and every node only they need), "
            "because of these inputs:"
        )
    lines = [f"ComfyUI rejected the workflow: {head}"]
    for nid, info in (node_errors or {}).items():
        for err in info.get("errors", []):
            lines.append(
                f"  node {nid} {info.get('class_type', prompt.get(nid, {}).get('class_type', '?'))}: "
                f"{err.get('message', '')}: {err.get('details', '')}"
            )
    return "\n".join(lines)


def format_execution_error(messages: list, verbose: bool) -> str:
    """The failing node and its exception from ComfyUI's status messages."""
    for event, data in messages:
        if event == "execution_error":
            text = (
                f"Node {data.get('node_id')} ({data.get('node_type')}) failed: "
                f"{data.get('exception_type')}: {data.get('exception_message')}".rstrip()
            )
            if verbose and data.get("traceback"):
                text += "\n" + "".join(data["traceback"])
            elif not verbose:
                text += "\n(run with --verbose for the traceback)"
            return text
        if event == "execution_interrupted":
            return f"Execution interrupted at node {data.get('node_id')} ({data.get('node_type')})."
    return "Execution failed (no error message from ComfyUI)."
