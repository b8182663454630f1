"""The Prefect UI in a real browser: open the deployment, fill the run form, start the run,
see it complete with our artifacts on the run page. Keeps a screenshot."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefect_vllm.testing import write_sample_prompts
from tests.helpers import REPO, input_ids, no_engine_left, read_output, wait_for

pytestmark = pytest.mark.integration

#: Where the screenshot is kept (CI can collect the folder; git ignores it).
SCREENSHOTS = REPO / "test-artifacts"


def chromium() -> str:
    """Debian's chromium, which the test command installs (scripts/test.sh) before pytest starts."""
    found = shutil.which("chromium")
    assert found, (
        "no chromium: run scripts/test.sh, which installs it with apt-get, or `apt-get install chromium`"
    )
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture
def ui_server(tmp_path: Path) -> Iterator[str]:
    """`prefect server start` with its UI, and `examples/serve.py` serving a deployment to it."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api, PREFECT_UI_API_URL=api,
        PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1",
    )  # fmt: skip
    logs = [(tmp_path / name).open("w") for name in ("server.log", "serve.log")]
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=logs[0], stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
    )  # fmt: skip
    procs = [server]
    try:
        wait_for(lambda: healthy(api) or server.poll() is not None, 180, "the Prefect server")
        assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
        serve = [sys.executable, "examples/serve.py", "--name", "ui"]
        procs.append(
            subprocess.Popen(
                serve, env=env, stdout=logs[1], stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
            )
        )
        wait_for(lambda: "is being served" in (tmp_path / "serve.log").read_text(), 180, "the deployment")
        yield f"http://127.0.0.1:{port}"
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs:
            log.close()


def test_a_run_started_from_the_ui_form_completes_with_our_artifacts(
    tmp_path: Path, tiny_model: Path, ui_server: str
) -> None:
    from playwright.sync_api import expect, sync_playwright

    prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=16)
    out = tmp_path / "out"
    SCREENSHOTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        # The UI renders in a browser sharing two cores with the engines of the other
        # test process: give each step minutes, not Playwright's 30 s default.
        page.set_default_timeout(180_000)
        expect.set_options(timeout=180_000)
        try:
            page.goto(f"{ui_server}/deployments")
            page.get_by_role("link", name="ui", exact=True).click()
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_role("link", name="Custom run").click()
            fields = page.locator("textarea")
            fields.nth(0).fill(str(prompts))  # input
            fields.nth(1).fill(str(out))  # output
            page.get_by_role("button", name="str", exact=True).first.click()  # model: a plain string
            fields.nth(2).fill(str(tiny_model))
            page.get_by_role("spinbutton").first.fill("8")  # shard_size
            page.get_by_role("button", name="Submit").click()
            page.get_by_role("button", name="View run").last.click()
            page.wait_for_url(re.compile(r".*/runs/flow-run/.*"))
            badge = page.locator(".state-badge").first
            expect(badge).to_have_class(re.compile(r"state--(completed|failed|crashed)"), timeout=600_000)
            page.screenshot(path=str(SCREENSHOTS / "ui-run-logs.png"), full_page=True)
            expect(badge).to_have_class(re.compile("state--completed"))
            page.get_by_text("Artifacts", exact=True).click()
            for kind in ("progress", "shards", "summary"):
                expect(page.get_by_text(re.compile(rf"prefect-vllm-\w+-{kind}")).first).to_be_visible()
            expect(page.get_by_text("2 of 2 shards committed")).to_be_visible()
            page.screenshot(path=str(SCREENSHOTS / "ui-run-artifacts.png"), full_page=True)
        finally:
            browser.close()
    assert Counter(read_output(out).column("custom_id").to_pylist()) == Counter(input_ids(prompts))
    no_engine_left()
