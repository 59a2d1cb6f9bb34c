"""The README's Python snippets, executed as written against the servers and runs they name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from activault.cli import main
from activault.storage import LocalStore
from activault.storage.s3 import S3Store
from support.synth import create_bucket, s3_env, write_synthetic_run

README = Path(__file__).resolve().parent.parent / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def snippet(marker: str) -> str:
    found = [s for s in SNIPPETS if marker in s]
    assert len(found) == 1, f"one README snippet holds {marker!r}"
    return found[0]


def test_every_snippet_is_covered() -> None:
    markers = (
        "S3RCache.from_credentials",
        "batch_tokens=1024, seed=0",
        "token_context(",
        "VaultProvider(",
    )  # RCache( is with TokenLoader(
    assert len(SNIPPETS) == len(markers) and all(any(m in s for s in SNIPPETS) for m in markers)


@pytest.fixture
def s3(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The README's bucket names on the session's moto server, and the environment pointing at it."""
    env = s3_env(moto_url)
    for bucket in ("bucket", "readme-bucket"):
        create_bucket(moto_url, bucket)
    for k, v in {**env, "S3_BUCKET_NAME": "readme-bucket"}.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.mark.s3
def test_reading_snippets_run_as_written(s3) -> None:
    write_synthetic_run(S3Store("s3://readme-bucket", env=s3), "run_name", ["hook_name"], files=2)
    scope: dict = {}
    exec(snippet("S3RCache.from_credentials"), scope)  # noqa: S102 - the README's own code
    assert tuple(scope["batch"]["states"].shape[1:]) == (16, 8)


def test_local_reading_snippet_runs_as_written_on_the_demo_vault(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`./vault/demo` as `activault demo` lays it out (its hooks, d_model 64), with a NaN token."""
    monkeypatch.chdir(tmp_path)
    hooks = ["models.layers.1.post", "models.layers.2.mlp.post", "models.layers.3.self_attn.pre"]
    write_synthetic_run(
        LocalStore(tmp_path / "vault"),
        "demo",
        hooks,
        files=3,
        rows=8,
        seq=128,
        d=64,
        nonfinite=[("models.layers.1.post", 0, 2, 40, float("nan"))],
    )
    scope: dict = {}
    exec(snippet("batch_tokens=1024, seed=0"), scope)  # noqa: S102 - the README's own code
    assert tuple(scope["batch"]["models.layers.1.post"].shape) == (1024, 64)
    assert scope["state"]["epoch"] == 1 and scope["loader"].filtered["first"] > 0
    assert scope["loader"].filtered["nonfinite"] == 1


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    return text[start : text.index("\n## ", start + 1)]


def command(text: str, name: str) -> list[str]:
    """The arguments of the one `activault NAME ...` given inline in `text`."""
    (found,) = re.findall(rf"`activault ({name} [^`]+)`", text.replace("\n", " "))
    return found.split()


@pytest.mark.slow
def test_training_section_runs_as_written_on_the_demo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """collect -> train on the train split -> evaluate on the test split -> load in SAELens, then the
    section's evaluate and export commands."""
    import torch

    from activault import TokenLoader

    text = section("Training on a vault")
    monkeypatch.chdir(tmp_path)
    (shell,) = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert shell.split("#")[0].split() == ["activault", "demo", "--keep", "mine"]
    assert main(["demo", "--keep", "mine"]) == 0
    capsys.readouterr()
    scope: dict = {}
    exec(snippet("VaultProvider("), scope)  # noqa: S102 - the README's own code
    assert "explained variance" in capsys.readouterr().out
    ev, loaded, provider = scope["ev"], scope["loaded"], scope["provider"]
    assert provider.loader.filtered["split"] > 0  # trained without the held-out documents
    r = ev.reconstruction
    assert ev.split == {"split": "test", "test_fraction": 0.1, "split_seed": 0} and ev.library == "saelens"
    assert 0.5 < r.explained_variance < 1 and r.l0 == pytest.approx(16) and ev.lm is not None
    meta = loaded.cfg.metadata
    assert (meta.hook_name, meta.activault_hook, meta.context_size) == ("blocks.1.hook_resid_post", scope["hook"], 128)
    assert meta.model_name == "mine/model"  # the run's model, as cfg.json names it
    # SAELens's own loaded SAE on the raw held-out activations explains what evaluate measured
    held_out = {"split": "test", "test_fraction": 0.1, "drop_last": False}
    with TokenLoader(scope["run"], hooks=[scope["hook"]], batch_tokens=4096, **held_out) as test:
        x = torch.cat([b[scope["hook"]] for b in test]).float()
    with torch.no_grad():
        x_hat = loaded.decode(loaded.encode(x))
    explained = float(1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert len(x) == r.tokens and explained == pytest.approx(r.explained_variance, abs=1e-4)
    assert main(command(text, "evaluate") + ["--no-lm"]) == 0
    assert f"explained variance  {r.explained_variance:.4f}" in capsys.readouterr().out
    assert main(command(text, "export")) == 0 and (tmp_path / "mine" / "cache" / "state.json").is_file()


@pytest.mark.slow
def test_filtering_snippet_runs_as_written_on_the_demo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["demo"]) == 0
    capsys.readouterr()
    scope: dict = {}
    exec(snippet("token_context("), scope)  # noqa: S102 - the README's own code
    filtered, text = capsys.readouterr().out.splitlines()[-2:]
    assert scope["train"].filtered["split"] > 0 and scope["train"].filtered["first"] > 0 and "split" in filtered
    assert "[[" in text and "]]" in text  # the token, marked in its document's text


def test_the_readme_starts_short() -> None:
    """Set-up first, then short sections: the long material lives in docs/ (issue 29)."""
    text = README.read_text()
    assert len(text.splitlines()) <= 220
    first = text.index("```bash\n")
    assert first < text.index("\n## ") and "bash scripts/demo.sh" in text[first : text.index("```\n", first + 1)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def links(path: Path) -> list[tuple[Path, str]]:
    """The targets of a Markdown file's relative links: (file, anchor or "")."""
    prose = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    found = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if not re.match(r"[a-z]+://", target):
            file, _, anchor = target.partition("#")
            found.append(((path.parent / file).resolve() if file else path, anchor))
    return found


@pytest.mark.parametrize("page", ["README.md", "docs/setup.md", "docs/guarantees.md", "docs/benchmarks.md"])
def test_every_link_of_the_readme_and_its_pages_reaches_a_file_and_heading(page: str) -> None:
    path = README.parent / page
    targets = links(path)
    assert targets
    for file, anchor in targets:
        assert file.exists(), f"{page} links to {file}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", file.read_text(), flags=re.S), re.M)
            assert anchor in {slug(h) for h in headings}, f"{page} links to {file.name}#{anchor}: no such heading"


def sentences(text: str) -> set[str]:
    """The prose sentences of a Markdown text of at least 12 words, whitespace normalised."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    prose = "\n".join(line for line in prose.splitlines() if not line.startswith("|"))
    return {s for s in (" ".join(s.split()) for s in re.split(r"(?<=[.:;])\s", prose)) if len(s.split()) >= 12}


def test_no_readme_sentence_is_repeated_in_the_docs() -> None:
    """What moved to docs/ is said there only: the README summarises and links."""
    readme = sentences(README.read_text())
    for page in sorted((README.parent / "docs").glob("*.md")):
        repeated = readme & sentences(page.read_text())
        assert not repeated, f"{page.name} repeats the README: {sorted(repeated)}"
