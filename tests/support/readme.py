"""Code from the README and the guides, as a user would copy it: tests run it, so they break if
it drifts."""

from __future__ import annotations

from pathlib import Path

from tests.support.processes import ROOT

README = ROOT / "README.md"
WATCHING = ROOT / "docs" / "watching.md"
MOUNTING = ROOT / "docs" / "mount.md"

# The openings of the blocks tests run: the example task module (the README's "Put it behind
# your product", step 2), the page that watches a job (step 5), and the page of docs/watching.md.
README_TASKS = "```python\nfrom pydantic import BaseModel\nfrom stepstream import"
README_PAGE = '```js\nimport { watchJob } from "https://progress.example.com/stepstream.js";'
README_ANY_PAGE = '```html\n<script type="module">\n  import { watchJob } from "https://progress'

# Where each block is written.
SOURCES: dict[str, Path] = {README_TASKS: README, README_PAGE: README, README_ANY_PAGE: WATCHING}


def readme() -> str:
    return README.read_text()


def code_block(opening: str) -> str:
    """The fenced block that starts with ``opening`` (its fence line and first code line), in the
    file ``SOURCES`` names, without the fences."""
    text = SOURCES[opening].read_text()
    start = text.index(opening)
    body = start + opening.index("\n") + 1
    return text[body : text.index("```", body)]


def task_module() -> str:
    """The README's own example task module, as a user would copy it into tasks.py."""
    return code_block(README_TASKS)


def mount_guide() -> tuple[str, list[str]]:
    """docs/mount.md ("Mount inside your app") as written: the host app's code, and its shell
    lines without their comments."""
    guide = MOUNTING.read_text()
    code = guide[guide.index("```python\n") + len("```python\n") :]
    shell = guide[guide.index("```bash\n") + len("```bash\n") :]
    lines = [line.split("#")[0].strip() for line in shell[: shell.index("```")].splitlines()]
    return code[: code.index("```")], lines
