"""A throwaway OpenSSH server on 127.0.0.1 for the SSH-remote tests.

Everything it needs lives in one temporary directory: its host key, a client key pair, the
authorized_keys file, its config, pid file and log, and a `home/` whose `.ssh/known_hosts` trusts
the host key (point HOME there so that the SSH client, asyncssh under dvc-ssh, verifies the server
instead of refusing an unknown host). It runs as the current user and binds only 127.0.0.1.

    with Sshd.start(tmp_dir) as server:   # SshdMissing without OpenSSH, SshdUnavailable if it fails
        server.url("remote")                # ssh://root@127.0.0.1:40123/<tmp_dir>/remote
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd")


class SshdUnavailable(RuntimeError):
    """sshd would not start here: a failure, with the reason (its config, its log)."""


class SshdMissing(SshdUnavailable):
    """No sshd or ssh-keygen installed: the one reason callers skip (a machine without OpenSSH)."""


def find_sshd() -> str | None:
    for candidate in (*SSHD_CANDIDATES, shutil.which("sshd")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True, text=True)


class Sshd:
    def __init__(self, directory: Path, binary: str):
        self.dir = directory
        self.binary = binary
        self.user = getpass.getuser()
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.host_key = directory / "ssh_host_ed25519_key"
        self.client_key = directory / "id_ed25519"
        self.authorized_keys = directory / "authorized_keys"
        self.config = directory / "sshd_config"
        self.pid_file = directory / "sshd.pid"
        self.log = directory / "sshd.log"
        self.home = directory / "home"  # HOME for the client: its .ssh/known_hosts trusts this server

    @classmethod
    def start(cls, directory: Path, attempts: int = 3) -> Sshd:
        binary = find_sshd()
        if binary is None:
            raise SshdMissing("no sshd binary (install openssh-server: apt-get install openssh-server)")
        if shutil.which("ssh-keygen") is None:
            raise SshdMissing("no ssh-keygen on PATH")
        directory.mkdir(parents=True, exist_ok=True)
        server = cls(directory, binary)
        server._prepare()
        errors = []
        for _ in range(attempts):  # a free port can be taken by someone else before sshd binds it
            try:
                server._launch(free_port())
                return server
            except SshdUnavailable as error:
                errors.append(str(error))
        raise SshdUnavailable("; ".join(errors))

    def _prepare(self) -> None:
        _keygen(self.host_key, "throwaway-host-key")
        _keygen(self.client_key, "throwaway-client-key")
        shutil.copyfile(self.client_key.with_suffix(".pub"), self.authorized_keys)
        self.authorized_keys.chmod(0o600)
        # Debian's sshd refuses to start without its privilege separation directory (made by the
        # package's service scripts, which never ran in a container).
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)

    def _launch(self, port: int) -> None:
        self.port = port
        self.config.write_text("\n".join([
            f"Port {port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            f"PidFile {self.pid_file}",
            "StrictModes no",
            "UsePAM no",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            f"AllowUsers {self.user}",
            "Subsystem sftp internal-sftp",
            "LogLevel VERBOSE",
            "",
        ]))
        test = subprocess.run([self.binary, "-t", "-f", str(self.config)], capture_output=True, text=True)
        if test.returncode != 0:
            raise SshdUnavailable(f"sshd -t rejected its config: {test.stderr.strip()}")
        # -D: stay in the foreground (our child, so we can stop it); -e: log to stderr (our file).
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([self.binary, "-D", "-e", "-f", str(self.config)],
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SshdUnavailable(f"sshd exited {self.process.returncode}: {self.log.read_text().strip()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    if sock.recv(64).startswith(b"SSH-2.0-"):
                        break
            except OSError:
                time.sleep(0.1)
        else:
            self.stop()
            raise SshdUnavailable(f"sshd did not answer on 127.0.0.1:{port} within 10 s: {self.log.read_text()}")
        host_public = self.host_key.with_suffix(".pub").read_text().split()
        (self.home / ".ssh").mkdir(parents=True, exist_ok=True)
        (self.home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_public[0]} {host_public[1]}\n")

    def url(self, path: str) -> str:
        """ssh:// URL of `path` under this server's directory."""
        return f"ssh://{self.user}@127.0.0.1:{self.port}{(self.dir / path).resolve()}"

    def ssh(self, *command: str) -> subprocess.CompletedProcess:
        """Runs a command through the OpenSSH client with the throwaway key and known_hosts."""
        return subprocess.run(
            ["ssh", "-F", "/dev/null", "-i", str(self.client_key), "-p", str(self.port),
             "-o", f"UserKnownHostsFile={self.home / '.ssh' / 'known_hosts'}", "-o", "StrictHostKeyChecking=yes",
             "-o", "BatchMode=yes", f"{self.user}@127.0.0.1", *command],
            capture_output=True, text=True, timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> Sshd:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
