"""Sphinx configuration: the batchtts documentation, Markdown pages read by MyST.

Build (warnings are errors, no network needed):  sphinx-build -W --keep-going -b html docs OUTDIR
The shell examples in these pages run in tests/test_docs.py (see "Runnable examples" there).
"""

project = "batchtts"
author = "batchtts contributors"
copyright = "batchtts contributors"

extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Headings get anchors, so pages link to sections as GitHub does: [text](manifests.md#columns).
myst_heading_anchors = 3
myst_enable_extensions = ["deflist"]

# The built-in theme: nothing to fetch at build time.
html_theme = "alabaster"
html_theme_options = {"description": "Batch text-to-speech, resumable", "fixed_sidebar": True}
html_title = "batchtts"
# No "view source" links to a tree of copied sources.
html_copy_source = False
html_show_sourcelink = False
