"""Every Python code block of README.md and docs/*.md runs as written, so the docs cannot drift.

How the blocks run: the ```python blocks of one Markdown file run in order in one shared
namespace (a later block may use what an earlier block defined), inside a fresh temporary working
folder, with one torch thread. Keep blocks fast: tiny models and data (a few seconds per file).

Opting out: a block that cannot run here (it needs a GPU, a dataset file, a remote machine, or
it is a fragment summarising a runnable block elsewhere) is preceded, on the line right before
its opening fence, by an HTML comment stating the reason, which readers of the rendered page do
not see:

    <!-- no-run: needs a CUDA GPU -->
    ```python
    ...
    ```

The reason is required (an empty one fails the test). Blocks in other languages (```bash,
```yaml, plain ```) are not run.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
NO_RUN = re.compile(r"^<!--\s*no-run:(?P<reason>.*?)-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    code: str
    skip_reason: str | None


def python_blocks(text: str) -> list[Block]:
    """The ```python blocks of a Markdown text, with the opt-out reason of each (or None)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, lang, start = match.group("fence"), match.group("lang").lower(), i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        if lang not in ("python", "py", "python3"):
            continue
        previous = lines[start - 1].strip() if start > 0 else ""
        marker = NO_RUN.match(previous)
        reason = marker.group("reason").strip() if marker else None
        indent = len(match.group("indent"))
        blocks.append(Block(start + 1, "\n".join(line[indent:] for line in body), reason))
    return blocks


def test_the_block_parser_reads_fences_and_opt_outs() -> None:
    text = (
        "intro\n```python\na = 1\n```\n<!-- no-run: needs a GPU -->\n```python\nb = 2\n```\n"
        "```bash\necho no\n```\n<!-- no-run: -->\n```python\nc = 3\n```\n"
    )
    blocks = python_blocks(text)
    assert [(b.line, b.code, b.skip_reason) for b in blocks] == [
        (2, "a = 1", None),
        (6, "b = 2", "needs a GPU"),
        (13, "c = 3", ""),
    ]


@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_python_blocks_run(doc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    blocks = python_blocks(doc.read_text(encoding="utf-8"))
    empty = [b.line for b in blocks if b.skip_reason == ""]
    assert not empty, (
        f"{doc.name}: the no-run marker before the blocks at lines {empty} needs a reason, "
        "e.g. <!-- no-run: needs a CUDA GPU -->"
    )
    runnable = [b for b in blocks if b.skip_reason is None]
    if not runnable:
        pytest.skip(f"{doc.name} has no runnable Python block")
    monkeypatch.chdir(tmp_path)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace: dict[str, object] = {"__name__": f"doc_{doc.stem}"}
    try:
        for block in runnable:
            try:
                # Warnings the docs promise (e.g. the pruner's unmet budgets) are part of the example.
                with warnings.catch_warnings(record=True):
                    exec(compile(block.code, f"{doc.name}:{block.line}", "exec"), namespace)  # noqa: S102
            except Exception as exc:
                pytest.fail(
                    f"{doc.relative_to(ROOT)}, the Python block at line {block.line} fails: "
                    f"{type(exc).__name__}: {exc}. Fix the block, or mark it with "
                    "<!-- no-run: REASON --> on the line before its fence"
                )
    finally:
        torch.set_num_threads(previous_threads)
