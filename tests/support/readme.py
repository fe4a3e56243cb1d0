"""Code cut from the README as a user copies it, so the tests run what the README says."""

from __future__ import annotations

from tests.support.processes import ROOT


def readme() -> str:
    return (ROOT / "README.md").read_text()


def task_module() -> str:
    """The README's own example task module, as a user would copy it into tasks.py."""
    text = readme()
    start = text.index("```python\nfrom pydantic import BaseModel\nfrom stepstream import")
    return text[start + len("```python\n") : text.index("```", start + 10)]


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
