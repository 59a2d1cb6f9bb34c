"""`activault shell` (alias `activault s3`): an interactive shell over a store (S3 bucket, prefix, or local folder).

Navigation by name or listing number (`#3`: a bare `3` is always a name), `cat`, `rm` with
confirmation, `filecount`, `sizecheck`, `inspect`; readline history across sessions; `> file` after a
command writes its output there. Names holding control characters are printed escaped (repr) and
accepted in that form. Every store access goes through `Store`; a bad command prints a one-line hint,
never a traceback. The checks `filecount` and `sizecheck` print are `shell_checks.py`'s.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from activault.errors import ActivaultError, ConfigError
from activault.storage import Entry, Store, open_store
from activault.storage.base import join
from activault.storage.uri import is_s3
from activault.tools.inspection import Tokenizers, foreign, inspect_file, parent, printable
from activault.tools.output import unwritable, write_whole
from activault.tools.shell_checks import filecount, sizecheck
from activault.units import human_bytes
from activault.vault.megabatch import is_megabatch

CAT_LIMIT = 1 << 20  # `cat` refuses files above 1 MB: megabatches are for `inspect`
HELP = {  # command: (usage, what it does)
    "ls": ("ls", "list folders (numbered #0, #1, ... first) and files with sizes"),
    "cd": ("cd #N|NAME|..|A/B", "enter a folder by number, name or path; bare `cd` goes to the root"),
    "cat": ("cat #N|NAME", "print a small text or JSON file"),
    "rm": ("rm #N|NAME ...", "delete files or folders (asks first)"),
    "filecount": ("filecount", "files per subfolder, flagging folders that differ"),
    "sizecheck": ("sizecheck", "megabatch sizes here and one level down, flagging odd sizes"),
    "inspect": ("inspect #N|NAME", "a megabatch: model, shapes, NaN/Inf checks, range, rows as text"),
    "help": ("help", "this list"),
    "exit": ("exit", "leave (or Ctrl-D)"),
}
_NOT_READ = {  # why an Entry of this kind is listed but never read
    "link": "is a symbolic link; the shell never follows links (`rm` deletes the link, not its target)",
    "special": "is a FIFO, device or socket, not a file; it is never read",
    "badkey": "is a foreign object (its key has an empty, `.` or `..` part; activault never writes one); `rm` it",
}
_MARK = {"link": "link, not followed", "special": "FIFO/device, not read", "badkey": "foreign key"}
_REDIRECT = re.compile(r"^(.*?)\s*>\s*(\S+)\s*$")
# `#3` is entry 3 of the listing, always; any other word is a name, so a folder named `3` is `3`
# and `rm` never takes a number for a name or a name for a number.
_INDEX = re.compile(r"#(\d+)")


def _escaped(name: str) -> set[str]:
    """How a name that is printed escaped can be typed: as printed, or without its quotes."""
    return set() if name.isprintable() else {printable(name), repr(name)[1:-1]}


class UsageError(ActivaultError):
    """A bad command or argument in the shell: printed as a one-line hint."""


def history_path() -> Path:
    return Path(os.environ.get("ACTIVAULT_HISTORY") or Path.home() / ".activault_history").expanduser()


def default_root(env: dict[str, str] | None = None) -> str:
    env = dict(os.environ if env is None else env)
    bucket = env.get("S3_BUCKET_NAME")
    if not bucket:
        raise ConfigError(
            "S3_BUCKET_NAME is not set; export it, or pass --root URI (s3://BUCKET[/PREFIX] or a local folder)"
        )
    return bucket if is_s3(bucket) else f"s3://{bucket}"


class Shell:
    """The shell's state (store, folder, last listing) and its commands."""

    def __init__(self, store: Store, out: IO[str] | None = None, ask: Callable[[str], str] = input):
        self.store = store
        self.cwd = ""
        self.out: IO[str] = out or sys.stdout
        self.ask = ask
        self.tokenizers = Tokenizers()
        self._listing: tuple[list[str], list[Entry]] | None = None
        self.commands: dict[str, Callable[[list[str]], None]] = {
            "ls": self.do_ls,
            "cd": self.do_cd,
            "cat": self.do_cat,
            "rm": self.do_rm,
            "filecount": self.do_filecount,
            "sizecheck": self.do_sizecheck,
            "inspect": self.do_inspect,
            "help": self.do_help,
            "?": self.do_help,
        }

    @property
    def prompt(self) -> str:
        return f"{printable(self.store.url(self.cwd))}> "

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    # ---- dispatch ----

    def run_line(self, line: str) -> bool:
        """Run one command line; False when the shell should exit."""
        line = line.strip()
        if not line:
            return True
        target = None
        m = _REDIRECT.match(line)
        if m:
            line, target = m.group(1), m.group(2)
        try:
            words = shlex.split(line)
        except ValueError as e:
            self.say(f"cannot parse the line ({e}); type `help` for the commands")
            return True
        if not words:
            self.say("nothing to run before '>'; write e.g. `ls > listing.txt`")
            return True
        cmd, args = words[0], words[1:]
        if cmd in ("exit", "quit", "q"):
            return False
        func = self.commands.get(cmd)
        if func is None:
            self.say(f"unknown command {cmd!r}; type `help` for the commands")
            return True
        saved = self.out
        if target:
            if (why := unwritable(target)) is not None:
                self.say(f"cannot write {target}: {why}; nothing run")
                return True
            self.out = io.StringIO()
        ok = False
        try:
            func(args)
            ok = True
        except KeyboardInterrupt:
            print("\ncancelled", file=saved, flush=True)
        except ActivaultError as e:
            print(str(e).splitlines()[0], file=saved, flush=True)
        except OSError as e:
            print(f"{cmd}: {e.strerror or e}", file=saved, flush=True)
        except Exception as e:  # noqa: BLE001 - a shell never shows a traceback
            print(f"{cmd} failed: {type(e).__name__}: {e}", file=saved, flush=True)
        finally:
            out, self.out = self.out, saved
        if isinstance(out, io.StringIO) and target:
            self.say(self._save_output(target, out.getvalue()) if ok else f"{target} left unchanged")
        return True

    @staticmethod
    def _save_output(target: str, text: str) -> str:
        """Write a command's output to `target`; the one line that says how it went."""
        try:
            write_whole(target, text)
        except OSError as e:
            return f"cannot write {target}: {e.strerror or e}; {target} left unchanged"
        return f"output written to {target}"

    # ---- helpers ----

    def listing(self) -> tuple[list[str], list[Entry]]:
        if self._listing is None:
            self._listing = self.store.list_dir(self.cwd)
        return self._listing

    def name(self, e: Entry) -> str:
        """An entry's name as listed: its key below the current folder (more than one part for a
        key with a `..` segment on S3)."""
        return e.key[len(self.cwd) :].removeprefix("/") if self.cwd else e.key

    def pick(self, arg: str) -> tuple[str, str]:
        """(kind, key) of `#N` (entry N of the listing) or a name here, as stored or as printed
        (escaped); kind is 'dir' or an `Entry.kind`."""
        dirs, files = self.listing()
        if m := _INDEX.fullmatch(arg):
            i, total = int(m.group(1)), len(dirs) + len(files)
            if i < len(dirs):
                return "dir", join(self.cwd, dirs[i])
            if i < total:
                e = files[i - len(dirs)]
                return e.kind, e.key
            raise UsageError(
                f"no entry #{i} here (#0..#{total - 1}); type `ls` to see the numbers"
                if total
                else f"no entry #{i}: this folder is empty"
            )
        here = [("dir", join(self.cwd, d), d) for d in dirs] + [(e.kind, e.key, self.name(e)) for e in files]
        typed = {arg, arg.rstrip("/") or arg}
        # As stored first; then as printed, for a name holding a newline (typed inside quotes or not).
        found = [h for h in here if h[2] in typed] or [h for h in here if typed & _escaped(h[2])]
        if found:
            return found[0][0], found[0][1]
        if arg.isdigit():
            raise UsageError(f"nothing here is named {arg!r}; entry {arg} of the listing is #{arg}")
        raise UsageError(f"{arg!r} is not here; type `ls` to see the folders and files")

    def readable(self, kind: str, key: str, then: str) -> None:
        """UsageError unless `key` is a file that can be read (not a folder, link, device or bad key)."""
        name = printable(key.rsplit("/", 1)[-1])
        if kind == "dir":
            raise UsageError(f"{name} is a folder; {then}")
        if kind != "file":
            raise UsageError(f"{name} {_NOT_READ[kind]}")

    def confirm(self, question: str) -> str:
        try:
            return self.ask(question)
        except EOFError:
            return ""

    def need(self, args: list[str], usage: str) -> str:
        if len(args) != 1:
            raise UsageError(f"usage: {usage}")
        return args[0]

    # ---- commands ----

    def do_ls(self, args: list[str]) -> None:
        self._listing = None
        dirs, files = self.listing()
        if not dirs and not files:
            self.say("(empty)")
        for i, d in enumerate(dirs):
            self.say(f"{f'#{i}':>5}  {printable(d)}/")
        for i, e in enumerate(files, len(dirs)):
            what = human_bytes(e.size) if e.kind == "file" else _MARK[e.kind]
            name = printable(self.name(e)) + ("@" if e.kind == "link" else "")
            odd = f"  ⚠️ foreign: {why}" if e.kind == "file" and (why := foreign(e)) else ""
            self.say(f"{f'#{i}':>5}  {name:<40} {what:>10}{odd}")

    def do_cd(self, args: list[str]) -> None:
        if not args:
            self.cwd = ""
        elif len(args) > 1:
            raise UsageError("usage: cd #N|NAME|..")
        elif args[0] == "..":
            self.cwd = parent(self.cwd)
        else:
            self.cwd = self._walk(args[0])
        self._listing = None

    def _walk(self, path: str) -> str:
        """The folder that `path` (`#N`, a name, or those joined by `/`; `/` first = from the root) names."""
        start, self.cwd = self.cwd, "" if path.startswith("/") else self.cwd
        try:
            for part in [p for p in path.split("/") if p and p != "."]:
                if part == "..":
                    self.cwd = parent(self.cwd)
                else:
                    kind, key = self.pick(part)
                    name = printable(key.rsplit("/", 1)[-1])
                    if kind == "file":
                        raise UsageError(f"{name} is a file, not a folder; use `cat` or `inspect`")
                    if kind != "dir":
                        raise UsageError(f"{name} {_NOT_READ[kind]}")
                    self.cwd = key
                self._listing = None
            return self.cwd
        finally:
            self.cwd, self._listing = start, None

    def do_cat(self, args: list[str]) -> None:
        kind, key = self.pick(self.need(args, "cat #N|NAME"))
        self.readable(kind, key, "`cd` into it")
        if is_megabatch(key):
            raise UsageError("that is a megabatch; use `inspect` to look inside it")
        size = self.store.size(key) or 0
        if size > CAT_LIMIT:
            raise UsageError(
                f"{human_bytes(size)} is too large to print; cat shows files up to {human_bytes(CAT_LIMIT)}"
            )
        try:
            text = bytes(self.store.get(key)).decode()
        except UnicodeDecodeError:
            raise UsageError("not a text file") from None
        self.say(text.rstrip("\n"))

    def do_rm(self, args: list[str]) -> None:
        if not args:
            raise UsageError("usage: rm #N|NAME ... (numbers from `ls`)")
        targets = list(dict.fromkeys(self.pick(a) for a in args))  # `rm #0 run`: one target, once
        here = {e.key: e for e in self.listing()[1]}
        entries: list[Entry] = []
        for kind, key in targets:
            # A link is deleted itself (the store never follows it), like a file.
            entries += self.store.list(key + "/") if kind == "dir" else [here[key]]
        names = ", ".join(printable(k.rsplit("/", 1)[-1]) + ("/" if kind == "dir" else "") for kind, k in targets)
        answer = self.confirm(
            f"delete {names} ({len(entries)} files, {human_bytes(sum(e.size for e in entries))})? [y/N] "
        )
        if answer.strip().lower() not in ("y", "yes"):
            self.say("nothing deleted")
            return
        self._listing = None
        for i, e in enumerate(entries, 1):
            self.store.delete(e.key)
            if i % 10 == 0 or i == len(entries):
                print(f"\rdeleted {i}/{len(entries)}", end="", file=sys.stdout, flush=True)
        print(file=sys.stdout)
        self.say(f"deleted {len(entries)} files")

    def do_filecount(self, args: list[str]) -> None:
        for line in filecount(self.store, self.cwd, *self.listing()):
            self.say(line)

    def do_sizecheck(self, args: list[str]) -> None:
        for line in sizecheck(self.store, self.cwd, *self.listing()):
            self.say(line)

    def do_inspect(self, args: list[str]) -> None:
        kind, key = self.pick(self.need(args, "inspect #N|NAME"))
        self.readable(kind, key, "`cd` into it and inspect a megabatch")
        insp = inspect_file(self.store, key, self.tokenizers)
        for line in insp.lines():
            self.say(line)
        if not insp.rows:
            return
        last = len(insp.rows) - 1
        while True:
            try:
                answer = self.ask(f"\nEnter row number (0-{last}) to view full text, or 'q' to quit: ").strip()
            except EOFError:
                print(file=sys.stdout)
                return
            if answer in ("", "q", "quit", "exit"):
                return
            if not answer.isdigit() or int(answer) > last:
                print(f"enter a number from 0 to {last}, or q", file=sys.stdout, flush=True)
                continue
            self.say(f"Row {answer}:\n{insp.row_text(int(answer))}")

    def do_help(self, args: list[str]) -> None:
        self.say("commands (append `> FILE` to write the output to a file):")
        for usage, text in HELP.values():
            self.say(f"  {usage:<20} {text}")
        self.say(
            "#N is entry N of `ls` (an entry named #N is reached by its own number); any other word is a name, "
            "so `3` names a folder called 3. Names with control characters are shown and typed escaped, "
            "e.g. 'a\\nb'."
        )


def _completer(shell: Shell) -> Callable[[str, int], str | None]:
    def complete(text: str, state: int) -> str | None:
        import readline

        line = readline.get_line_buffer()
        if " " not in line.lstrip():
            options = [c for c in [*HELP, "exit"] if c.startswith(text)]
        else:
            try:
                dirs, files = shell.listing()
            except ActivaultError:
                return None
            names = [printable(d) + "/" for d in dirs] + [printable(shell.name(e)) for e in files]
            options = [n for n in names if n.startswith(text)]
        return options[state] if state < len(options) else None

    return complete


def _setup_readline(shell: Shell) -> Any:
    try:
        import readline
    except ImportError:  # e.g. Windows without pyreadline: no history, still a shell
        return None
    path = history_path()
    try:
        readline.read_history_file(path)
    except (FileNotFoundError, OSError):
        pass
    readline.set_history_length(2000)
    readline.set_completer_delims(" \t")
    readline.set_completer(_completer(shell))
    readline.parse_and_bind("tab: complete")
    return readline


def _save_history(readline: Any) -> None:
    if readline is None:
        return
    path = history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(path)
    except OSError:
        pass


def run_shell(root: str | None = None) -> int:
    """Open the shell on `root` (default: s3://$S3_BUCKET_NAME) and run it until exit or Ctrl-D."""
    uri = str(root or default_root())
    store = open_store(uri)
    if is_s3(uri):
        store.check()
    elif not Path(store.uri).is_dir():
        raise ConfigError(f"{store.uri} is not a folder; pass --root an existing local store or s3://BUCKET[/PREFIX]")
    shell = Shell(store)
    rl = _setup_readline(shell)
    print(f"activault shell on {store.uri}; type `help` for the commands, Ctrl-D to leave", flush=True)
    try:
        while True:
            try:
                line = input(shell.prompt)
            except KeyboardInterrupt:
                print("^C", flush=True)
                continue
            except EOFError:
                print(flush=True)
                break
            if not shell.run_line(line):
                break
            _save_history(rl)
    finally:
        _save_history(rl)
    return 0
