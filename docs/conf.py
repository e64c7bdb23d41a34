"""Sphinx configuration: the guides (Markdown, MyST) and the API reference generated from the
docstrings (autodoc + numpydoc), with the PyData theme.  Build with warnings as errors:

    python -m sphinx -W -b html docs docs/_build/html
"""

import xpnet

project = "xpnet"
author = "xpnet developers"
release = version = xpnet.__version__
copyright = "xpnet developers"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "none"           # numpydoc's Parameters sections say the types
autosummary_generate = False
numpydoc_show_class_members = False  # autodoc's :members: lists them once
numpydoc_validation_checks = set()
suppress_warnings = ["myst.xref_missing"]

html_theme = "pydata_sphinx_theme"
html_title = f"xpnet {release}"
html_theme_options = {"navigation_depth": 2, "show_toc_level": 2}
