"""Every code block of the README and of docs/ runs: ``python`` blocks of one page in order in
one namespace (a page reads as one session), ``sh`` blocks through the ``etp-graph`` command.
``bash`` blocks hold the benchmark commands (hours of CPU) and are not run here; the runner has
its own tests (tests/benchmarks)."""
import re
import shlex
from pathlib import Path

import pytest

from etp_graph import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
BLOCK = re.compile(r"^```(python|sh)\n(.*?)^```", re.S | re.M)


def blocks(page):
    return [(kind, body) for kind, body in BLOCK.findall(page.read_text())]


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: p.name)
def test_every_block_runs(page, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)          # what the blocks write stays out of the checkout
    namespace = {"__name__": "__docs__"}
    for k, (kind, body) in enumerate(blocks(page)):
        if kind == "python":
            try:
                exec(compile(body, f"{page.name}[{k}]", "exec"), namespace)
            except Exception as e:
                raise AssertionError(f"{page.name}, block {k}: {type(e).__name__}: {e}") from e
            continue
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if not words:
                continue
            if words[0] == "make":
                continue   # make demo / make test: what the suite itself is run by
            assert words[0] == "etp-graph", f"{page.name}, block {k}: only etp-graph and make commands here"
            assert cli.main(words[1:]) == 0, f"{page.name}, block {k}: {line}: {capsys.readouterr().err}"


def test_the_api_page_names_every_public_name():
    import etp_graph as eg
    text = (ROOT / "docs" / "api.md").read_text()
    missing = [n for n in eg.__all__ if f"`{n}" not in text and f", `{n}" not in text and f"`{n}(" not in text]
    assert not missing, f"docs/api.md does not document {missing}"
