"""The documentation: README.md is a short entrance, every relative link between the pages
resolves to a file and a heading, and every flag of every script is on its stage's page."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from conftest import REPO, load_script

README = REPO / "README.md"
PAGES = sorted([README, REPO / "benchmarks" / "README.md", *(REPO / "docs").glob("*.md")])
README_MOST_LINES = 200

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"`[^`]*`")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines of a Markdown text outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: link text kept, lower case, punctuation and symbols
    dropped (letters, digits, '_' and '-' stay), each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in "_- ")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a page; a repeated heading gets -1, -2 … as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(path: Path) -> list[str]:
    links = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                links.append(target)
    return links


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked)):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    return broken


# -- the checker itself ------------------------------------------------------------------

def test_slugs_follow_github():
    assert slug("LaMP tasks 1–5 and 7: `download_data.py`") == "lamp-tasks-15-and-7-download_datapy"
    assert slug("Multi-GPU and big models") == "multi-gpu-and-big-models"
    assert slug("Malformed questions and `--fix_known_issues`") == \
        "malformed-questions-and---fix_known_issues"


def test_the_checker_finds_a_missing_file_a_missing_heading_and_skips_code(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## A part\n", encoding="utf-8")
    page.write_text("# Page\n\n## Twice\n\n## Twice\n\n"
                    "[ok](other.md#a-part) [self](#twice-1) [web](https://example.org/x)\n"
                    "[gone](missing.md) [no heading](other.md#b-part) [none here](#nowhere)\n"
                    "`[in code](nowhere.md)`\n```\n[fenced](nowhere.md)\n# not a heading\n```\n",
                    encoding="utf-8")
    assert anchors(page) == {"page", "twice", "twice-1"}
    assert [problem.split(":")[0] for problem in broken_links(page)] == [
        "missing.md", "other.md#b-part", "#nowhere"]


# -- the pages ----------------------------------------------------------------------------

def test_the_docs_pages_exist():
    names = {path.name for path in (REPO / "docs").glob("*.md")}
    assert {"data.md", "retrieval.md", "prompts.md", "training.md", "per-user.md",
            "evaluation.md", "grids.md", "bad-input.md", "deviations.md", "multi-gpu.md",
            "layout.md", "feedback-retrieval.md"} <= names


@pytest.mark.parametrize("path", PAGES, ids=lambda path: str(path.relative_to(REPO)))
def test_every_relative_link_resolves(path):
    assert broken_links(path) == []


def test_the_readme_links_every_docs_page():
    linked = {(REPO / target.partition("#")[0]).resolve() for target in relative_links(README)}
    assert sorted(set(PAGES) - linked - {README}) == []


def test_the_readme_is_an_entrance():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MOST_LINES
    assert "make demo" in text and "make test" in text
    assert "pip install -r LaMP/requirements.txt" in text and "pip install -e ." in text


def test_the_readme_shows_the_seed_commands_in_stage_order():
    text = README.read_text(encoding="utf-8")
    commands = ["python download_data.py", "python data/avocado/create_avocado_dataset.py",
                "python rank_profiles.py", "python utils/merge_with_rank.py",
                "python train_llm.py", "python evaluate_llm.py", "python eval/eval_all.py",
                "python eval/eval_task.py"]
    positions = [text.find(command) for command in commands]
    assert -1 not in positions, [c for c, p in zip(commands, positions) if p == -1]
    assert positions == sorted(positions)


# -- every flag on its page ----------------------------------------------------------------

# Each script and the pages that document its flags (shared flag groups live on one page:
# profile flags in prompts.md, model and generation flags in evaluation.md).
SCRIPT_PAGES = {
    "download_data.py": ["data.md"],
    "data/avocado/create_avocado_dataset.py": ["data.md"],
    "data/make_sample.py": ["data.md"],
    "LaMP/rank_profiles.py": ["retrieval.md"],
    "LaMP/utils/merge_with_rank.py": ["retrieval.md"],
    "LaMP/evaluate_llm.py": ["evaluation.md", "prompts.md", "per-user.md"],
    "LaMP/train_llm.py": ["training.md", "prompts.md", "evaluation.md"],
    "LaMP/train_user_peft.py": ["per-user.md", "training.md", "prompts.md", "evaluation.md"],
    "eval/eval_task.py": ["evaluation.md"],
    "eval/eval_all.py": ["evaluation.md"],
    "eval/compare.py": ["evaluation.md"],
    "LaMP/reproduce.py": ["grids.md"],
    "LaMP/utils/make_subset.py": ["grids.md"],
    "demo.py": ["grids.md"],
    "LaMP/collect_feedback.py": ["feedback-retrieval.md", "prompts.md", "evaluation.md"],
    "LaMP/train_retriever.py": ["feedback-retrieval.md"],
    "LaMP/train_selector.py": ["feedback-retrieval.md"],
    "LaMP/build_zoo.py": ["zoo.md"],
    "LaMP/personalize_from_zoo.py": ["zoo.md", "prompts.md", "evaluation.md"],
    "eval/zoo_bound.py": ["zoo.md"],
    "LaMP/train_zoo_gates.py": ["zoo.md", "prompts.md", "evaluation.md"],
}


class _Parser(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__()
        self.parser = parser


def flags_of(script: str, monkeypatch) -> list[str]:
    """The long options of a script's parser, taken where its parse_args would parse."""
    module = load_script(script)

    def capture(self, *args, **kwargs):
        raise _Parser(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Parser) as parsed:
        module.parse_args([])
    monkeypatch.undo()
    return sorted(option for action in parsed.value.parser._actions
                  for option in action.option_strings
                  if option.startswith("--") and option != "--help")


def undocumented(flags: list[str], text: str) -> list[str]:
    return [flag for flag in flags if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text)]


def test_the_flag_check_tells_a_flag_from_a_longer_one():
    assert undocumented(["--seed", "--shard_id"], "`--seed_x` and `--shard_id 0`") == ["--seed"]


@pytest.mark.parametrize("script", sorted(SCRIPT_PAGES))
def test_every_flag_is_on_its_page(script, monkeypatch):
    flags = flags_of(script, monkeypatch)
    assert flags, f"no flags found for {script}"
    text = "\n".join((REPO / "docs" / page).read_text(encoding="utf-8")
                     for page in SCRIPT_PAGES[script])
    assert undocumented(flags, text) == [], f"document them in {SCRIPT_PAGES[script]}"
