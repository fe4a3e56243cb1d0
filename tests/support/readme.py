"""Code from the README, as a user would copy it: tests run it, so they break if it drifts."""

from __future__ import annotations

from tests.support.processes import ROOT

# The openings of the blocks tests run: the example task module ("Put it behind your product",
# step 2), the page that watches a job (step 5), and "Watch from any page".
README_TASKS = "```python\nfrom pydantic import BaseModel\nfrom stepstream import"
README_PAGE = '```js\nimport { watchJob } from "https://progress.example.com/stepstream.js";'
README_ANY_PAGE = '```html\n<script type="module">\n  import { watchJob } from "https://progress'


def readme() -> str:
    return (ROOT / "README.md").read_text()


def code_block(opening: str) -> str:
    """The README's fenced block that starts with ``opening`` (its fence line and first code
    line), without the fences."""
    text = readme()
    start = text.index(opening)
    body = start + opening.index("\n") + 1
    return text[body : text.index("```", body)]


def task_module() -> str:
    """The README's own example task module, as a user would copy it into tasks.py."""
    return code_block(README_TASKS)


def mount_guide() -> tuple[str, list[str]]:
    """ "Mount inside your app" as written: the host app's code, and its shell lines without
    their comments."""
    text = readme()
    guide = text[text.index("## Mount inside your app") :]
    guide = guide[: guide.index("\n## ", 1)]
    code = guide[guide.index("```python\n") + len("```python\n") :]
    shell = guide[guide.index("```bash\n") + len("```bash\n") :]
    lines = [line.split("#")[0].strip() for line in shell[: shell.index("```")].splitlines()]
    return code[: code.index("```")], lines
