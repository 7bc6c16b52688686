"""Where a site's services listen, as its workers see them (``ctx.services``, ``setup(services)``).

Built in the client once the services are started, pickled into each worker's
spec. Workers import this module: standard library only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

__all__ = ["ServiceAddress", "ServiceMap"]


@dataclass(frozen=True)
class ServiceAddress:
    """Where one service of a site can be reached, with its placeholders filled in.

    Attributes:
        site: the site the service belongs to.
        name: the service's name (the key in ``ctx.services``).
        host: the host it was declared with (``127.0.0.1`` unless given).
        port: its TCP port: the one declared, or the free one the federation picked
            for ``port=0``; ``None`` if it declared none.
        url: its URL as declared, placeholders filled in (``http://127.0.0.1:41234/``);
            ``None`` if it declared none.
    """

    site: str
    name: str
    host: str
    port: int | None
    url: str | None

    def __str__(self) -> str:
        if self.url is not None:
            return self.url
        if self.port is not None:
            return f"{self.host}:{self.port}"
        return f"{self.site}/{self.name}"


class ServiceMap(Mapping[str, ServiceAddress]):
    """A site's services by name: read-only; an unknown name says which exist."""

    __slots__ = ("_addresses", "_site")

    def __init__(self, site: str, addresses: Mapping[str, ServiceAddress]) -> None:
        self._site = site
        self._addresses = dict(addresses)

    def __getitem__(self, name: str) -> ServiceAddress:
        try:
            return self._addresses[name]
        except KeyError:
            pass
        import difflib  # only on this error path

        close = difflib.get_close_matches(str(name), list(self._addresses), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(
            f"site {self._site!r} has no service {name!r}{hint}; its services: {sorted(self._addresses)}"
        ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._addresses)

    def __len__(self) -> int:
        return len(self._addresses)

    def __repr__(self) -> str:
        return f"ServiceMap({self._site!r}, {self._addresses!r})"

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self._site, self._addresses))
