"""The documentation: its examples run, its pages build, its links lead somewhere.

Runnable examples. Every fenced block of the README and of docs/*.md whose info string starts with
`sh` or `python` is run, unless the words after the language say otherwise:

    ```sh              run with bash -e; must exit 0
    ```sh exit=2       run; must exit 2 (a refused manifest, a budget reached, ...)
    ```sh no-run       shown only: needs what a test cannot have (a real key, a cluster, a bucket, root)
    ```sh same-as=P    not run here: the same block, byte for byte and with the same exit code, runs on
                       page P (its path from the root of the clone, e.g. docs/long-form.md), and no
                       later block of this page uses a folder it writes to (--out, -o, --to): an
                       example shown on two pages costs its run once

The blocks of one page run in order, in one fresh folder holding copies of sample_manifests/ and
jobs/ (so the commands work as written from the root of a clone, and a block may use what an
earlier one made), each in a process of its own, offline: against a `batchtts serve` on 127.0.0.1,
which BATCHTTS_BASE_URL and a dummy OPENROUTER_API_KEY point the CLI at. One test a page. Each
`batchtts` a block runs is a process of its own too, the environment's console script, forked by
the tests' fork server (forkserver.py): it starts without the second an interpreter and its imports
take."""

from __future__ import annotations

import itertools
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
from conftest import ROOT, batchtts_command, cli_env

DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
RUN_LANGUAGES = {"sh", "python"}
# Languages that are shell but would escape the runner: a shell example is written as `sh`.
SHELL_ALIASES = {"bash", "shell", "zsh", "console", "shell-session"}
# A block may narrate a book, master it and wrap it in an M4B: a minute on a quiet machine is far more
# than it needs, so this only catches a hang, also on a busy one.
BLOCK_TIMEOUT = 180
# Run before each `python` block: the library takes its provider from the Job, not from
# BATCHTTS_BASE_URL as the CLI does, so a job left with the default provider (OpenRouter's) is
# pointed at the test's server, as the CLI examples are.
PYTHON_PRELUDE = """\
import dataclasses as _dc, os as _os, batchtts as _b
_run = _b.run
def _offline(job, *args, **kwargs):
    if kwargs.get("provider") is None and job.provider.base_url == _b.Provider().base_url:
        job = _dc.replace(job, provider=_dc.replace(job.provider, base_url=_os.environ["BATCHTTS_BASE_URL"]))
    return _run(job, *args, **kwargs)
_b.run = _offline
"""

# A fenced block, at any indentation (inside a list item too), closed by the same fence.
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)(?P=fence)[ \t]*$",
    re.M | re.S,
)


@dataclass
class Block:
    page: Path
    line: int
    language: str
    words: list[str]
    code: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.language in RUN_LANGUAGES and "no-run" not in self.words and self.same_as is None

    @property
    def same_as(self) -> str | None:
        return next((w.split("=", 1)[1] for w in self.words if w.startswith("same-as=")), None)

    @property
    def expected_exit(self) -> int:
        return next((int(w.split("=", 1)[1]) for w in self.words if w.startswith("exit=")), 0)


def blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    found = []
    for m in FENCE.finditer(text):
        info = m["info"].split()
        if not info or info[0].startswith("{"):  # a plain block, or a MyST directive (toctree)
            continue
        indent = len(m["indent"])
        code = "".join(line[indent:] if line[:indent].isspace() else line for line in m["body"].splitlines(True))
        found.append(Block(page, text.count("\n", 0, m.start()) + 1, info[0], info[1:], code))
    return found


def runnable_pages() -> list[Path]:
    return [page for page in PAGES if any(b.runs for b in blocks(page))]


def test_every_example_is_marked_as_the_runner_reads_it():
    """A marker the runner does not know, or a shell block under another name, would be skipped
    silently: refuse them, so no example escapes the tests by a typo."""
    problems = []
    for page in PAGES:
        for block in blocks(page):
            if block.language in SHELL_ALIASES:
                problems.append(f"{block.where}: write shell examples as `sh` (or `sh no-run`), not `{block.language}`")
            if block.language in RUN_LANGUAGES:
                for word in block.words:
                    if word != "no-run" and not re.fullmatch(r"exit=\d+|same-as=\S+", word):
                        problems.append(f"{block.where}: unknown marker {word!r} (known: no-run, exit=N, same-as=PAGE)")
                if block.same_as is not None and ROOT / block.same_as not in PAGES:
                    problems.append(f"{block.where}: same-as={block.same_as} names no page of the documentation")
    assert not problems, "\n".join(problems)
    assert sum(b.runs for page in PAGES for b in blocks(page)) >= 20, "the runnable examples went missing"


@pytest.mark.parametrize("page", runnable_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_run(page: Path, tmp_path: Path, serve):
    server = serve()
    for folder in ("sample_manifests", "jobs"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    command = Path(batchtts_command())
    bin_dir = str(Path(sys.executable).parent)  # the environment under test, its `python` too
    env = cli_env(key="sk-or-docs-example", BATCHTTS_BASE_URL=server.url)
    env.pop("BATCHTTS_SERVE_KEY", None)
    env["PATH"] = f"{command.parent}:{bin_dir}:{env.get('PATH', '')}"  # its `batchtts` first
    found = blocks(page)
    for i, block in enumerate(found):
        if block.same_as is not None:
            _check_runs_elsewhere(block, found[i + 1:])
        if not block.runs:
            continue
        argv = ["bash", "-e", "-c", block.code] if block.language == "sh" else [sys.executable, "-c", PYTHON_PRELUDE + block.code]
        try:
            result = subprocess.run(argv, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                    text=True, timeout=BLOCK_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{block.where}: took more than {BLOCK_TIMEOUT} s:\n{block.code}")
        assert result.returncode == block.expected_exit, (
            f"{block.where}: exit {result.returncode}, expected {block.expected_exit}\n{block.code}\n"
            f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
        )


def _check_runs_elsewhere(block: Block, later: list[Block]) -> None:
    """A block left to another page: that page runs the very same block, and nothing later on this
    page needs a folder it writes to, which this page's run never made."""
    twin = ROOT / block.same_as
    assert twin != block.page and any(
        other.runs and (other.language, other.code, other.expected_exit) == (block.language, block.code, block.expected_exit)
        for other in blocks(twin)
    ), f"{block.where}: no block of {block.same_as} that runs is this one, byte for byte"
    words = shlex.split(block.code, comments=True)
    written = {PurePosixPath(value).parts[0] for flag, value in itertools.pairwise(words) if flag in ("--out", "-o", "--to")}
    for other in later:
        used = [folder for folder in written if re.search(rf"(?<![\w./-]){re.escape(folder)}/", other.code)]
        assert not (other.runs and used), f"{other.where} uses {used}, which {block.where} leaves to {block.same_as}"


def test_docs_build_with_warnings_as_errors(tmp_path: Path):
    """The pages build as CI builds them: a broken link between pages, a page left out of the
    contents, a bad directive or an unknown highlighting language fails here, not on a reader."""
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "html" / "index.html").is_file()


def test_readme_is_a_landing_page_whose_links_lead_somewhere():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 200
    targets = re.findall(r"\]\(((?!https?:)[^)#\s]+)(?:#[^)]*)?\)", text)
    assert any(t.startswith("docs/") for t in targets)
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"
    # Every page of the reference is linked from the landing page.
    linked = {Path(t).name for t in targets}
    unlinked = [p.name for p in sorted(DOCS.glob("*.md")) if p.name not in linked]
    assert not unlinked, f"docs pages the README does not link to: {unlinked}"


def test_readme_quickstart_is_the_two_commands_ci_runs():
    text = README.read_text(encoding="utf-8")
    assert "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && batchtts run jobs/demo.toml" in text
    assert "pip install -e '.[test]' && python -m pytest" in text


def test_the_crontab_line_in_the_docs_is_the_one_in_jobs():
    """docs/nightly.md shows jobs/crontab's line (which tests/test_unattended.py runs): the same line."""
    line = next(raw for raw in (ROOT / "jobs" / "crontab").read_text().splitlines() if raw.strip() and not raw.startswith("#"))
    page = (DOCS / "nightly.md").read_text(encoding="utf-8")
    assert " ".join(line.split()) in " ".join(page.split())
