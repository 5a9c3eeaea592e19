"""PostgreSQL with pgvector 0.8 for the tests: pgvector built from source against the pgserver wheel's
PostgreSQL, cached on disk, and servers started from that build in temporary folders.

The pgserver wheel (requirements-dev.txt) ships PostgreSQL 16.2 with pgvector 0.6, which has no
`halfvec` (0.7+), so 03_embeddings/qdrant_search.py's HNSW index past 2,000 dimensions cannot run on
it. `pgvector_install` copies the wheel's PostgreSQL tree (and the libpq it links), builds pgvector
PGVECTOR_VERSION into the copy with PGXS, and keeps the result for every later session:

    $PGVECTOR_CACHE (default ~/.cache/runpod-workers/pgvector) / postgresql-<version>-pgvector-<version>

The wheel's own files are never written. A build goes into a temporary folder and is renamed into
place in one step under a file lock, so a crash or a concurrent session never leaves, nor sees, half
a build. It needs the network once (pgvector's source from Debian's archive, checked against a
pinned sha256), a C compiler and make.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pwd
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.shared.disk_cache import built_once

PGVECTOR_VERSION = "0.8.0"
# Debian's copy of pgvector's release tarball (the same bytes as GitHub's v0.8.0 tag archive); the
# digest pins it, so a changed or truncated download fails the build instead of building it.
PGVECTOR_SOURCE = f"https://deb.debian.org/debian/pool/main/p/pgvector/pgvector_{PGVECTOR_VERSION}.orig.tar.gz"
PGVECTOR_SHA256 = "867a2c328d4928a5a9d6f052cd3bc78c7d60228a9b914ad32aa3db88e9de27b0"
DEFAULT_ROOT = Path.home() / ".cache" / "runpod-workers" / "pgvector"
DOWNLOAD_TIMEOUT_S = 60
# Compiling pgvector takes about 15 s on two busy cores; the limit only catches a hung build.
BUILD_TIMEOUT_S = 600
# pg_ctl's wait for the server to accept connections (a second or two when idle).
START_TIMEOUT_S = 60
# PostgreSQL refuses to run as root. As root (containers, this CI image) the server runs as this
# account instead: the one the pgserver wheel creates in the same case, so the suite adds at most one.
SERVER_ACCOUNT = "pgserver"
# The superuser initdb creates, named as pgserver's tests and most tutorials name it.
SUPERUSER = "postgres"


def pgserver_install() -> Path:
    """The pgserver wheel's PostgreSQL tree (bin, include, lib, share); read, never written."""
    import pgserver

    return Path(pgserver.__file__).resolve().parent / "pginstall"


def postgres_version(install: Path) -> str:
    """The version pg_config reports ("16.2" from "PostgreSQL 16.2")."""
    output = subprocess.run([install / "bin" / "pg_config", "--version"], capture_output=True, text=True, check=True)
    return output.stdout.split()[-1]


def cache_root() -> Path:
    return Path(os.environ.get("PGVECTOR_CACHE") or DEFAULT_ROOT)


def pgvector_install(root: Path | None = None) -> Path:
    """A PostgreSQL tree like pgserver's, with pgvector PGVECTOR_VERSION installed in it: built the
    first time any session asks, then handed out from the cache. Never write into it."""
    source = pgserver_install()
    key = f"postgresql-{postgres_version(source)}-pgvector-{PGVECTOR_VERSION}"
    base = cache_root() if root is None else Path(root)
    # The tree keeps the wheel's layout, pgserver/pginstall beside pgserver.libs: initdb finds its
    # libpq through the relative rpath the wheel's repair tool wrote ($ORIGIN/../../../pgserver.libs).
    built = built_once(base, key, lambda partial: _build(source, partial, base))
    return built / "pgserver" / "pginstall"


def _download_source(cache: Path) -> bytes:
    try:
        with urllib.request.urlopen(PGVECTOR_SOURCE, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data: bytes = response.read()
    except OSError as error:  # URLError, timeouts, refused connections
        raise RuntimeError(
            f"could not download pgvector {PGVECTOR_VERSION}'s source from {PGVECTOR_SOURCE} ({error}); "
            f"the pgvector {PGVECTOR_VERSION} tests need it once, then the build is cached in {cache}"
        ) from error
    digest = hashlib.sha256(data).hexdigest()
    if digest != PGVECTOR_SHA256:
        raise RuntimeError(f"{PGVECTOR_SOURCE} has sha256 {digest}, expected {PGVECTOR_SHA256}")
    return data


def _build(source: Path, into: Path, cache: Path) -> None:
    missing = [tool for tool in ("make", "gcc") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(
            f"building pgvector {PGVECTOR_VERSION} needs {' and '.join(missing)} (Debian: apt-get install gcc make)"
        )
    archive = _download_source(cache)
    install = into / "pgserver" / "pginstall"
    shutil.copytree(source, install, symlinks=True)
    shutil.copytree(source.parent.parent / "pgserver.libs", into / "pgserver.libs", symlinks=True)
    sources = into / "source"
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        tar.extractall(sources, filter="data")
    # The copy's pg_config reports the copy's own folders (PostgreSQL's paths are relative to its
    # binaries), so `make install` writes vector.so and the SQL files into the copy. OPTFLAGS= drops
    # pgvector's -march=native: the cached build must run on any CPU that shares the cache (halfvec's
    # F16C code is chosen at run time either way).
    command = ["make", "-C", str(sources / f"pgvector-{PGVECTOR_VERSION}"), f"-j{len(os.sched_getaffinity(0))}"]
    command += [f"PG_CONFIG={install / 'bin' / 'pg_config'}", "OPTFLAGS=", "install"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"building pgvector {PGVECTOR_VERSION} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
    shutil.rmtree(sources)
    extension = install / "share" / "postgresql" / "extension" / f"vector--{PGVECTOR_VERSION}.sql"
    if not extension.is_file():
        raise RuntimeError(f"building pgvector {PGVECTOR_VERSION} installed no {extension.name} into {install}")


def _as_server_account(directory: Path) -> dict[str, Any]:
    """subprocess arguments that run PostgreSQL's tools as SERVER_ACCOUNT when this process is root
    (and `directory` handed to that account), else nothing: PostgreSQL refuses to run as root."""
    if os.geteuid() != 0:
        return {}
    try:
        account = pwd.getpwnam(SERVER_ACCOUNT)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", SERVER_ACCOUNT], check=True, capture_output=True)
        account = pwd.getpwnam(SERVER_ACCOUNT)
    os.chown(directory, account.pw_uid, account.pw_gid)
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


@contextlib.contextmanager
def postgres_server(install: Path) -> Iterator[str]:
    """A PostgreSQL server from `install` with its own data folder, listening on a Unix socket only
    (no TCP port to collide with another session's); yields its connection URL, then stops it and
    deletes its folder.

    The folder is a short one in the system's temporary directory, not pytest's tmp_path: a socket's
    path must fit in 107 bytes, and as root pytest's 0700 base folder would shut SERVER_ACCOUNT out."""
    directory = Path(tempfile.mkdtemp(prefix="pg-"))
    data, log = directory / "data", directory / "server.log"
    account = _as_server_account(directory)
    binaries = install / "bin"

    def run(*command: str | Path) -> None:
        result = subprocess.run(
            [str(part) for part in command],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
            check=False,
            **account,
        )
        if result.returncode != 0:
            server_log = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"{Path(command[0]).name} failed:\n{result.stdout}{result.stderr}{server_log}")

    try:
        # --no-sync and fsync=off: a throwaway server in a test need not survive a power cut.
        run(binaries / "initdb", "-D", data, "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync")
        options = f"-c listen_addresses='' -c unix_socket_directories='{directory}' -c fsync=off"
        run(binaries / "pg_ctl", "-D", data, "-l", log, "-o", options, "-w", "-t", str(START_TIMEOUT_S), "start")
        try:
            yield f"postgresql:///postgres?host={directory}&user={SUPERUSER}"
        finally:
            run(binaries / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
