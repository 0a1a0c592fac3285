"""The systemd unit: valid for systemd-analyze, and the service settings the daemon relies on."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

from .conftest import REPO, need_tool

UNIT = REPO / "systemd" / "cxr-edge.service"


def test_unit_has_the_service_settings():
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "DynamicUser=yes", "StateDirectory=cxr-edge",
                 "ProtectSystem=strict", "ReadWritePaths=", "NoNewPrivileges=yes", "PrivateTmp=yes", "KillMode=mixed",
                 "ExecReload=/bin/kill -HUP $MAINPID", "EnvironmentFile=/etc/cxr-edge/cxr-edge.env"):
        assert re.search(rf"^{re.escape(line)}", text, re.M), line
    env = (REPO / "systemd" / "cxr-edge.env").read_text()
    assert "CXR_EDGE_INBOX=" in env and "CXR_EDGE_OUT=" in env and "CXR_EDGE_OPTIONS=" in env


def test_unit_verifies(tmp_path):
    need_tool("systemd-analyze")
    cli = shutil.which("cxr-edge") or sys.executable  # verify wants an executable that exists
    unit = tmp_path / "cxr-edge.service"
    unit.write_text(UNIT.read_text().replace("/opt/cxr-edge/venv/bin/cxr-edge", cli))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [l for l in proc.stderr.splitlines() if "cxr-edge.service" in l]
    assert proc.returncode == 0 and not problems, proc.stderr
