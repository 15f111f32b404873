"""docs/build.py: how nbdev's processed notebooks become the website's pages (no browser needed)."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("docs_build", ROOT / "docs" / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


def code(source: str, outputs=(), **metadata) -> dict:
    return {"cell_type": "code", "metadata": metadata, "source": source, "outputs": list(outputs), "execution_count": None}


def markdown_output(text: str) -> dict:
    return {"output_type": "execute_result", "data": {"text/markdown": text, "text/plain": "<ShowDoc>"}, "metadata": {}}


def test_chapters_in_reading_order(tmp_path):
    names = ["10_training.ipynb", "09b_guidance.ipynb", "00_index.ipynb", "08b_fast_unet.ipynb", "09_ddpm.ipynb",
             "08_unet.ipynb", "14b_scale.ipynb", "14_solvers.ipynb", "scratch.ipynb", "notes.md"]
    for n in names:
        (tmp_path / n).write_text("{}")
    assert [p.name for p in build.chapters(tmp_path)] == [
        "00_index.ipynb", "08_unet.ipynb", "08b_fast_unet.ipynb", "09_ddpm.ipynb", "09b_guidance.ipynb",
        "10_training.ipynb", "14_solvers.ipynb", "14b_scale.ipynb"]
    assert build.docname("00_index.ipynb") == "index" and build.docname("09b_guidance") == "09b_guidance"


def test_split_directives():
    assert build.split_directives("#| echo: false\n#|output: asis\nshow_doc(f)") == (
        {"echo": "false", "output": "asis"}, "show_doc(f)")
    assert build.split_directives("#| hide\nx = 1\n#| not a directive after code") == (
        {"hide": ""}, "x = 1\n#| not a directive after code")
    assert build.split_directives("x = 1") == ({}, "x = 1")


@pytest.mark.parametrize("source", ["#| hide\nx = 1", "#| include: false\nx = 1", ""])
def test_hidden_cells_are_dropped(source):
    assert build.stage_cell(code(source)) == []


def test_echo_false_hides_the_code_keeps_the_output():
    [cell] = build.stage_cell(code("#| echo: false\nplot()", [{"output_type": "display_data", "data": {}}]))
    assert cell["source"] == "plot()" and cell["metadata"]["tags"] == ["remove-input"] and cell["outputs"]


def test_other_cells_pass_through():
    [cell] = build.stage_cell(code("x = 1", [{"output_type": "stream", "text": "1"}]))
    assert cell["source"] == "x = 1" and "tags" not in cell["metadata"] and cell["outputs"]
    md = {"cell_type": "markdown", "metadata": {}, "source": "# Title"}
    assert build.stage_cell(md) == [md]


def test_output_false_hides_the_output():
    [cell] = build.stage_cell(code("#| output: false\nx", tags=["keep"]))
    assert cell["source"] == "x" and cell["metadata"]["tags"] == ["keep", "remove-output"]


def test_output_asis_becomes_markdown():
    shown = "### f\n\n>      f (x:int)\n\n[source](https://example.org/f.py#L3){target=\"_blank\" style=\"float:right\"}"
    [cell] = build.stage_cell(code("#| echo: false\n#| output: asis\nshow_doc(f)", [markdown_output(shown)]))
    assert cell["cell_type"] == "markdown" and cell["source"].startswith("### f\n")
    assert '<a class="reference external" href="https://example.org/f.py#L3" style="float:right">source</a>' in cell["source"]
    assert "{target" not in cell["source"]
    both = build.stage_cell(code("#| output: asis\nprint('**bold**')", [{"output_type": "stream", "text": "**bold**\n"}]))
    assert [c["cell_type"] for c in both] == ["code", "markdown"] and both[1]["source"] == "**bold**\n"


def test_links_to_the_doc_host_and_to_notebooks_become_page_links():
    rewrite = build.page_links({"schedules.html": "04_schedules"}, "https://example.github.io/course")
    text = ("[`NoiseSchedule`](https://example.github.io/course/schedules.html#noiseschedule), "
            "[x](https://example.github.io/course/gone.html), [ch 1](nbs/01_forward_process.ipynb), "
            "[home](00_index.ipynb)")
    assert rewrite(text) == ("[`NoiseSchedule`](04_schedules.ipynb#noiseschedule), "
                             "[x](https://example.github.io/course/gone.html), [ch 1](01_forward_process.ipynb), "
                             "[home](index.ipynb)")


def test_front_matter_becomes_the_title():
    nb = {"metadata": {}, "cells": [
        {"cell_type": "raw", "metadata": {}, "source": "---\ndescription: What it is.\noutput-file: forward.html\n"
                                                        "title: \"01 \\xB7 Forward\"\n\n---\n\n"},
        {"cell_type": "markdown", "metadata": {}, "source": build.DROPPED_MARKDOWN},
        code("#| export\n", []), code("x = 1")]}
    staged, title = build.stage_notebook(nb, lambda s: s)
    assert title == "01 · Forward"
    assert [c["source"] for c in staged["cells"]] == ["# 01 · Forward\n\n> What it is.", "x = 1"]
    assert staged["metadata"]["kernelspec"]["language"] == "python"
    assert len({c["id"] for c in staged["cells"]}) == 2
