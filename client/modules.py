"""What a guest may import: the resolver a runtime is created with, and two ready-made ones.

``create_runtime(modules=resolver)``: every ``import`` in the guest of a specifier that is not a
``node:`` built-in (static or dynamic, in an eval or in a module loaded this way) asks
``await resolver(specifier, referrer)`` once, and the guest caches the answer for the runtime's
life. A relative specifier arrives resolved against the importing module's URL (an eval's URL is
``file:///`` + its filename, ``file:///main.js`` without one); ``referrer`` is that URL. The
resolver returns a ``Module`` or None; None, an exception (logged here with its traceback) or no
answer within the runtime's ``module_timeout`` fails the guest's import with ``TypeError: Module
not found "<specifier>"`` and a reason that never carries the host's exception text.

The loader itself never reads a file or the network: the guest gets only what the resolver hands
out. ``from_dict`` serves modules from memory, ``directory`` from a read-only tree on disk.
"""

from __future__ import annotations

import asyncio
import os
import posixpath
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias
from urllib.parse import unquote, urlsplit

from wire import protocol as P

#: Characters of a module's URL.
MAX_URL = 4096
#: The kinds a module may be, and the file extensions that imply each.
KINDS = ("javascript", "typescript", "json")
_BY_EXTENSION = {
    ".ts": "typescript", ".tsx": "typescript", ".mts": "typescript", ".cts": "typescript",
    ".json": "json",
}  # fmt: skip


def kind_of(url: str) -> str:
    """The kind a module's URL implies: TypeScript for .ts/.tsx/.mts/.cts, JSON for .json, else JavaScript."""
    path = urlsplit(url).path or url
    return _BY_EXTENSION.get(posixpath.splitext(path)[1].lower(), "javascript")


@dataclass(frozen=True, slots=True)
class Module:
    """A module the resolver hands to the guest: its ``source``, its canonical ``url`` (it names the
    module in stack traces, relative imports in it resolve against it, and two imports that lead to
    the same URL get the same module instance) and its ``kind``: "javascript", "typescript" (types
    are stripped, not checked) or "json"; by default the one ``url``'s extension implies."""

    source: str
    url: str
    kind: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not isinstance(self.url, str) or not self.url:
            raise TypeError("a Module needs a str source and a non-empty str url")
        if len(self.url) > MAX_URL:
            raise ValueError(f"a module's url is at most {MAX_URL} characters")
        if self.kind is None:
            object.__setattr__(self, "kind", kind_of(self.url))
        elif self.kind not in KINDS:
            raise ValueError(f"a module's kind is one of {', '.join(KINDS)}, not {self.kind!r}")
        if len(self.source.encode()) > P.MAX_SOURCE:
            raise ValueError(f"the module {self.url} is larger than {P.MAX_SOURCE} bytes")


#: ``async def resolver(specifier: str, referrer: str | None) -> client.Module | None``.
Resolver: TypeAlias = Callable[[str, "str | None"], Awaitable["Module | None"]]

#: The URL prefix of the modules ``from_dict`` and ``directory`` serve (an eval's base as well).
ROOT = "file:///"


def _relative_path(specifier: str, referrer: str | None) -> str | None:
    """The root-relative path ``specifier`` names (``a/b.js``), or None for one that names nothing
    under the root (another scheme). ``..`` that would climb above the root raises PermissionError."""
    if specifier.startswith(ROOT):
        path = unquote(urlsplit(specifier).path)
    elif "://" in specifier or specifier.startswith(("data:", "blob:", "node:", "npm:", "jsr:")):
        return None
    elif specifier.startswith(("./", "../")):  # relative to the referrer (the loader resolved most already)
        base = unquote(urlsplit(referrer).path) if referrer and referrer.startswith(ROOT) else "/"
        path = posixpath.join(posixpath.dirname(base), specifier)
    else:  # a bare name ("lodash", "lib/x.js") or a root-absolute path
        path = "/" + specifier.lstrip("/")
    parts: list[str] = []
    for part in path.split("/"):
        if part == "..":
            if not parts:
                raise PermissionError(f"the import {specifier!r} climbs out of the module root")
            parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return "/".join(parts)


def from_dict(modules: Mapping[str, str | Module]) -> Resolver:
    """A resolver of virtual modules: ``{"main.ts": "...", "lib/util.js": "...", "data.json": "{...}"}``.

    A key is a path under the root ``file:///`` (a bare specifier like ``"lodash"`` is one too); its
    module's URL is ``file:///<key>`` and its kind follows the extension (or give a ``Module``)."""
    table: dict[str, Module] = {}
    for key, value in modules.items():
        path = _relative_path(key, None)
        if path is None or not path:
            raise ValueError(f"a module key is a path under the root, not {key!r}")
        if isinstance(value, Module):
            table[path] = value
        elif isinstance(value, str):
            table[path] = Module(value, ROOT + path)
        else:
            raise TypeError(f"module {key!r}: a source str or a client.Module, not {type(value).__name__}")

    async def resolve(specifier: str, referrer: str | None) -> Module | None:
        path = _relative_path(specifier, referrer)
        return None if path is None else table.get(path)

    return resolve


def directory(root: str | os.PathLike[str]) -> Resolver:
    """A resolver that serves the files under ``root``, read-only, as ``file:///<path under root>``.

    It refuses (PermissionError, logged on the host; the guest sees a module-not-found error) a
    specifier whose ``..`` climbs out of the root, an absolute filesystem path outside it, and a file
    or directory that is a symlink leading out of it. A missing file is None. The kind follows the
    extension (.ts/.tsx/.mts/.cts TypeScript, .json JSON, else JavaScript)."""
    base = Path(root).resolve(strict=True)
    if not base.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")

    def read(specifier: str, referrer: str | None) -> Module | None:
        if specifier.startswith("/") and not specifier.startswith("//"):
            inside = Path(specifier).resolve()  # an absolute filesystem path: only if it is under the root
            if inside != base and base not in inside.parents:
                raise PermissionError(f"the import {specifier!r} is an absolute path outside the module root")
            specifier = inside.relative_to(base).as_posix()
        path = _relative_path(specifier, referrer)
        if path is None:
            return None
        target = (base / path).resolve()  # follows every symlink on the way
        if target != base and base not in target.parents:
            raise PermissionError(f"the import {specifier!r} leads out of the module root (a symlink)")
        if not target.is_file():
            return None
        source = target.read_text()
        return Module(source, ROOT + path)

    async def resolve(specifier: str, referrer: str | None) -> Module | None:
        return await asyncio.to_thread(read, specifier, referrer)

    return resolve
