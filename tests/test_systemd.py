"""The systemd files: the unit is valid for systemd-analyze and its ExecStart=, with the env file's
values, is a `cxr-edge watch` command line the CLI accepts; the sysusers.d and tmpfiles.d files parse, agree with the unit and the env file, and give
the folders the documented owner and mode. That the daemon works with that ownership is
tests/test_deployment.py."""

from __future__ import annotations

import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, need_tool

SYSTEMD = REPO / "systemd"
UNIT = SYSTEMD / "cxr-edge.service"
ENV = SYSTEMD / "cxr-edge.env"
SYSUSERS = SYSTEMD / "cxr-edge.sysusers"
TMPFILES = SYSTEMD / "cxr-edge.tmpfiles"


def unit_settings() -> dict[str, str]:
    """Name -> value of the unit's settings (the last assignment wins, as in systemd)."""
    found = {}
    for line in UNIT.read_text().splitlines():
        if re.match(r"^[A-Za-z]+=", line):
            name, value = line.split("=", 1)
            found[name] = value
    return found


def env_settings() -> dict[str, str]:
    return dict(line.split("=", 1) for line in ENV.read_text().splitlines() if line and not line.startswith("#"))


def shared_folders() -> list[str]:
    """The folders cxr-edge.env has the daemon share: inbox, out and --processed-dir."""
    env = env_settings()
    options = shlex.split(env["CXR_EDGE_OPTIONS"])
    return [env["CXR_EDGE_INBOX"], env["CXR_EDGE_OUT"], options[options.index("--processed-dir") + 1]]


def config_lines(path) -> list[list[str]]:
    """The fields of each line of a sysusers.d / tmpfiles.d file, comments and blank lines left out."""
    lines = path.read_text().splitlines()
    return [line.split() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def sysusers_groups() -> list[str]:
    return [fields[1] for fields in config_lines(SYSUSERS) if fields[0] == "g"]


def tmpfiles_entries() -> dict[str, dict]:
    """Path -> its tmpfiles.d fields."""
    return {f[1]: dict(zip(("type", "mode", "user", "group", "age"), (f[0], *f[2:6]))) for f in config_lines(TMPFILES)}


def exec_start_argv(env: dict[str, str]) -> list[str]:
    """ExecStart= as systemd runs it (systemd.service(5)): `${VAR}` is one word, `$VAR` is split
    at whitespace into several."""
    argv = []
    for word in shlex.split(unit_settings()["ExecStart"]):
        if whole := re.fullmatch(r"\$\{(\w+)\}", word):
            argv.append(env[whole[1]])
        elif split := re.fullmatch(r"\$(\w+)", word):
            argv += shlex.split(env[split[1]])
        else:
            argv.append(word)
    return argv


def test_exec_start_with_the_env_file_is_a_watch_command_the_cli_accepts():
    """The unit, the env file it names and the CLI agree: ExecStart= with cxr-edge.env's values
    and the StateDirectory= folder systemd passes parses as `cxr-edge watch` (an option renamed
    in the CLI but not in the env file fails here, not at a site's first start)."""
    from cxr_edge.cli import main

    settings = unit_settings()
    assert settings["EnvironmentFile"] == "/etc/cxr-edge/" + ENV.name  # where systemd/README.md installs it
    env = {**env_settings(), "STATE_DIRECTORY": "/var/lib/" + settings["StateDirectory"]}
    argv = exec_start_argv(env)
    assert Path(argv[0]).name == "cxr-edge" and argv[1] == "watch", argv
    params = main.commands["watch"].make_context("watch", argv[2:]).params
    assert (params["inbox"], params["out_dir"], params["state_dir"]) == \
        (env["CXR_EDGE_INBOX"], env["CXR_EDGE_OUT"], env["STATE_DIRECTORY"])
    options = shlex.split(env["CXR_EDGE_OPTIONS"])
    assert params["processed_dir"] == options[options.index("--processed-dir") + 1]


def test_sysusers_and_tmpfiles_parse():
    """Every line is a well-formed directive of the kinds we use (checked by hand, since the tools
    may be absent; test_ownership_made_by_the_systemd_tools runs them when present)."""
    lines = config_lines(SYSUSERS)
    assert lines
    for fields in lines:
        assert fields[0] == "g" and len(fields) == 3, fields  # g NAME ID: a group, ID "-" = allocated
        assert re.fullmatch(r"[a-z_][a-z0-9_-]{0,30}", fields[1]) and fields[2] == "-", fields
    lines = config_lines(TMPFILES)
    assert lines
    for fields in lines:
        assert len(fields) == 6, fields  # Type Path Mode User Group Age
        kind, path, mode, user, group, age = fields
        assert kind == "d" and path.startswith("/") and re.fullmatch(r"[0-7]{4}", mode), fields
        assert re.fullmatch(r"[a-z_][a-z0-9_-]*", user) and re.fullmatch(r"[a-z_][a-z0-9_-]*", group), fields
        assert age == "-", f"{path}: no automatic clean-up of patient data"


def test_ownership_files_agree_with_the_unit_and_env():
    settings = unit_settings()
    group = settings["SupplementaryGroups"]
    assert sysusers_groups() == [group]
    # systemd refuses a dynamic user named like an existing static group (systemd.exec(5)).
    assert settings["DynamicUser"] == "yes" and settings["User"] not in (group, "")
    entries = tmpfiles_entries()
    writable = settings["ReadWritePaths"].split()
    for folder in shared_folders():
        assert entries.get(folder) == {"type": "d", "mode": "2770", "user": "root", "group": group, "age": "-"}, folder
        assert any(folder == p or folder.startswith(p.rstrip("/") + "/") for p in writable), folder
    # Every parent of the shared folders that tmpfiles makes is root's and not writable by others.
    for path, entry in entries.items():
        if path not in shared_folders():
            assert entry["user"] == "root" and int(entry["mode"], 8) & 0o022 == 0, path


def test_ownership_made_by_the_systemd_tools(tmp_path):
    """systemd-sysusers and systemd-tmpfiles (--root: a scratch tree, not this machine) make the
    group and the folders as documented, and turn an old install's root-owned 0755 folders
    (`mkdir`, as the README said before) into the documented ones."""
    sysusers, tmpfiles = need_tool("systemd-sysusers"), need_tool("systemd-tmpfiles")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    old = root / shared_folders()[0].lstrip("/")
    old.mkdir(parents=True, mode=0o755)
    old.chmod(0o755)
    proc = subprocess.run([sysusers, f"--root={root}", str(SYSUSERS)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    groups = {line.split(":")[0]: int(line.split(":")[2]) for line in (root / "etc" / "group").read_text().splitlines()}
    group = unit_settings()["SupplementaryGroups"]
    assert group in groups, groups
    proc = subprocess.run([tmpfiles, "--create", f"--root={root}", str(TMPFILES)], capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0 and "Operation not permitted" in proc.stderr:
        pytest.skip(f"systemd-tmpfiles cannot chown here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    for folder in shared_folders():
        st = (root / folder.lstrip("/")).stat()
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o2770, (folder, oct(st.st_mode))
        assert (st.st_uid, st.st_gid) == (0, groups[group]), folder


def test_unit_verifies(tmp_path):
    need_tool("systemd-analyze")
    cli = shutil.which("cxr-edge") or sys.executable  # verify wants an executable that exists
    unit = tmp_path / "cxr-edge.service"
    unit.write_text(UNIT.read_text().replace("/opt/cxr-edge/venv/bin/cxr-edge", cli))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [l for l in proc.stderr.splitlines() if "cxr-edge.service" in l]
    assert proc.returncode == 0 and not problems, proc.stderr
