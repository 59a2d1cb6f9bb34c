"""errors.py: the kinds of user errors, where they sit among Python's own, and what the CLI does with
them (one `activault: error: ...` line on stderr, exit status 2; anything else is a bug and is raised)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest

from activault import errors
from activault.cli import main
from activault.errors import (
    ActivaultError,
    ConfigError,
    DataError,
    FormatError,
    LockedError,
    NotFoundError,
    StorageError,
)

KINDS = [ConfigError, StorageError, FormatError, NotFoundError, LockedError, DataError]
INTERNALS = Path(__file__).resolve().parents[1] / "docs" / "internals.md"


def all_subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub} | all_subclasses(sub)
    return out


def test_the_kinds_are_the_documented_ones():
    row = next(line for line in INTERNALS.read_text().splitlines() if line.startswith("| `errors.py`"))
    documented = set(re.findall(r"`(\w+Error)`", row)) - {"ActivaultError"}
    defined = {c.__name__ for c in all_subclasses(ActivaultError) if c.__module__ == errors.__name__}
    assert defined == documented == {c.__name__ for c in KINDS}


@pytest.mark.parametrize(
    "kind,bases",
    [
        (ConfigError, (ActivaultError, ValueError)),  # callers catching ValueError still see bad values
        (StorageError, (ActivaultError,)),
        (FormatError, (ActivaultError,)),
        (DataError, (ActivaultError,)),
        (LockedError, (StorageError, ActivaultError)),
        (NotFoundError, (StorageError, ActivaultError, FileNotFoundError, OSError)),
    ],
)
def test_each_kind_is_also_the_python_error_it_stands_for(kind, bases):
    err = kind("what went wrong; how to fix it")
    assert all(isinstance(err, b) for b in bases)
    assert str(err) == "what went wrong; how to fix it"


def test_kinds_that_are_not_related_do_not_catch_each_other():
    for kind in KINDS:
        for other in KINDS:
            if other is not kind and not issubclass(kind, other):
                assert not isinstance(kind("x"), other), (kind, other)
    assert not issubclass(FormatError, StorageError) and not issubclass(ConfigError, StorageError)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_survives_pickling_with_its_message(kind):
    """Errors cross process boundaries (Ray workers): the kind and the message must arrive intact."""
    back = pickle.loads(pickle.dumps(kind("run 'r' at /x: a clear message")))
    assert type(back) is kind and str(back) == "run 'r' at /x: a clear message"


# ---- the CLI: one line, exit 2 ----


@pytest.fixture
def ls_raises(monkeypatch):
    """Make `activault ls` raise the given exception."""
    from activault.tools import inspection

    def arrange(exc: BaseException) -> None:
        def run_ls(*args, **kwargs):
            raise exc

        monkeypatch.setattr(inspection, "run_ls", run_ls)

    return arrange


@pytest.mark.parametrize("kind", KINDS)
def test_the_cli_prints_each_kind_as_one_line_and_exits_2(kind, ls_raises, capsys):
    ls_raises(kind("the store s3://b cannot be reached; check S3_ENDPOINT_URL"))
    assert main(["ls", "somewhere"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "activault: error: the store s3://b cannot be reached; check S3_ENDPOINT_URL\n"


@pytest.mark.parametrize("bug", [RuntimeError("a bug"), KeyError("k"), ValueError("not ours"), OSError(5, "EIO")])
def test_the_cli_raises_what_is_not_a_user_error(bug, ls_raises):
    ls_raises(bug)
    with pytest.raises(type(bug)):
        main(["ls", "somewhere"])


def test_the_cli_turns_an_interrupt_into_a_resume_hint(ls_raises, capsys):
    ls_raises(KeyboardInterrupt())
    assert main(["ls", "somewhere"]) == 130
    assert capsys.readouterr().err == "activault: interrupted; run the same command again to resume\n"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["ls", "s3://"], "names no bucket"),
        (["ls", "ftp://host/x"], "unsupported storage scheme 'ftp'"),
        (["verify", "file://"], "empty storage path"),
        (["inspect", "{tmp}/garbage.safetensors"], "garbage.safetensors"),
        (["stats", "{tmp}/no-such-hook"], "statistics.json does not exist"),
    ],
)
def test_garbage_on_the_command_line_is_one_line_from_the_real_commands(argv, message, tmp_path, capsys):
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("activault: error: ") and err.count("\n") == 1 and message in err, err
