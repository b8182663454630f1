"""Every docstring example runs, as a user would paste it into a script.

Paths under /tmp go to the test's own folder; the examples that save blocks talk to
the session's Prefect server and load what they saved (Prefect's block standard writes
`.load("BLOCK_NAME")`); the warm-pool example runs on the session's Ray cluster.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import REPO, SharedPool, cli_env

pytestmark = pytest.mark.integration


def docstring_examples() -> list[tuple[str, str]]:
    """(where, code) of every fenced Python example in the package's docstrings."""
    examples = []
    for path in sorted((REPO / "prefect_vllm").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in [tree, *ast.walk(tree)]:
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node, clean=False)
            for i, block in enumerate(re.findall(r"```python\n(.*?)```", doc or "", re.S)):
                where = f"{path.relative_to(REPO)}:{getattr(node, 'name', 'module')}:{i}"
                examples.append((where, textwrap.dedent(block)))
    return list(dict.fromkeys(examples))  # a module docstring is found once per walk root


EXAMPLES = docstring_examples()


def test_the_package_has_examples_to_run() -> None:
    assert len(EXAMPLES) >= 15, [where for where, _ in EXAMPLES]


@pytest.mark.parametrize(("where", "code"), EXAMPLES, ids=[where for where, _ in EXAMPLES])
def test_a_docstring_example_runs(
    where: str, code: str, tmp_path: Path, prefect_server: str, shared_pool: SharedPool
) -> None:
    code = code.replace("/tmp/", f"{tmp_path}/").replace('"auto"', f'"{shared_pool.address}"')
    saved = re.search(r'\.save\(\s*"([^"]+)"', code)
    if saved:  # Prefect's block examples load `BLOCK_NAME`: the name the example saved
        code = code.replace('"BLOCK_NAME"', f'"{saved.group(1)}"')
    script = tmp_path / "example.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script)],
        env=cli_env(tmp_path / "home", api_url=prefect_server),
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert done.returncode == 0, f"{where}:\n{code}\n{done.stderr[-3000:]}"
