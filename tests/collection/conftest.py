"""What the packing and source tests share: a locally trained tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from activault.tools.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(path)
    return path


@pytest.fixture
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(tok_dir)  # fresh per test: some tests change its template
