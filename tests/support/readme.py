"""Code from the README, as a user would copy it: tests run it, so they break if it drifts."""

from __future__ import annotations

from tests.support.processes import ROOT

# The openings of the blocks tests run: the example task module ("Put it behind your product",
# step 2), the page that watches a job (step 5), and "Watch from any page".
README_TASKS = "```python\nfrom pydantic import BaseModel\nfrom stepstream import"
README_PAGE = '```js\nimport { watchJob } from "https://progress.example.com/stepstream.js";'
README_ANY_PAGE = '```html\n<script type="module">\n  import { watchJob } from "https://progress'


def code_block(opening: str) -> str:
    """The README's fenced block that starts with ``opening`` (its fence line and first code
    line), without the fences."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index(opening)
    body = start + opening.index("\n") + 1
    return readme[body : readme.index("```", body)]
