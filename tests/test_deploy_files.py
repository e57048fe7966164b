"""The systemd unit in deploy/: the hardening docs/deploy.md promises, and
a file systemd itself accepts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import require_tool

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "postwarden.service"


def directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_unit_runs_unprivileged_with_hardening() -> None:
    d = directives()
    assert d["User"] == ["postwarden"] and d["Group"] == ["postwarden"]
    assert d["NoNewPrivileges"] == ["yes"]
    assert d["ProtectSystem"] == ["strict"]
    assert d["ReadWritePaths"] == ["/var/lib/postwarden"]
    # Ports 25/465/587 without root, and no other capability.
    assert d["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert d["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # reloads the certificate
    assert "StandardOutput" not in d  # the journal: no log file to rotate


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    script = Path(sys.executable).parent / "postwarden"
    unit = tmp_path / "postwarden.service"
    unit.write_text(UNIT.read_text().replace("/opt/postwarden/venv/bin/postwarden",
                                             str(script)))
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)
    problems = [ln for ln in (proc.stdout + proc.stderr).splitlines()
                if "postwarden.service" in ln]
    assert proc.returncode == 0 and not problems, proc.stdout + proc.stderr
