"""The pack's headless runner (scripts/run_workflow.py is its entry point), one module per job:

- ``workflow``: API-format loading, graph helpers, command-line overrides;
- ``models``: which model files a graph needs (models.json) and the missing-file message;
- ``validation``: ComfyUI's input validation against a server's /object_info, error texts;
- ``progress``: console progress; ``backend``: the interface of the two ways to run a graph:
  ``inprocess`` (ComfyUI imported here) and ``remote`` (a ComfyUI server);
- ``boot``: the one in-process ComfyUI boot (also used by tests/host.py and the benchmarks);
- ``demo``: --demo's tiny models (tools/moma_demo) and sizes; ``gui``: --gui (``comfy_main``: ComfyUI's main.py
  with a quiet log; ``demo_gui_nodes/``: the --gui --demo server's on-prompt handler); ``download``: --download;
- ``cli``: the command line; ``common``: paths, the base directory and its sample pictures, exit codes, errors.

The modules import each other without a circle (tests/test_import_graph.py): shared helpers live in ``common``
and ``boot``, never in a module that imports its callers.

Import it with ``tools/`` on sys.path (never the pack's root, which ComfyUI imports as a package).
"""
