"""One log record, one line: a request cannot write a forged line into the server's logs."""
from __future__ import annotations

import io
import json
import logging

import pytest

FORGED = "/x%0a2026-01-01 00:00:00,000 INFO vqdm.server.access [req_0] GET /admin 200%0d%1b[2K%e2%80%a8%c2%85"


@pytest.mark.parametrize("json_logs", [False, True])
def test_control_characters_in_a_request_stay_on_its_line(json_logs):
    from fastapi.testclient import TestClient

    from vqdm.server.app import create_app
    from vqdm.server.logs import log_handler
    from vqdm.server.settings import Settings

    out = io.StringIO()
    access = logging.getLogger("vqdm.server.access")
    handler, level = log_handler(json_logs, out), access.level
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        with TestClient(create_app(Settings(devices=["cpu"]), loader=lambda settings, devices: [])) as c:
            assert c.get(FORGED).status_code == 404
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    lines = out.getvalue().splitlines()  # splits at \n, \r, \x1c-\x1e, \x85, \u2028 and more
    assert len(lines) == 1, lines
    path = "/x\n2026-01-01 00:00:00,000 INFO vqdm.server.access [req_0] GET /admin 200\r\x1b[2K\u2028\x85"
    if json_logs:
        assert json.loads(lines[0])["path"] == path
    else:
        assert "GET /x\\n2026-01-01 00:00:00,000 INFO" in lines[0] and "200\\r\\x1b[2K\\u2028\\x85 404" in lines[0]
