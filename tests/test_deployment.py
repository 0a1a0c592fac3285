"""The documented service ownership works (issue #10), shown without systemd: the real daemon runs
as an unprivileged UID from systemd's DynamicUser= range with the group of cxr-edge.sysusers as a
supplementary group and the unit's UMask=, on folders made exactly as cxr-edge.tmpfiles says (root,
the group, 2770) and a state folder as StateDirectory= makes it (the UID's, StateDirectoryMode=).
Another UID in the group delivers an image the documented way; the result must be readable by
the group and by nobody else. And the layout the README used to give (root-owned 0755 folders)
must make the daemon stop before READY with one `Error:` line, not fail on every write later.

Needs root (to act as other UIDs). When the Python running the tests lives in a folder those UIDs
cannot enter (e.g. pyenv under /root, mode 0700), the daemon runs in a private mount namespace
where only that Python's own folder is visible at the same path; otherwise, and for everything
that is not Python, subprocess's user=/group=/extra_groups=/umask=.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import pytest

from .conftest import SAMPLES
from .daemon_helpers import outputs, wait_for
from .test_systemd import TMPFILES, config_lines, env_settings, shared_folders, sysusers_groups, unit_settings

DAEMON_UID = 61234  # in systemd's DynamicUser= range, 61184-65519: stands for the unit's dynamic user
DELIVERER_UID = 61235  # e.g. the modality export or the rsync user, added to the group
STRANGER_UID = 61236  # any other local user
GROUP_GID = 61999  # stands for the group cxr-edge.sysusers makes

pytestmark = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                                reason="needs root, to run the daemon and the deliverer as other UIDs")


def group_name() -> str:
    [name] = sysusers_groups()
    return name


def umask() -> int:
    return int(unit_settings()["UMask"], 8)


# --- running things as other UIDs --------------------------------------------------------------

def _blocked_ancestor(path: Path) -> Path | None:
    """The first folder on the way to `path` that a UID other than its owner and group cannot enter."""
    for folder in [*reversed(path.parents), path]:
        if not os.stat(folder).st_mode & stat.S_IXOTH:
            return folder
    return None


# Runs as root in a fresh mount namespace: hides BLOCKED behind an empty tmpfs, shows each KEEP
# (a Python prefix below it) again at its own path, then becomes the UID and runs the command.
_NAMESPACE_SCRIPT = r"""
set -e
blocked=$1 stash=$2 uid=$3 groups=$4 mask=$5 keeps=$6; shift 6
IFS=:; set -f
i=0; for keep in $keeps; do mkdir -p "$stash/$i"; mount --bind "$keep" "$stash/$i"; i=$((i + 1)); done
mount -t tmpfs -o mode=0755,size=1m cxr-edge-test "$blocked"
umask 022
i=0; for keep in $keeps; do mkdir -p "$keep"; mount --bind "$stash/$i" "$keep"; i=$((i + 1)); done
unset IFS; set +f
umask "$mask"
if [ -n "$groups" ]; then groupopt="--groups=$groups"; else groupopt=--clear-groups; fi
exec setpriv --reuid="$uid" --regid="$uid" "$groupopt" --inh-caps=-all -- "$@"
"""


@lru_cache(maxsize=None)
def _python_view() -> tuple[str, tuple[str, ...]] | None:
    """(blocked folder, Python prefixes to show again) when other UIDs cannot reach this Python."""
    prefixes = sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.prefix)})
    blocked = {_blocked_ancestor(Path(p)) for p in prefixes} - {None}
    if not blocked:
        return None
    if len(blocked) > 1 or any(Path(p) == b or b not in Path(p).parents or ":" in p for b in blocked for p in prefixes):
        pytest.skip(f"other UIDs cannot reach {sys.executable} (blocked at {sorted(map(str, blocked))}) and "
                    "no single folder can be hidden to show it")
    return str(blocked.pop()), tuple(prefixes)


def popen_as(uid: int, groups: list[int], mask: int, argv: list[str], *, python: bool = False, scratch: Path,
             **kwargs) -> subprocess.Popen:
    """Start `argv` as `uid` (primary group `uid`, supplementary `groups`, umask `mask`), in a
    session of its own. `python`: it runs this Python, so it may need the mount-namespace view."""
    view = _python_view() if python else None
    if view is None:
        return subprocess.Popen(argv, user=uid, group=uid, extra_groups=groups, umask=mask, start_new_session=True,
                                **kwargs)
    blocked, keep = view
    stash = Path(tempfile.mkdtemp(dir=scratch, prefix="stash-"))
    return subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", _NAMESPACE_SCRIPT, "sh",
                             blocked, str(stash), str(uid), ",".join(map(str, groups)), f"{mask:04o}", ":".join(keep),
                             *argv], start_new_session=True, **kwargs)


def run_as(uid: int, groups: list[int], mask: int, argv: list[str], *, scratch: Path, python: bool = False,
           stdin=None, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = popen_as(uid, groups, mask, argv, python=python, scratch=scratch, stdin=stdin, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        _kill_group(proc)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


# --- the deployment, in a scratch tree -----------------------------------------------------------

class Deployment:
    """/srv/cxr-edge and /var/lib/cxr-edge of a host, under a scratch folder every UID can enter."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(dir="/tmp", prefix="cxr-edge-deploy-"))
        self.root.chmod(0o755)  # pytest's tmp_path (/tmp/pytest-of-root) is 0700: other UIDs could not enter
        inbox, out, processed = shared_folders()
        self.inbox, self.out, self.processed = self.host(inbox), self.host(out), self.host(processed)
        settings = unit_settings()
        self.state = self.host("/var/lib/" + settings["StateDirectory"])
        self.state_mode = int(settings["StateDirectoryMode"], 8)
        self.procs: list[subprocess.Popen] = []
        self.notify = None

    def host(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def make_documented_layout(self) -> None:
        """Each line of cxr-edge.tmpfiles, with the sysusers group as GROUP_GID."""
        ids = {"root": 0, group_name(): GROUP_GID}
        for kind, path, mode, user, group, _age in config_lines(TMPFILES):
            assert kind == "d", kind
            folder = self.host(path)
            self._mkdir_parents(folder)
            folder.mkdir(exist_ok=True)
            os.chown(folder, ids[user], ids[group])
            folder.chmod(int(mode, 8))
        self.make_state_dir()

    def make_old_layout(self) -> None:
        """What the README said before: `sudo mkdir -p /srv/cxr-edge/inbox /srv/cxr-edge/out` (+ processed)."""
        for folder in (self.inbox, self.out, self.processed):
            self._mkdir_parents(folder)
            folder.mkdir()
            folder.chmod(0o755)
        self.make_state_dir()

    def make_state_dir(self) -> None:
        """As StateDirectory= does for a dynamic user: owned by it, StateDirectoryMode=."""
        self._mkdir_parents(self.state)
        self.state.mkdir()
        os.chown(self.state, DAEMON_UID, DAEMON_UID)
        self.state.chmod(self.state_mode)

    def _mkdir_parents(self, folder: Path) -> None:
        for parent in reversed(folder.parents):
            if self.root in parent.parents and not parent.exists():
                parent.mkdir()
                parent.chmod(0o755)

    def start_daemon(self) -> tuple[subprocess.Popen, Path]:
        """`ExecStart=` of the unit with the env file's folders and disposition (no network options),
        as DAEMON_UID with the unit's group and umask, and systemd's environment."""
        options = shlex.split(env_settings()["CXR_EDGE_OPTIONS"])
        disposition = options[options.index("--disposition") + 1]
        self.notify_path = self.root / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify_path.chmod(0o777)
        self.notify.settimeout(0.2)
        self.messages: list[str] = []
        log_path = self.root / "daemon.log"
        argv = [sys.executable, "-m", "cxr_edge", "watch", str(self.inbox), "--out", str(self.out),
                "--state-dir", str(self.state), "--disposition", disposition, "--processed-dir", str(self.processed),
                "--settle", "0.5", "--workers", "1", "--min-side", "32"]
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/",
               "NOTIFY_SOCKET": str(self.notify_path), "STATE_DIRECTORY": str(self.state)}
        with open(log_path, "w") as log:
            proc = popen_as(DAEMON_UID, [GROUP_GID], umask(), argv, python=True, scratch=self.root, env=env, cwd="/",
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc, log_path

    def received(self, text: str) -> bool:
        try:
            while True:
                self.messages.append(self.notify.recv(4096).decode())
        except (socket.timeout, BlockingIOError):
            pass
        return any(text in m.split("\n") for m in self.messages)

    def close(self) -> None:
        for proc in self.procs:
            _kill_group(proc)
        if self.notify:
            self.notify.close()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def deployment():
    dep = Deployment()
    try:
        yield dep
    finally:
        dep.close()


_PROBE_FAILED: list[str] = []  # the skip reason, once found (the probe costs a Python start)


def check_python_reachable(dep: Deployment) -> None:
    """The daemon's UID must be able to run this Python, import cxr_edge and read the bundled model."""
    if _PROBE_FAILED:
        pytest.skip(_PROBE_FAILED[0])
    if _python_view() is not None:
        missing = [tool for tool in ("unshare", "setpriv") if not shutil.which(tool)]
        if missing:
            _PROBE_FAILED.append(f"other UIDs cannot reach {sys.executable} and {', '.join(missing)} (util-linux) "
                                 "is missing to show it to them in a mount namespace")
            pytest.skip(_PROBE_FAILED[0])
    probe = ("import cxr_edge, cxr_edge.cli, pathlib\n"
             "models = pathlib.Path(cxr_edge.__file__).parent / 'models'\n"
             "files = [p for p in models.rglob('*') if p.is_file()]\n"
             "assert files, models\n"
             "for p in files: open(p, 'rb').close()\n")
    try:
        proc = run_as(DAEMON_UID, [GROUP_GID], umask(), [sys.executable, "-c", probe], python=True, scratch=dep.root)
        problem = proc.stderr.strip()[-500:] if proc.returncode != 0 else None
    except OSError as exc:  # could not even exec it
        problem = str(exc)
    if problem:
        _PROBE_FAILED.append(f"UID {DAEMON_UID} cannot run {sys.executable} with cxr_edge and its model (they must "
                             f"be readable by every user, like /opt/cxr-edge/venv): {problem}")
        pytest.skip(_PROBE_FAILED[0])


def deliver(dep: Deployment, source: Path, name: str) -> None:
    """As the deliverer: write a dotted temp name in the inbox, then rename it (umask 007)."""
    with open(source, "rb") as data:  # read by the test: the deliverer need not see the repo
        proc = run_as(DELIVERER_UID, [GROUP_GID], 0o007,
                      ["sh", "-c", 'cat > "$1" && mv "$1" "$2"', "sh", str(dep.inbox / f".{name}.part"),
                       str(dep.inbox / name)], stdin=data, scratch=dep.root)
    assert proc.returncode == 0, proc.stderr


def status_as_root(dep: Deployment) -> dict:
    """What the README tells root to run: cxr-edge status --state-dir /var/lib/cxr-edge."""
    proc = subprocess.run([sys.executable, "-m", "cxr_edge", "status", "--state-dir", str(dep.state), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_documented_ownership_lets_the_dynamic_user_work_and_the_group_deliver_and_read(deployment):
    dep = deployment
    dep.make_documented_layout()
    check_python_reachable(dep)
    proc, log = dep.start_daemon()
    wait_for(lambda: dep.received("READY=1") or proc.poll() is not None, 180, what="READY=1 from the daemon")
    assert proc.poll() is None, log.read_text()[-3000:]

    source = SAMPLES / "nih" / "00000100_000.png"
    deliver(dep, source, source.name)

    def finished():
        assert proc.poll() is None, log.read_text()[-3000:]
        return outputs(dep.out) and not any(dep.inbox.iterdir())
    wait_for(finished, 120, what="the output JSON, and the input moved out of the inbox")
    [result] = outputs(dep.out)
    record = json.loads(result.read_text())
    assert record["status"] == "ok", record

    # Outputs: the daemon's, the group's (setgid folder), the unit's UMask: group-readable, not world.
    st = result.stat()
    assert (st.st_uid, st.st_gid) == (DAEMON_UID, GROUP_GID), (st.st_uid, st.st_gid)
    assert stat.S_IMODE(st.st_mode) == 0o666 & ~umask() == 0o640, oct(st.st_mode)
    # The delivered file was moved (--disposition move) into processed/, still the deliverer's.
    [moved] = [p for p in dep.processed.rglob("*") if p.is_file()]
    assert moved.name == source.name and moved.read_bytes() == source.read_bytes()
    assert (moved.stat().st_uid, moved.stat().st_gid) == (DELIVERER_UID, GROUP_GID)
    # The journal is in the state folder, the daemon's.
    journal = dep.state / "journal.sqlite3"
    assert journal.is_file() and journal.stat().st_uid == DAEMON_UID

    # A member of the group reads the result; any other user can neither read it nor deliver.
    reader = run_as(DELIVERER_UID, [GROUP_GID], 0o007, ["cat", str(result)], scratch=dep.root)
    assert reader.returncode == 0 and json.loads(reader.stdout)["status"] == "ok", reader.stderr
    for argv in (["cat", str(result)], ["ls", str(dep.out)], ["sh", "-c", f": > {dep.inbox}/.x.part"]):
        stranger = run_as(STRANGER_UID, [], 0o022, argv, scratch=dep.root)
        assert stranger.returncode != 0 and "Permission denied" in stranger.stderr, (argv, stranger.stderr)

    # Root reads the journal with `cxr-edge status` while the daemon runs, and after it stopped.
    assert status_as_root(dep)["inputs"]["done"] == 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, log.read_text()[-3000:]
    assert status_as_root(dep)["inputs"]["done"] == 1
    # ...and leaves nothing there the daemon could not write at its next start.
    assert {p.name: p.stat().st_uid for p in dep.state.iterdir() if p.stat().st_uid != DAEMON_UID} == {}


def test_old_layout_fails_before_ready_naming_the_folder(deployment):
    """Root-owned 0755 folders (the README's old `sudo mkdir`): exit 2 with one `Error:` line
    naming the folder, and never READY (systemd would otherwise count it as started)."""
    dep = deployment
    dep.make_old_layout()
    check_python_reachable(dep)
    proc, log = dep.start_daemon()
    wait_for(lambda: proc.poll() is not None or dep.received("READY=1"), 180, what="the daemon to exit or report READY")
    text = log.read_text()
    assert not dep.received("READY=1"), f"reported READY although it cannot write to its folders:\n{text[-3000:]}"
    assert proc.returncode == 2, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("Error:")]
    folders = "|".join(re.escape(str(p)) for p in (dep.inbox, dep.out))
    assert len(errors) == 1 and re.match(rf"Error: cannot write to ({folders})/?: \S", errors[0]), text[-3000:]
    assert "Traceback" not in text, text[-3000:]
