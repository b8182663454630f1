"""A configured Prefect API that does not answer is refused before anything starts."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from prefect_vllm._launch.server import check_answers
from prefect_vllm.exceptions import ConfigurationError


class _Unauthorized(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(401)  # Prefect Cloud without a key still answers
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def answering() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Unauthorized)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api"
    server.shutdown()


def test_an_api_that_answers_anything_passes(answering: str) -> None:
    check_answers(answering)


def test_nothing_listening_is_one_line_naming_the_variable_and_what_to_do() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    url = f"http://127.0.0.1:{port}/api"
    with pytest.raises(ConfigurationError) as refused:
        check_answers(url, timeout_s=2)
    message = str(refused.value)
    assert message.startswith(f"PREFECT_API_URL: nothing answers at {url} (")
    assert "unset PREFECT_API_URL" in message and "\n" not in message
