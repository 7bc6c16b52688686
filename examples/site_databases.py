"""Every clinic runs its own PostgreSQL; a federated count never moves a row.

The federation starts one PostgreSQL server per clinic before the clinic's
workers: ``initdb`` into the clinic's data directory (the first time), then
``postgres`` on a free port, ready once it logs that it accepts connections.
Each clinic loads its own patients into its own database; then a pipeline
counts, at every clinic, the patients over an age, and the hub adds up the
counts. The rows stay where they are; only counts travel.

It needs the ``postgres``, ``initdb`` and ``psql`` programs: on PATH, or in
Debian's ``/usr/lib/postgresql/<version>/bin``. Where they are missing it says
so and exits with status 0 (a skip, not a failure).

PostgreSQL refuses to run as root. Run as root (a container, CI), the example
runs ``initdb`` and ``postgres`` as the unprivileged ``postgres`` user (or
``nobody``) through ``setpriv``, and gives that user the data directories.

Run it: ``python examples/site_databases.py``
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import federation as fed

CLINICS = ["clinic-a", "clinic-b"]
PATIENTS = {"clinic-a": 600, "clinic-b": 900}
MIN_AGE = 65

# initdb the first time, then become the server (exec: the supervisor's child is postgres).
SERVER = r"""
set -e
test -f "$PGDATA/PG_VERSION" || "$BIN/initdb" -D "$PGDATA" -U fed -A trust -E UTF8 --no-sync > /dev/null
exec "$BIN/postgres" -D "$PGDATA" -p "$PORT" -c listen_addresses="$HOST" -k "" -c fsync=off
"""


def find_binaries() -> tuple[Path | None, str]:
    """The directory holding postgres and initdb, and the psql to use; or None and why not."""
    candidates = []
    on_path = shutil.which("postgres")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True
    )
    candidates += versions
    for directory in candidates:
        if (directory / "postgres").exists() and (directory / "initdb").exists():
            return directory, ""
    return (
        None,
        "PostgreSQL's postgres and initdb were found neither on PATH nor in /usr/lib/postgresql/*/bin",
    )


def unprivileged_user() -> tuple[list[str], int | None, str]:
    """A command prefix that drops root for PostgreSQL, the uid to give files to; or why not."""
    if os.geteuid() != 0:
        return [], None, ""
    import pwd

    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return (
            [],
            None,
            "running as root, and setpriv (util-linux) is missing to run PostgreSQL as another user",
        )
    for name in ("postgres", "nobody"):
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            continue
        prefix = [setpriv, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--"]
        return prefix, user.pw_uid, ""
    return [], None, "running as root, and there is no 'postgres' or 'nobody' user to run PostgreSQL as"


def database_service(bin_dir: Path, as_user: list[str]) -> fed.Service:
    """One declaration for every clinic; the placeholders make each clinic's server its own."""
    return fed.Service(
        "db",
        [*as_user, "sh", "-c", SERVER],
        env={"PGDATA": "{data_dir}/pg", "PORT": "{port}", "HOST": "{host}", "BIN": str(bin_dir)},
        port=0,  # a free port for each clinic
        ready_line="database system is ready to accept connections",
        ready_timeout=120,  # initdb on a busy machine
        stop_grace=10,
    )


class Database:
    """A clinic's own database, as its workers reach it (with psql: no driver to install)."""

    def __init__(self, address: fed.ServiceAddress, psql: str) -> None:
        self.address = address
        self.psql = psql

    def run(self, sql: str) -> str:
        command = [self.psql, "-h", self.address.host, "-p", str(self.address.port), "-U", "fed"]
        command += ["-d", "postgres", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"psql failed at {self.address}: {done.stderr.strip()}")
        return done.stdout.strip()


def patients(clinic: str) -> list[tuple[int, int]]:
    """The clinic's own rows: (id, age), the same every run."""
    rng = random.Random(clinic)
    return [(i, rng.randint(18, 95)) for i in range(PATIENTS[clinic])]


load = fed.Pipeline("load")


@load.step(sites=CLINICS)
def load_patients(ctx):
    """Runs at each clinic, into the clinic's own database."""
    rows = ",".join(f"({i},{age})" for i, age in patients(ctx.site))
    ctx.state.run(
        "DROP TABLE IF EXISTS patients; CREATE TABLE patients (id int PRIMARY KEY, age int NOT NULL); "
        f"INSERT INTO patients VALUES {rows};"
    )
    return int(ctx.state.run("SELECT count(*) FROM patients"))


load.output(load_patients)

count = fed.Pipeline("count-older")


@count.step(sites=CLINICS)
def count_older(ctx, min_age):
    """Runs at each clinic: the query runs where the rows are; one number comes out."""
    return int(ctx.state.run(f"SELECT count(*) FROM patients WHERE age >= {int(min_age)}"))


@count.step(site="hub")
def total(count_older):
    return {"per_clinic": count_older, "total": sum(count_older.values())}


count.output(total)


def main() -> dict[str, object] | None:
    bin_dir, why_not = find_binaries()
    psql = shutil.which("psql") or (
        str(bin_dir / "psql") if bin_dir and (bin_dir / "psql").exists() else None
    )
    as_user, uid, root_problem = unprivileged_user()
    why_not = why_not or ("" if psql else "psql is missing") or root_problem
    if bin_dir is None or psql is None or why_not:
        print(f"skipped: {why_not}")
        return None
    base = Path(tempfile.mkdtemp(prefix="site-databases-"))
    print(f"data directories under {base}")
    try:
        for clinic in CLINICS:
            (base / clinic).mkdir()
        if uid is not None:  # the server's user must own its data directory
            for path in (base, *(base / clinic for clinic in CLINICS)):
                os.chown(path, uid, -1)

        def connect(services):
            """The setup of every worker of a clinic: its own database's address."""
            return Database(services["db"], psql)

        service = database_service(bin_dir, as_user)
        sites = [fed.Site(c, data_dir=base / c, setup=connect, services=[service]) for c in CLINICS]
        started = time.perf_counter()
        with fed.Federation([*sites, "hub"], pool_size=2) as federation:
            print(
                f"{len(CLINICS)} PostgreSQL servers and their workers up "
                f"in {time.perf_counter() - started:.1f} s"
            )
            loaded = federation.submit(load).result(timeout=120)
            print(f"loaded, each into its own database: {loaded}")
            result = federation.submit(count, min_age=MIN_AGE).result(timeout=120)
        expected = {c: sum(1 for _, age in patients(c) if age >= MIN_AGE) for c in CLINICS}
        assert result["per_clinic"] == expected, (result, expected)
        for clinic, n in result["per_clinic"].items():
            print(
                f"  {clinic}: {n} of {PATIENTS[clinic]} patients aged {MIN_AGE}+ "
                "(counted in its own database)"
            )
        print(f"total: {result['total']}, and not one row left its clinic")
        return result
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
