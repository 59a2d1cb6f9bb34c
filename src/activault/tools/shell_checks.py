"""The shell's checks of a folder's files: `filecount` (files and megabatches per subfolder, the
folders that differ) and `sizecheck` (megabatch sizes, the odd ones and each machine's partial last
file). Each yields its lines as it finds them; the shell prints them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from activault.errors import ActivaultError
from activault.storage import Entry, Store
from activault.storage.base import join
from activault.tools.inspection import printable
from activault.units import human_bytes
from activault.vault.megabatch import megabatch_files
from activault.vault.records import parse_file_name, read_metadata


def megabatch_sizes(entries: list[Entry]) -> tuple[int | None, list[tuple[str, int, str]]]:
    """The common size of megabatches and those that differ: (name, size, why)."""
    mb = megabatch_files(entries)
    if not mb:
        return None, []
    common = Counter(mb.values()).most_common(1)[0][0]
    last: dict[int, str] = {}
    for n in mb:
        p = parse_file_name(n)
        if p:
            last[p[0]] = max(last.get(p[0], n), n)
    odd = []
    for n, s in mb.items():
        if s == common:
            continue
        p = parse_file_name(n)
        partial = s < common and p is not None and last.get(p[0]) == n
        odd.append((n, s, "last file of its machine (partial)" if partial else "odd size"))
    return common, odd


def filecount(store: Store, cwd: str, dirs: list[str], files: list[Entry]) -> Iterator[str]:
    """`filecount`'s lines: files and megabatches per subfolder of `cwd`, flagging folders that differ."""
    if not dirs:
        yield f"no subfolders; {len(files)} files here"
        return
    counts: dict[str, tuple[int, int, set[str]]] = {}
    for d in dirs:
        entries = store.list(join(cwd, d) + "/")
        names = set(megabatch_files(entries))
        counts[d] = (len(entries), len(names), names)
    compared = {d: c for d, c in counts.items() if c[1]}
    common = Counter(c[1] for c in compared.values()).most_common(1)[0][0] if compared else 0
    union = set().union(*(c[2] for c in compared.values())) if compared else set()
    for d, (n_all, n_mb, names) in counts.items():
        line = f"{printable(d) + '/':<40} {n_all:>6} files  {n_mb:>6} megabatches"
        if d in compared and (n_mb != common or names != union):
            missing = sorted(union - names)
            line += f"  ❌ differs (expected {common})"
            if missing:
                line += f"; missing {', '.join(map(printable, missing[:3]))}" + (" ..." if len(missing) > 3 else "")
        yield line


def sizecheck(store: Store, cwd: str, dirs: list[str], files: list[Entry]) -> Iterator[str]:
    """`sizecheck`'s lines: megabatch sizes in `cwd` and one level down, flagging odd sizes."""
    folders = [(cwd, files)] + [(join(cwd, d), store.list_dir(join(cwd, d))[1]) for d in dirs]
    found = False
    for key, entries in folders:
        common, odd = megabatch_sizes(entries)
        if common is None:
            continue
        found = True
        n = len(megabatch_files(entries))
        where = printable(key[len(cwd) :].strip("/") or ".")
        try:
            meta = read_metadata(store, key)
        except ActivaultError:
            meta = None
        codec = meta.compression.get("codec", "none") if meta else "none"
        if codec != "none":  # compressed files differ in size by nature
            sizes = megabatch_files(entries).values()
            yield (
                f"{where + '/':<40} {n:>6} megabatches of {human_bytes(min(sizes))} to {human_bytes(max(sizes))} "
                f"({codec}-compressed: sizes vary; `activault verify` checks them)"
            )
            continue
        yield f"{where + '/':<40} {n:>6} megabatches of {human_bytes(common)}" + (
            "" if not odd else f"  ({len(odd)} differ)"
        )
        for name, size, why in odd:
            mark = "⚠️ " if why.startswith("last") else "❌"
            yield f"    {mark} {printable(name)}  {human_bytes(size)}  {why}"
    if not found:
        yield "no megabatches here or one level down"
