"""MkDocs hooks for the documentation site (mkdocs.yml): two pages are made at build time.

- ``index.md`` is the README and ``changelog.md`` the CHANGELOG, so each has one copy. Their
  links, and a page's links out of ``docs/`` (``../CHANGELOG.md``), point into the repository;
  on the site a page is linked as a page, and any other file of the repository is named by its
  path.
- ``http-reference.md`` gets the server's own OpenAPI document rendered in place of its marker:
  ``stepstream.server.openapi.document()`` for the demo tasks, built without Redis, so the
  reference cannot drift from what ``/openapi.json`` serves.

Before a build the package is copied, as the wheel lays it out, into ``.site-src/`` for
mkdocstrings (``.ci/lint_package.py``'s ``write_tree``): it reads packages from folders, and
``server/`` and ``tasks/`` become ``stepstream.server`` and ``stepstream.tasks`` only through
pyproject.toml's ``package-dir``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OPERATIONS_MARKER = "<!-- openapi-operations -->"
METHODS = ("get", "post", "put", "patch", "delete")
# [text](target) and ![alt](target), not inside a code span.
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")
FENCED = re.compile(r"(?ms)(^```.*?^```)")


# Files at the top of the repository that are pages of the site.
TOP_LEVEL_PAGES = {"README.md": "index.md", "CHANGELOG.md": "changelog.md"}


def on_startup(**_: Any) -> None:
    write_package_tree()


def on_pre_build(**_: Any) -> None:
    write_package_tree()  # again for each rebuild of `mkdocs serve`


def write_package_tree() -> None:
    spec = importlib.util.spec_from_file_location("lint_package", ROOT / ".ci" / "lint_package.py")
    assert spec is not None and spec.loader is not None
    lint_package = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lint_package)
    tree = ROOT / ".site-src"
    shutil.rmtree(tree, ignore_errors=True)
    lint_package.write_tree(tree)


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    uri = page.file.src_uri
    if uri in TOP_LEVEL_PAGES.values():
        top = next(name for name, page_uri in TOP_LEVEL_PAGES.items() if page_uri == uri)
        return _relink((ROOT / top).read_text(), "")
    if uri == "http-reference.md":
        markdown = markdown.replace(OPERATIONS_MARKER, operations_markdown())
    return _relink(markdown, "../")


def _relink(markdown: str, top: str) -> str:
    """``markdown`` with its links rewritten for the site, code blocks left as they are."""
    parts = FENCED.split(markdown)
    # split() with one group: the text between fenced blocks at even indexes, blocks at odd.
    return "".join(
        part if index % 2 else LINK.sub(lambda match: _site_link(match, top), part)
        for index, part in enumerate(parts)
    )


def _site_link(match: re.Match[str], top: str = "") -> str:
    """A link written for the repository, as the site needs it. ``top`` is the way from the
    page's folder to the top of the repository ("" for a top-level file, "../" for docs/)."""
    bang, text, target = match.groups()
    if re.match(r"[a-z]+:", target) or target.startswith("#"):
        return match.group(0)
    if top and not target.startswith(top):
        return match.group(0)  # a page's link to another page
    path, _, anchor = target.removeprefix(top).partition("#")
    if path.startswith("docs/") and not path.endswith("/"):  # a page, or an image of one
        page = path.removeprefix("docs/")
    elif path in TOP_LEVEL_PAGES:
        page = TOP_LEVEL_PAGES[path]
    else:
        # A file of the repository that is not a page of the site: name it.
        return text if text.startswith("`") else f"`{path}`"
    return f"{bang}[{text}]({page}{'#' + anchor if anchor else ''})"


# -- The HTTP reference, from /openapi.json ------------------------------------------------------


def operations_markdown() -> str:
    from stepstream.server.openapi import document
    from stepstream.tasks.registry import load_tasks
    from stepstream.tasks.settings import Settings

    doc = document("", Settings(), load_tasks([], demo=True).tasks(), production=True)
    lines: list[str] = []
    for path, item in doc["paths"].items():
        for method in METHODS:
            if method in item:
                lines += _operation(method, path, item[method])
    lines += ["## Schemas", ""]
    for name, schema in doc["components"]["schemas"].items():
        lines += _schema(name, schema)
    return "\n".join(lines)


def _operation(method: str, path: str, op: dict[str, Any]) -> list[str]:
    lines = [f"## `{method.upper()} {path}`", ""]
    if op.get("summary"):
        lines += [f"**{op['summary']}** (`{op.get('operationId', '')}`)", ""]
    if op.get("description"):
        lines += [op["description"], ""]
    security = sorted({name for entry in op.get("security", []) for name in entry})
    lines += [f"Credentials: {', '.join(f'`{s}`' for s in security) or 'none'}.", ""]
    parameters = op.get("parameters", [])
    if parameters:
        lines += ["| parameter | in | required | meaning |", "|---|---|---|---|"]
        for parameter in parameters:
            lines.append(
                f"| `{parameter['name']}` | {parameter['in']} | "
                f"{'yes' if parameter.get('required') else 'no'} | "
                f"{_cell(parameter.get('description', ''))} |"
            )
        lines.append("")
    body = op.get("requestBody")
    if body:
        for content_type, media in body.get("content", {}).items():
            lines += [f"Request body (`{content_type}`): {_type(media.get('schema', {}))}.", ""]
    lines += ["| status | meaning | body |", "|---|---|---|"]
    for status, response in sorted(op.get("responses", {}).items()):
        bodies = [
            f"`{content_type}` {_type(media.get('schema', {}))}"
            for content_type, media in response.get("content", {}).items()
        ]
        lines.append(
            f"| `{status}` | {_cell(response.get('description', ''))} | "
            f"{'<br>'.join(bodies) or '(none)'} |"
        )
    return [*lines, ""]


def _schema(name: str, schema: dict[str, Any]) -> list[str]:
    lines = [f"### `{name}`", ""]
    if schema.get("description"):
        lines += [_cell(schema["description"]), ""]
    properties = schema.get("properties", {})
    if not properties:
        return [*lines, f"{_type(schema)}.", ""]
    required = set(schema.get("required", []))
    lines += ["| field | type | required | meaning |", "|---|---|---|---|"]
    for field, spec in properties.items():
        lines.append(
            f"| `{field}` | {_type(spec)} | {'yes' if field in required else 'no'} | "
            f"{_cell(spec.get('description', ''))} |"
        )
    return [*lines, ""]


def _type(schema: dict[str, Any]) -> str:
    """A schema in a few words: a reference by name (linked), else its type."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[`{name}`](#{_anchor(name)})"
    for combinator in ("oneOf", "anyOf"):
        if combinator in schema:
            return " or ".join(_type(option) for option in schema[combinator])
    kind = schema.get("type")
    if kind == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if "enum" in schema:
        return " \\| ".join(f"`{json.dumps(value)}`" for value in schema["enum"])
    if isinstance(kind, list):
        return " or ".join(f"`{k}`" for k in kind)
    if kind == "object" and schema.get("properties"):
        fields = ", ".join(schema["properties"])
        return f"`{schema.get('title', 'object')}` {{{fields}}}"
    return f"`{kind}`" if kind else "any JSON"


def _anchor(name: str) -> str:
    # The toc extension's slug of the "### `Name`" heading.
    return re.sub(r"[^\w-]", "", name.lower().replace(" ", "-"))


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")
