"""`activault s3`: the interactive shell driven through a pseudo-terminal, on a local store and on moto S3."""

from __future__ import annotations

import io
import os
import re
import sys
from pathlib import Path

import pexpect
import pytest
from test_inspection import retokenize

from activault.storage import LocalStore, Store, open_store
from activault.storage.s3 import S3Store
from activault.tools.shell import Shell
from support.synth import (
    SynthRun,
    create_bucket,
    s3_env,
    write_synthetic_run,
)

HOOKS = ["models.layers.0.post", "models.layers.1.mlp.post"]
TIMEOUT = 30


def spawn(args: list[str], env: dict[str, str], cwd: Path) -> pexpect.spawn:
    full = {**os.environ, **env, "TERM": "dumb", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "activault", "s3", *args],
        env=full,
        cwd=str(cwd),
        encoding="utf-8",
        timeout=TIMEOUT,
        dimensions=(50, 250),
    )
    return child


class Session:
    """A shell child and the prompt of the folder it is in."""

    def __init__(self, child: pexpect.spawn, root: str):
        self.child, self.root = child, root.rstrip("/")

    def prompt(self, where: str = "") -> str:
        return f"{self.root}/{where}> " if where else f"{self.root}> "

    def run(self, line: str, where: str = "") -> str:
        """Send a command and return what it printed before the next prompt (at `where`)."""
        self.child.sendline(line)
        self.child.expect_exact(self.prompt(where))
        out = self.child.before or ""
        # The terminal echoes the line first.
        return out.split("\n", 1)[1] if "\n" in out else ""

    def close(self) -> None:
        if self.child.isalive():
            self.child.sendline("exit")
            self.child.expect(pexpect.EOF)


@pytest.fixture
def local(tmp_path: Path) -> tuple[LocalStore, SynthRun]:
    store = LocalStore(tmp_path / "vault", fsync=False)
    return store, write_synthetic_run(store, "run", HOOKS, machines=2, files=2)


@pytest.fixture
def history(tmp_path: Path) -> Path:
    return tmp_path / "hist" / "history"


def open_shell(
    root: str, tmp_path: Path, history: Path, env: dict[str, str] | None = None, args: list[str] | None = None
) -> Session:
    child = spawn(
        ["--root", root] if args is None else args, {"ACTIVAULT_HISTORY": str(history), **(env or {})}, tmp_path
    )
    s = Session(child, root)
    child.expect_exact(s.prompt())
    return s


def test_navigation_listing_cat_help_and_history(local, tmp_path: Path, history: Path) -> None:
    store, run = local
    root = str(store.root)
    s = open_shell(root, tmp_path, history)
    out = s.run("ls")
    assert re.search(r"^\s+#0\s+run/\s*$", out, re.M)
    assert s.run("cd #0", "run") == ""
    out = s.run("ls", "run")
    # folders first (numbered), then files with sizes
    assert re.search(rf"^\s+#0\s+{re.escape(HOOKS[0])}/", out, re.M) and re.search(r"^\s+#2\s+progress/", out, re.M)
    assert re.search(r"^\s+#3\s+cfg\.json\s+\d+ B", out, re.M)
    out = s.run("cat #3", "run")
    assert '"tokenizer": "synthetic"' in out
    s.run(f"cd {HOOKS[1]}", f"run/{HOOKS[1]}")
    out = s.run("ls", f"run/{HOOKS[1]}")
    assert all(n in out for n in run.names) and re.search(r"\d\.\d KB", out)
    s.run("cd ..", "run")
    s.run("cd #0", f"run/{HOOKS[0]}")
    s.run("cd", "")
    s.run(f"cd /run/{HOOKS[0]}", f"run/{HOOKS[0]}")
    s.run(f"cd ../{HOOKS[1]}", f"run/{HOOKS[1]}")
    assert "is a file" in s.run("cd ../cfg.json/x", f"run/{HOOKS[1]}")
    s.run("cd /", "")
    out = s.run("help")
    assert all(c in out for c in ("ls", "cd", "cat", "rm", "filecount", "sizecheck", "inspect", "exit"))
    s.close()
    assert "cd #0" in history.read_text() and "help" in history.read_text()
    # history is read back by the next session: Ctrl-P (previous line) recalls earlier commands
    s = open_shell(root, tmp_path, history)
    s.child.send("\x10\x10\r")  # Ctrl-P twice: past `exit` to `help`
    s.child.expect_exact(s.prompt())
    assert "help" in (s.child.before or "") and "commands" in (s.child.before or "")
    s.close()


def test_bad_input_prints_one_line_hints(local, tmp_path: Path, history: Path) -> None:
    store, run = local
    s = open_shell(str(store.root), tmp_path, history)
    assert "unknown command 'frobnicate'" in s.run("frobnicate")
    assert "no entry #7 here" in s.run("cd #7")
    s.run("cd run", "run")
    out = s.run("cd #3", "run")
    assert "cfg.json is a file, not a folder" in out
    out = s.run("rm", "run")
    assert "usage: rm" in out
    assert "is not here" in s.run("cat nothing.json", "run")
    assert "is a folder" in s.run("inspect #0", "run")
    assert "usage: inspect" in s.run("inspect", "run")
    for out in (s.run(c, "run") for c in ("frobnicate", "cd #7", "cd 7", "cd #3", "rm", "cat #1 #2")):
        assert "Traceback" not in out and len(out.strip().splitlines()) == 1
    s.child.sendintr()  # Ctrl-C at the prompt: a fresh prompt, still running
    s.child.expect_exact(s.prompt("run"))
    s.child.sendeof()  # Ctrl-D leaves
    s.child.expect(pexpect.EOF)
    s.child.close()
    assert s.child.exitstatus == 0


def test_redirect_filecount_and_sizecheck(local, tmp_path: Path, history: Path) -> None:
    store, run = local
    store.delete(f"run/{HOOKS[1]}/{run.names[1]}")  # a hook with a missing file
    key = f"run/{HOOKS[0]}/{run.names[2]}"
    store.put(key, bytes(store.get(key)) + b"extra")  # an odd size
    s = open_shell(str(store.root), tmp_path, history)
    s.run("cd #0", "run")
    out = s.run("filecount", "run")
    line1 = next(ln for ln in out.splitlines() if HOOKS[1] in ln)
    assert "3 megabatches" in line1 and "❌" in line1 and run.names[1] in line1
    assert "❌" not in next(ln for ln in out.splitlines() if HOOKS[0] in ln)
    out = s.run("sizecheck", "run")
    assert re.search(rf"❌ {run.names[2]}.*odd size", out)
    assert f"{HOOKS[1]}/" in out and "4 megabatches" in out
    out = s.run("ls > listing.txt", "run")
    assert "output written to listing.txt" in out and "cfg.json" not in out
    text = (tmp_path / "listing.txt").read_text()
    assert "cfg.json" in text and HOOKS[0] in text
    s.run("filecount > counts.txt", "run")
    assert "❌" in (tmp_path / "counts.txt").read_text()
    s.close()


def test_inspect_in_the_shell_shows_rows_and_full_text(local, tmp_path: Path, history: Path, tiny_model_dir) -> None:
    from transformers import AutoTokenizer

    store, run = local
    model_dir = tiny_model_dir("llama")
    rows = retokenize(store, run, model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    s = open_shell(str(store.root), tmp_path, history)
    s.run("cd run", "run")
    s.run(f"cd {HOOKS[0]}", f"run/{HOOKS[0]}")
    s.child.sendline(f"inspect {run.names[0]}")
    s.child.expect_exact("to view full text, or 'q' to quit: ")
    out = s.child.before or ""
    for text in ("Model: tiny", "states: [4, 16, 8] bfloat16", "No NaNs: ✅", "No Infs: ✅", "Row 3: "):
        assert text in out
    assert str(tok.decode(rows[0]))[:30].replace("\n", "\\n") in out
    s.child.sendline("2")
    s.child.expect_exact("'q' to quit: ")
    assert str(tok.decode(rows[2])).splitlines()[0] in (s.child.before or "")
    s.child.sendline("99")
    s.child.expect_exact("'q' to quit: ")
    assert "enter a number from 0 to 3" in (s.child.before or "")
    s.child.sendline("q")
    s.child.expect_exact(s.prompt(f"run/{HOOKS[0]}"))
    s.child.sendline("inspect #1")
    s.child.expect_exact("'q' to quit: ")
    s.child.sendintr()  # Ctrl-C cancels the command, not the shell
    s.child.expect_exact(s.prompt(f"run/{HOOKS[0]}"))
    assert "cancelled" in (s.child.before or "")
    s.close()


def test_rm_asks_first_then_deletes(local, tmp_path: Path, history: Path) -> None:
    store, run = local
    s = open_shell(str(store.root), tmp_path, history)
    s.run("cd run", "run")
    s.run(f"cd {HOOKS[0]}", f"run/{HOOKS[0]}")
    s.child.sendline("rm #0 #1")
    s.child.expect(r"delete .*\(2 files, .*\)\? \[y/N\] ")
    s.child.sendline("n")
    s.child.expect_exact(s.prompt(f"run/{HOOKS[0]}"))
    assert "nothing deleted" in (s.child.before or "")
    assert store.exists(f"run/{HOOKS[0]}/{run.names[0]}")
    s.child.sendline("rm #0 #1")
    s.child.expect_exact("[y/N] ")
    s.child.sendline("y")
    s.child.expect_exact(s.prompt(f"run/{HOOKS[0]}"))
    assert "deleted 2/2" in (s.child.before or "")
    assert not store.exists(f"run/{HOOKS[0]}/{run.names[0]}") and store.exists(f"run/{HOOKS[0]}/{run.names[2]}")
    s.run("cd ..", "run")
    s.child.sendline(f"rm {HOOKS[1]}")  # a folder
    s.child.expect_exact("[y/N] ")
    s.child.sendline("yes")
    s.child.expect_exact(s.prompt("run"))
    assert not store.list(f"run/{HOOKS[1]}/")
    assert f"{HOOKS[1]}/" not in s.run("ls", "run")
    s.close()


def test_links_fifos_and_devices_reach_nothing_outside_the_root(local, tmp_path: Path, history: Path) -> None:
    store, run = local
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.json").write_text('{"secret": 1}')
    hook = store.root / "run" / HOOKS[0]
    os.symlink(outside, hook / "out")  # a folder outside the root
    os.symlink(outside / "secret.json", hook / "file.json")  # a file outside
    os.symlink(store.root / "run", hook / "loop")  # the run itself
    os.mkfifo(hook / "fifo")
    before = {e.key for e in store.list()}
    s = open_shell(str(store.root), tmp_path, history)
    s.run(f"cd run/{HOOKS[0]}", f"run/{HOOKS[0]}")
    out = s.run("ls", f"run/{HOOKS[0]}")
    assert re.search(r"out@\s+link, not followed", out) and re.search(r"fifo\s+FIFO/device", out)
    for line, why in [
        ("cat file.json", "symbolic link"),
        ("cat fifo", "FIFO"),
        ("cd out", "symbolic link"),
        ("cd loop", "symbolic link"),
        ("inspect loop", "symbolic link"),
        ("cd out/x", "symbolic link"),
    ]:
        got = s.run(line, f"run/{HOOKS[0]}")
        assert why in got and "secret" not in got and len(got.strip().splitlines()) == 1, (line, got)
    s.child.sendline("rm out loop file.json fifo")
    s.child.expect_exact("(4 files, 0 B)? [y/N] ")
    s.child.sendline("y")
    s.child.expect_exact(s.prompt(f"run/{HOOKS[0]}"))
    assert (outside / "secret.json").read_text() == '{"secret": 1}'
    assert {e.key for e in store.list()} == before - {
        f"run/{HOOKS[0]}/{n}" for n in ("out", "loop", "file.json", "fifo")
    }
    # A folder holding a link to the run: `rm` of the folder deletes the link, not the run.
    os.symlink(store.root / "run", store.root / "run" / HOOKS[1] / "loop")
    s.run("cd ..", "run")
    s.child.sendline(f"rm {HOOKS[1]}")
    s.child.expect_exact("[y/N] ")
    s.child.sendline("y")
    s.child.expect_exact(s.prompt("run"))
    assert store.exists("run/cfg.json") and all(store.exists(f"run/{HOOKS[0]}/{n}") for n in run.names)
    assert store.list(f"run/{HOOKS[1]}/") == [] and (outside / "secret.json").exists()
    s.close()


def test_redirect_keeps_the_target_when_a_command_fails(local, tmp_path: Path, history: Path) -> None:
    store, _ = local
    s = open_shell(str(store.root), tmp_path, history)
    assert "output written to out.txt" in s.run("ls > out.txt")
    before = (tmp_path / "out.txt").read_text()
    assert "run/" in before
    out = s.run("cat nothing.json > out.txt")
    assert "is not here" in out and "out.txt left unchanged" in out and "output written" not in out
    assert (tmp_path / "out.txt").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp left
    out = s.run("ls > /dev/full")  # the write fails: one line, and the shell goes on
    assert out.strip().splitlines() == ["cannot write /dev/full: No space left on device; /dev/full left unchanged"]
    assert "output written to /dev/null" in s.run("ls > /dev/null")
    out = s.run("ls > no/such/folder.txt")
    assert "cannot write no/such/folder.txt" in out and "nothing run" in out
    assert re.search(r"^\s+#0\s+run/", s.run("ls"), re.M)
    s.close()


def test_missing_root_and_bucket_are_one_line_errors(tmp_path: Path, history: Path) -> None:
    child = spawn(["--root", str(tmp_path / "nope")], {"ACTIVAULT_HISTORY": str(history)}, tmp_path)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2 and "is not a folder" in (child.before or "")
    env = {k: "" for k in ("S3_BUCKET_NAME",)}
    child = spawn([], {"ACTIVAULT_HISTORY": str(history), **env}, tmp_path)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2 and "S3_BUCKET_NAME is not set" in (child.before or "")
    assert "Traceback" not in (child.before or "")


# ---- names and numbers, in process, on both stores ----


@pytest.fixture(params=["local", "moto"])
def bare(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """An empty store of each kind."""
    if request.param == "local":
        return LocalStore(tmp_path / "vault", fsync=False)
    url, bucket = request.getfixturevalue("moto_url"), request.getfixturevalue("moto_bucket")
    return S3Store(f"s3://{bucket}", env=s3_env(url))


def in_process(store: Store, answers: list[str] | None = None) -> tuple[Shell, io.StringIO, list[str]]:
    """A Shell writing to a buffer; its questions are recorded and answered from `answers`."""
    out, asked, left = io.StringIO(), [], list(answers or [])

    def ask(question: str) -> str:
        asked.append(question)
        return left.pop(0)

    return Shell(store, out=out, ask=ask), out, asked


def said(shell: Shell, out: io.StringIO, line: str) -> str:
    """What one command line printed (to the shell's output; errors go there too)."""
    out.seek(0), out.truncate()
    shell.run_line(line)
    return out.getvalue()


def test_a_folder_named_3_is_reached_by_name_and_entry_3_only_as_hash_3(bare: Store, capsys) -> None:
    """`3` used to mean entry 3 of the listing even where a folder is named 3: `rm 3` deleted folder b."""
    for folder in ("1", "3", "a", "b"):  # listed #0 1/, #1 3/, #2 a/, #3 b/
        bare.put(f"{folder}/x.json", folder.encode())
    shell, out, asked = in_process(bare, ["y"])
    assert [ln.split() for ln in said(shell, out, "ls").splitlines()] == [
        ["#0", "1/"],
        ["#1", "3/"],
        ["#2", "a/"],
        ["#3", "b/"],
    ]
    assert said(shell, out, "cd 3") == "" and shell.cwd == "3" and said(shell, out, "cat x.json").strip() == "3"
    assert said(shell, out, "cd ..") == "" and said(shell, out, "cd #3") == "" and shell.cwd == "b"
    said(shell, out, "cd")
    said(shell, out, "rm 3")
    assert asked == ["delete 3/ (1 files, 1 B)? [y/N] "]
    assert not bare.exists("3/x.json") and all(bare.exists(f"{f}/x.json") for f in ("1", "a", "b"))
    # A number that names nothing is never taken for an entry: refused, naming the form that is.
    for line in ("rm 2", "cd 2", "cat 2", "inspect 2"):
        assert said(shell, out, line).strip() == "nothing here is named '2'; entry 2 of the listing is #2"
    assert said(shell, out, "rm #9").strip() == "no entry #9 here (#0..#2); type `ls` to see the numbers"
    assert asked == ["delete 3/ (1 files, 1 B)? [y/N] "] and len(bare.list()) == 3


def test_names_with_control_characters_are_printed_escaped_and_reachable(tmp_path: Path, capsys) -> None:
    """A newline in a name used to split its listing line in two (and an escape sequence reached the
    terminal); printed as repr, the name is typed back in that form. Local only: on S3, object_store
    refuses such keys (and a listing holding ESC is not XML 1.0)."""
    bare = LocalStore(tmp_path / "vault", fsync=False)
    bare.put("a\nb/x.json", b"{}")
    bare.put("run/tab\there.json", b"0123")
    bare.put("run/m\x1b[2J.safetensors", b"")
    shell, out, asked = in_process(bare, ["n", "y"])
    assert said(shell, out, "ls").splitlines() == ["   #0  'a\\nb'/", "   #1  run/"]
    assert said(shell, out, "cd 'a\\nb'") == "" and shell.cwd == "a\nb" and shell.prompt.startswith("'")
    assert "\n" not in shell.prompt and said(shell, out, "cat x.json").strip() == "{}"
    said(shell, out, "cd")
    assert said(shell, out, "cd \"'a\\nb'\"") == "" and shell.cwd == "a\nb"  # as printed, quotes and all
    said(shell, out, "cd /run")
    listing = said(shell, out, "ls")
    assert "\x1b" not in listing and "\t" not in listing and len(listing.splitlines()) == 2, listing
    assert "'m\\x1b[2J.safetensors'" in listing and "'tab\\there.json'" in listing
    assert said(shell, out, "rm 'tab\\there.json' 'm\\x1b[2J.safetensors'").strip() == "nothing deleted"
    assert asked[-1] == "delete 'tab\\there.json', 'm\\x1b[2J.safetensors' (2 files, 4 B)? [y/N] "
    said(shell, out, "cd /")
    counted = said(shell, out, "filecount")
    assert counted.startswith("'a\\nb'/ ") and len(counted.splitlines()) == 2, counted
    said(shell, out, "rm #0")
    assert not bare.exists("a\nb/x.json") and bare.exists("run/tab\there.json")


# ---- S3 (moto) ----


@pytest.fixture
def s3(
    moto_url: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> tuple[Store, SynthRun, dict[str, str]]:
    bucket = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-")
    create_bucket(moto_url, bucket)
    env = s3_env(moto_url)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    store = open_store(f"s3://{bucket}")
    return store, write_synthetic_run(store, "run", HOOKS, machines=1, files=2), {**env, "S3_BUCKET_NAME": bucket}


@pytest.mark.s3
def test_s3_shell_on_the_default_bucket(s3, tmp_path: Path, history: Path) -> None:
    store, run, env = s3
    s = open_shell(store.uri, tmp_path, history, env=env, args=[])  # no --root: s3://$S3_BUCKET_NAME
    assert re.search(r"^\s+#0\s+run/", s.run("ls"), re.M)
    s.run("cd run", "run")
    assert "2 megabatches" in s.run("filecount", "run")
    s.run(f"cd {HOOKS[0]}", f"run/{HOOKS[0]}")
    out = s.run("sizecheck", f"run/{HOOKS[0]}")
    assert "2 megabatches" in out and "❌" not in out
    out = s.run("cat metadata.json", f"run/{HOOKS[0]}")
    assert '"d_model": 8' in out
    s.child.sendline("inspect #0")
    s.child.expect_exact("'q' to quit: ")
    out = s.child.before or ""
    assert "No NaNs: ✅" in out and "states: [4, 16, 8] bfloat16" in out and "showing ids" in out
    s.child.sendline("q")
    s.child.expect_exact(s.prompt(f"run/{HOOKS[0]}"))
    assert "is a file, not a folder" in s.run("cd #0", f"run/{HOOKS[0]}")
    s.close()


@pytest.mark.s3
def test_s3_shell_rm_and_prefix_root(s3, tmp_path: Path, history: Path) -> None:
    store, run, env = s3
    s = open_shell(store.url("run"), tmp_path, history, env=env)
    s.run(f"cd {HOOKS[1]}", HOOKS[1])
    s.child.sendline("rm #0")
    s.child.expect_exact("[y/N] ")
    s.child.sendline("")
    s.child.expect_exact(s.prompt(HOOKS[1]))
    assert store.exists(f"run/{HOOKS[1]}/{run.names[0]}")
    s.child.sendline(f"rm {run.names[0]}")
    s.child.expect_exact("[y/N] ")
    s.child.sendline("y")
    s.child.expect_exact(s.prompt(HOOKS[1]))
    assert not store.exists(f"run/{HOOKS[1]}/{run.names[0]}")
    s.run("cd ..")
    out = s.run("filecount")
    assert "❌" in next(ln for ln in out.splitlines() if HOOKS[1] in ln)
    s.close()
    bad = spawn(["--root", "s3://no-such-bucket-here"], {**env, "ACTIVAULT_HISTORY": str(history)}, tmp_path)
    bad.expect(pexpect.EOF)
    bad.close()
    assert bad.exitstatus == 2 and "does not exist" in (bad.before or "")


@pytest.mark.s3
def test_s3_shell_names_foreign_keys_and_rm_deletes_them(s3, moto_url: str, tmp_path: Path, history: Path) -> None:
    """Keys with `..` or an empty part (object_store refuses them) and a zero-byte megabatch: listed,
    never read, and deleted with the run."""
    import boto3

    store, run, env = s3
    client = boto3.client(
        "s3",
        endpoint_url=moto_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    bucket = store.uri.removeprefix("s3://")
    for key in (f"run/{HOOKS[0]}/../x", f"run/{HOOKS[0]}//y"):
        client.put_object(Bucket=bucket, Key=key, Body=b"odd")
    store.put(f"run/{HOOKS[0]}/m00009-000000.safetensors", b"")
    s = open_shell(store.uri, tmp_path, history, env=env)
    s.run(f"cd run/{HOOKS[0]}", f"run/{HOOKS[0]}")
    out = s.run("ls", f"run/{HOOKS[0]}")
    assert re.search(r"\.\./x\s+foreign key", out) and re.search(r" /y\s+foreign key", out), out
    assert re.search(r"m00009-000000.safetensors\s+0 B  ⚠️ foreign: 0 bytes", out), out
    assert "foreign object" in s.run("cat ../x", f"run/{HOOKS[0]}")
    out = s.run("inspect m00009-000000.safetensors", f"run/{HOOKS[0]}")
    assert "truncated file (0 bytes" in out and len(out.strip().splitlines()) == 1
    s.run("cd /", "")
    s.child.sendline("rm run")
    s.child.expect_exact("[y/N] ")
    s.child.sendline("y")
    s.child.expect_exact(s.prompt())
    assert "(empty)" in s.run("ls")
    assert "Contents" not in client.list_objects_v2(Bucket=bucket)
    s.close()


@pytest.mark.s3
def test_s3_shell_says_it_is_retrying_then_gives_one_line(s3, moto_url: str, tmp_path: Path, history: Path) -> None:
    from support.s3servers import FaultProxy

    store, run, env = s3
    with FaultProxy(moto_url) as proxy:
        s = open_shell(
            store.uri, tmp_path, history, env={**env, "S3_ENDPOINT_URL": proxy.url, "ACTIVAULT_S3_RETRY_TIMEOUT": "8"}
        )
        proxy.rate, proxy.faults = 1.0, ("503",)
        out = s.run("ls")
        lines = [ln for ln in out.strip().splitlines() if ln.strip()]
        assert len(lines) >= 2 and "Traceback" not in out, out
        assert all(f"S3 at {proxy.url}: list {store.uri}" in ln and "retrying for up to" in ln for ln in lines[:-1]), (
            out
        )
        assert lines[-1].startswith(f"cannot list {store.uri}: the S3 endpoint {proxy.url} failed"), out
        assert "last with: 503 Service Unavailable (SlowDown)" in lines[-1]
        proxy.rate = 0.0  # the store is back: the same shell goes on
        assert re.search(r"^\s+#0\s+run/", s.run("ls"), re.M)
        s.close()
