"""A throwaway PostgreSQL server for the pipeline workflow's checks.

`initdb` + `pg_ctl` in a temporary directory, listening only on a Unix socket (no TCP), trust
authentication, every statement and connection logged with the database and application name so
the trusted side can count a candidate's statements and connections from the server's own log.
Started as a non-root user (PostgreSQL refuses root): the current user, or `postgres` when run as root.

    python -m moecoder.evals.tasks.workflows.pg      # start one, print its socket dir, wait for Ctrl-C
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
LOG_PREFIX = "%m [%p] db=%d app=%a "  # parsed by statements()/connections()


class PostgresUnavailable(RuntimeError):
    """PostgreSQL binaries are missing or the server would not start."""


def find_binary(name: str) -> str:
    for d in PG_BIN_DIRS:  # Debian keeps initdb/pg_ctl out of PATH
        if (d / name).exists():
            return str(d / name)
    found = shutil.which(name)
    if not found:
        raise PostgresUnavailable(f"{name} not found: install the Debian package `postgresql` "
                                  "(scripts/ci-system-deps.sh)")
    return found


@dataclass
class LogEntry:
    db: str
    app: str
    text: str


@dataclass
class ThrowawayPostgres:
    """Start with `start()` (or use as a context manager); `stop()` removes everything."""

    root: Path | None = None
    user: str = ""
    _owned_root: bool = field(default=False, repr=False)

    @property
    def socket_dir(self) -> str:
        assert self.root is not None
        return str(self.root / "sock")

    @property
    def log_path(self) -> Path:
        assert self.root is not None
        return self.root / "server.log"

    def dsn(self, dbname: str = "postgres", application_name: str = "") -> str:
        app = f" application_name={application_name}" if application_name else ""
        return f"host={self.socket_dir} dbname={dbname} user={self.user}{app}"

    def start(self, timeout_s: float = 60.0) -> Self:
        initdb, pg_ctl = find_binary("initdb"), find_binary("pg_ctl")
        run_as = None
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):  # PostgreSQL refuses to run as root
                try:
                    run_as = pwd.getpwnam(name)
                    break
                except KeyError:
                    continue
            else:
                raise PostgresUnavailable("running as root and neither `postgres` nor `nobody` exists to run the server")
        self.user = run_as.pw_name if run_as else pwd.getpwuid(os.geteuid()).pw_name
        # Not under /tmp: a sandbox mounts its own /tmp, which would hide the socket directory bound into it.
        base = "/var/tmp" if os.access("/var/tmp", os.W_OK) else None
        self.root = Path(tempfile.mkdtemp(prefix="moecoder-pg-", dir=base))
        self._owned_root = True
        (self.root / "sock").mkdir()
        os.chmod(self.root, 0o755)
        os.chmod(self.root / "sock", 0o777)  # the sandboxed candidate runs as another user
        if run_as:
            for p in (self.root, self.root / "sock"):
                os.chown(p, run_as.pw_uid, run_as.pw_gid)
        data = self.root / "data"
        opts = (f"-c listen_addresses='' -c unix_socket_directories={self.socket_dir} "
                "-c unix_socket_permissions=0777 -c log_statement=all -c log_connections=on "
                f"-c log_line_prefix='{LOG_PREFIX}' -c fsync=off -c synchronous_commit=off "
                "-c full_page_writes=off -c timezone=UTC -c max_connections=100 -c shared_buffers=16MB")
        cmds = [
            [initdb, "-D", str(data), "-U", self.user, "--auth=trust", "-E", "UTF8", "--no-sync"],
            [pg_ctl, "-D", str(data), "-l", str(self.log_path), "-o", opts, "-w", "-t", str(int(timeout_s)), "start"],
        ]
        for cmd in cmds:
            p = subprocess.run(cmd, capture_output=True, text=True, user=run_as.pw_uid if run_as else None,
                               env={**os.environ, "LC_ALL": "C"}, check=False)
            if p.returncode != 0:
                detail = (p.stderr or p.stdout).strip().splitlines()
                self.stop()
                raise PostgresUnavailable(f"{Path(cmd[0]).name} failed: {detail[-1] if detail else p.returncode}")
        return self

    def stop(self) -> None:
        if self.root is None:
            return
        data = self.root / "data"
        if (data / "postmaster.pid").exists():
            run_as = pwd.getpwnam(self.user) if os.geteuid() == 0 else None
            subprocess.run([find_binary("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, user=run_as.pw_uid if run_as else None, check=False)
        if self._owned_root:
            shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> Self:
        return self.start() if self.root is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def connect(self, dbname: str = "postgres", application_name: str = "moecoder-harness"):
        import psycopg2

        return psycopg2.connect(self.dsn(dbname, application_name))

    def create_database(self, prefix: str = "wf") -> str:
        """A fresh, uniquely named database (log lines carry its name, which separates runs)."""
        name = f"{prefix}_{secrets.token_hex(6)}"
        conn = self.connect()
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return name

    def drop_database(self, name: str) -> None:
        conn = self.connect()
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()

    def log_entries(self, db: str) -> list[LogEntry]:
        """Log entries of one database, continuation lines folded into their entry."""
        entries: list[LogEntry] = []
        head = re.compile(r"^\S+ \S+ \S+ \[\d+\] db=(\S*) app=(.*?) (LOG|ERROR|FATAL|STATEMENT|DETAIL|WARNING|HINT): +(.*)$")
        current: LogEntry | None = None
        for line in self.log_path.read_text(errors="replace").splitlines():
            mt = head.match(line)
            if mt:
                current = LogEntry(mt.group(1), mt.group(2), f"{mt.group(3)}: {mt.group(4)}")
                if current.db == db:
                    entries.append(current)
                else:
                    current = None
            elif current is not None:
                current.text += "\n" + line
        return entries

    def wait_log_flushed(self, db: str, marker: str, timeout_s: float = 5.0) -> None:
        """Block until `marker` (a statement sent last) shows in the log, so counts are complete."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(marker in e.text for e in self.log_entries(db)):
                return
            time.sleep(0.02)


def main() -> None:
    with ThrowawayPostgres() as pg:
        print(f"PostgreSQL listening on unix socket dir {pg.socket_dir} (user {pg.user}); log {pg.log_path}")
        print(f'psql "{pg.dsn()}"', flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
