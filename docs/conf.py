"""Sphinx configuration of the course's website (built by `bash docs/build.sh`, see docs/build.py).

The pages are the notebooks as nbdev processed them, rendered by myst-nb without executing anything;
MathJax is copied from the `django-static-mathjax` package into the site, so that no page loads anything
from outside it.
"""
import re
import shutil
import sys
from configparser import ConfigParser
from pathlib import Path

import mathjax
from fastcore.docments import docments

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package of this checkout, for the API reference

_cfg = ConfigParser(delimiters=["="])
_cfg.read(ROOT / "settings.ini", encoding="utf-8")
cfg = _cfg["DEFAULT"]

project = cfg["repo"]
author = cfg["author"]
copyright = cfg["copyright"]
release = version = cfg["version"]

extensions = ["myst_nb", "sphinx.ext.autodoc"]
root_doc = "index"
exclude_patterns = ["_build", "**.ipynb_checkpoints"]

# myst-nb: render the stored outputs, never execute; markdown (and its math) in cells and in outputs
nb_execution_mode = "off"
nb_render_markdown_format = "myst"
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
suppress_warnings = ["myst.header"]  # show_doc headings (###) may follow a chapter's title directly

# MathJax 3 served from the site: build-finished copies it to _static/mathjax (see below)
MATHJAX = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
mathjax_path = "mathjax/tex-chtml.js"

# the API reference: docstrings, type hints, and nbdev's docments (a comment after each parameter)
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}

html_theme = "furo"
html_title = cfg["repo"]
html_show_sourcelink = False
html_copy_source = False
html_show_search_summary = False  # summaries fetch() each page, which browsers refuse for a site opened from disk


def markdown_to_rst(line: str) -> str:
    "One line of a docstring written in markdown, as nbdev's are, in reStructuredText: `code` and literal * | _."
    out = []
    for i, part in enumerate(re.split(r"(`[^`]+`)", line)):
        if i % 2:  # a code span
            out.append(rf"\ ``{part[1:-1]}``\ ")
        else:
            out.append(re.sub(r"(\w)_(?=\W|$)", r"\1\\_", re.sub(r"([\\*|])", r"\\\1", part)))
    return "".join(out)


def docstring_as_rst(app, what, name, obj, options, lines):
    "The docstring in reStructuredText, plus nbdev's parameter comments (`x: int = 1,  # what x is`) as fields."
    lines[:] = [markdown_to_rst(line) for line in lines]
    if what not in ("function", "method", "class"):
        return
    try:
        docs = docments(obj)
    except Exception:  # builtins, or objects without inspectable source
        return
    params = [f":param {k}: {markdown_to_rst(v)}" for k, v in docs.items() if v and k not in ("self", "return")]
    if docs.get("return"):
        params.append(f":returns: {markdown_to_rst(docs['return'])}")
    if params:
        lines.extend(["", *params])


def copy_mathjax(app, exception):
    "Serve MathJax from the site: the combined TeX-to-HTML component, its fonts and lazily loaded parts."
    if exception is None and app.builder.format == "html":
        keep = shutil.ignore_patterns("*svg*", "mml-*", "tex-chtml-full*", "tex-mml-*", "node-main.js")
        shutil.copytree(MATHJAX, Path(app.outdir) / "_static" / "mathjax", ignore=keep, dirs_exist_ok=True)


def setup(app):
    app.set_html_assets_policy("always")  # MathJax on every page: the navigation has math in chapter titles
    app.connect("autodoc-process-docstring", docstring_as_rst)
    app.connect("build-finished", copy_mathjax)
    app.set_html_assets_policy("always")  # MathJax on every page: chapter titles in the navigation hold math too
