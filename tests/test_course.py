"""The course stands on its own: it names nothing a reader of the repository does not have."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Names of documents that are not part of the repository (case-insensitive). Describe the idea instead,
# or cite the public source by author and title.
INTERNAL_NAMES = [
    r"seed ?0{2}[0-3]",
    r"blog seeds?",
    r"the seeds\b",
    r"the seed's",
    r"seed write-ups",
    r"write-ups",
    r"DESIGN\.md",
    r"SETUP-NOTES",
    r"set-up notes",
    r"course grew from",
    r"minimal notebook this course",
]
PATTERN = re.compile("|".join(f"(?:{p})" for p in INTERNAL_NAMES), re.IGNORECASE)


def course_files() -> list[Path]:
    "Every file a reader of the course sees: the notebooks, the README and the package's modules."
    return sorted([*ROOT.glob("nbs/*.ipynb"), ROOT / "README.md", *ROOT.glob("ddpm_course/*.py")])


def internal_name_hits(text: str) -> list[tuple[int, str]]:
    "(line number, matched text) for every internal name in `text`."
    return [(text.count("\n", 0, m.start()) + 1, m.group(0)) for m in PATTERN.finditer(text)]


def test_course_files_exist():
    files = course_files()
    assert len([f for f in files if f.suffix == ".ipynb"]) >= 10 and (ROOT / "README.md") in files


@pytest.mark.parametrize("path", course_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_internal_names(path):
    hits = internal_name_hits(path.read_text(encoding="utf-8"))
    assert not hits, f"{path.relative_to(ROOT)} names documents the reader does not have: " + "; ".join(
        f"line {n}: {s!r}" for n, s in hits)


@pytest.mark.parametrize("text", ["as seed 002 does", "Seed000", "the blog seeds' model", "in the seeds, too",
                                  "the seed's reshape", "mistakes write-ups make", "see DESIGN.md",
                                  "SETUP-NOTES.md", "the project's set-up notes", "the course grew from",
                                  "the minimal notebook this course"])
def test_pattern_catches_internal_names(text):
    assert internal_name_hits(text)


@pytest.mark.parametrize("text", ["seed=0", "the same seed gives the same order", "seed 4", "a seeded DataLoader",
                                  "Ho et al. (2020), Denoising Diffusion Probabilistic Models"])
def test_pattern_leaves_ordinary_text(text):
    assert not internal_name_hits(text)
