"""A site's store: state every worker of a site shares, kept in its data directory.

``ctx.state`` is what ``setup`` made in *this* worker: each slot of the pool has
its own worker per site, so with ``pool_size=2`` a site has two of them, and
consecutive jobs may run on either. Anything that must follow the site from job
to job (a round counter, momentum, a client's model) belongs in ``ctx.store``:

* one SQLite database per site, ``<data_dir>/.federation/store.sqlite``, in WAL
  mode, shared by every worker of the site (any slot, any backend), surviving
  jobs, slot replacements and worker deaths (a commit is durable once it
  returned; a worker killed mid-write leaves the previous value);
* values are pickled; keys are strings;
* concurrent writes from two workers of one site are serialised by SQLite:
  ``store[key] = value`` is last-writer-wins, while ``store.update(key, fn)``
  is an atomic read-modify-write (``BEGIN IMMEDIATE``), so two slots that
  each add 1 to a counter always add 2.

To checkpoint a federation's site state, copy the data directories while no
job runs (or use SQLite's backup API on the file); to resume, start a
federation on the same directories.

Workers import this module: standard library only, and sqlite3 only on first use.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

__all__ = ["SiteStore", "SiteStoreOwner", "store_path"]

_MISSING: Any = object()
_BUSY_TIMEOUT = 30.0  # seconds a writer waits for another worker's transaction


def store_path(data_dir: str) -> str:
    """Where the store of the site with ``data_dir`` lives."""
    return os.path.join(data_dir, ".federation", "store.sqlite")


class SiteStore(MutableMapping[str, Any]):
    """A dict-like store shared by every worker of one site (``ctx.store``).

    Example::

        rounds = ctx.store.update("rounds", lambda n: n + 1, default=0)
        ctx.store["weights"] = weights
    """

    def __init__(self, site: str, data_dir: str) -> None:
        self.site = site
        self.path = store_path(data_dir)
        self._db: Any = None

    def _conn(self) -> Any:
        if self._db is None:
            import sqlite3

            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            db = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT, isolation_level=None)
            _set_wal(db)
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
            self._db = db
        return self._db

    def __getitem__(self, key: str) -> Any:
        row = self._conn().execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise KeyError(key)
        return pickle.loads(row[0])

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(key, str):
            raise TypeError(f"store keys are strings, not {type(key).__name__}")
        data = pickle.dumps(value, protocol=5)
        self._conn().execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, data))

    def __delitem__(self, key: str) -> None:
        if self._conn().execute("DELETE FROM kv WHERE key = ?", (key,)).rowcount == 0:
            raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter([row[0] for row in self._conn().execute("SELECT key FROM kv ORDER BY key")])

    def __len__(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM kv").fetchone()[0])

    def update_value(self, key: str, fn: Callable[[Any], Any], default: Any = _MISSING) -> Any:
        """Atomically replace the value of ``key`` by ``fn(value)`` and return the new value.

        Other workers of the site wait while it runs (keep ``fn`` short). Without
        ``default``, a missing key raises :class:`KeyError`.
        """
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
            if row is None:
                if default is _MISSING:
                    raise KeyError(key)
                old = default
            else:
                old = pickle.loads(row[0])
            new = fn(old)
            db.execute(
                "INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, pickle.dumps(new, protocol=5))
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return new

    # ``update`` reads better at the call site; MutableMapping.update (merge a dict) stays
    # available through ``store.merge``.
    def update(self, key: Any = (), fn: Any = None, /, default: Any = _MISSING, **kwargs: Any) -> Any:
        """``update(key, fn, default=...)``: atomic read-modify-write (see :meth:`update_value`).

        ``update(mapping)`` or ``update(**pairs)`` sets several keys, like a dict.
        """
        if isinstance(key, str) and fn is not None:
            return self.update_value(key, fn, default)
        self.merge(dict(key, **kwargs))
        return None

    def merge(self, values: dict[str, Any]) -> None:
        """Set several keys in one transaction."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            for key, value in values.items():
                db.execute(
                    "INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)",
                    (key, pickle.dumps(value, protocol=5)),
                )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        """Close this worker's connection (it reopens on next use)."""
        if self._db is not None:
            self._db.close()
            self._db = None

    def __repr__(self) -> str:
        return f"<SiteStore {self.site!r} at {self.path}>"


class SiteStoreOwner:
    """Gives a site runtime its store, opened on first use (a step may never ask for it)."""

    site: str
    data_dir: str | None
    _store: SiteStore | None = None

    def site_store(self) -> SiteStore:
        """This worker's handle on the site's store (opened on first use)."""
        store = self._store
        if store is None:
            if not self.data_dir:
                from ._exceptions import FederationError

                raise FederationError(
                    f"site {self.site!r} has no data_dir, where its store lives; "
                    "give the site a data_dir in its config"
                )
            store = self._store = SiteStore(self.site, self.data_dir)
        return store

    def close_store(self) -> None:
        """Close this worker's connection to the site's store, if it opened one."""
        store = self._store
        if store is not None:
            store.close()
            self._store = None


def _set_wal(db: Any) -> None:
    """Switch ``db`` to WAL, waiting for another worker that opens the same file at once.

    Changing the journal mode takes an exclusive lock and SQLite answers "database
    is locked" at once, without the busy timeout, while another connection does
    the same (two slots of a site opening a fresh store): try again for a while.
    """
    import sqlite3
    import time

    deadline = time.monotonic() + _BUSY_TIMEOUT
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)
