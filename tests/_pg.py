"""A throwaway PostgreSQL cluster for the tests (a pytest plugin, loaded by conftest.py).

``pg_server`` (session) runs ``initdb`` and ``pg_ctl`` from Debian's ``postgresql``
package (``/usr/lib/postgresql/<version>/bin``) on a fresh data folder, listening on
127.0.0.1 on a free port with ``trust`` authentication, and stops it at the end. PostgreSQL
refuses to run as root: as root (CI) the cluster runs as the ``postgres`` system user,
with a data folder it owns. Tests needing it are skipped, with the reason, when the
package (or asyncpg) is missing: ``make system-deps`` installs it as root.

``pg_dsn`` (per test) is a new database at this relay's latest schema, copied from a
template migrated once; ``pg_empty_dsn`` a new database with no table at all.

The cluster trades durability for speed (``fsync=off``): it is thrown away, and the
crash tests of the log run on SQLite and on killed processes, not on power cuts.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

_counter = itertools.count()
T = TypeVar("T")


def _bin_dir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    return found[-1].parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgServer:
    host: str
    port: int
    user: str

    def dsn(self, dbname: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def create_database(self, *, template: str | None = None) -> str:
        """A new, uniquely named database; its DSN."""
        name = f"pli_test_{os.getpid()}_{next(_counter)}"

        async def run() -> None:
            import asyncpg  # noqa: PLC0415

            conn = await asyncpg.connect(self.dsn("postgres"))
            try:
                await conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
            finally:
                await conn.close()

        _run_in_thread(run())
        return self.dsn(name)


def _run_in_thread(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even inside a running event loop
    (in a thread of its own, with its own loop)."""
    out: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            out.append(asyncio.run(coro))
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return out[0]


def query(dsn: str, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of one query (``?`` placeholders), on a connection of its own, as an auditor would."""

    async def run() -> list[tuple[Any, ...]]:
        import asyncpg  # noqa: PLC0415

        from relay.storage._pg import pg_sql  # noqa: PLC0415

        conn = await asyncpg.connect(dsn)
        try:
            return [tuple(r) for r in await conn.fetch(pg_sql(sql), *args)]
        finally:
            await conn.close()

    return _run_in_thread(run())


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    bindir = _bin_dir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): "
                    "`make system-deps` installs Debian's postgresql package when run as root")
    try:
        import asyncpg  # noqa: F401, PLC0415
    except ImportError:
        pytest.skip("asyncpg is not installed: pip install -e '.[dev]' (or '.[postgres]')")
    as_root = os.geteuid() == 0
    if as_root:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` system user to run PostgreSQL as")
    root = Path(tempfile.mkdtemp(prefix="pli-pg-"))
    data = root / "data"
    data.mkdir()
    if as_root:
        for p in (root, data):
            os.chown(p, pw.pw_uid, pw.pw_gid)
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    port = _free_port()
    user = "pli"
    subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "-U", user, "--auth=trust",
                    "--encoding=UTF8", "--locale=C", "--no-sync"],
                   check=True, capture_output=True)
    options = (f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off "
               "-c full_page_writes=off -c max_connections=300")
    started = subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"),
                              "-o", options, "-w", "-t", "60", "start"], check=False, capture_output=True)
    if started.returncode != 0:
        log = (root / "log").read_text(errors="replace") if (root / "log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start: {started.stderr.decode(errors='replace')}\n{log}")
    try:
        yield PgServer(host="127.0.0.1", port=port, user=user)
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_template(pg_server: PgServer) -> str:
    """A database migrated to the latest schema, copied for each test (CREATE DATABASE … TEMPLATE)."""
    from relay.storage import Storage  # noqa: PLC0415

    dsn = pg_server.create_database()

    async def migrate() -> None:
        storage = await Storage.open(dsn, check=False)
        try:
            await storage.migrate(now=0)
        finally:
            await storage.close()

    _run_in_thread(migrate())
    return dsn.rpartition("/")[2]


@pytest.fixture
def pg_dsn(pg_server: PgServer, pg_template: str) -> str:
    """A new database at the latest schema."""
    return pg_server.create_database(template=pg_template)


@pytest.fixture
def pg_empty_dsn(pg_server: PgServer) -> str:
    """A new database without any table."""
    return pg_server.create_database()
