"""evaluation/saved.py: each library's saved folder is recognised and loaded its own way; a folder
without one names the folders below that hold one; transcoders and non-coders are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from activault.errors import ConfigError, NotFoundError
from activault.evaluation.saved import check_coder, load_sae


def test_a_saelens_folder_loads_as_saelens(tmp_path: Path) -> None:
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=8, d_sae=16, k=2))
    sae.save_model(tmp_path / "sl")
    loaded, library = load_sae(tmp_path / "sl")
    x = torch.randn(5, 8)
    assert library == "saelens"
    assert torch.allclose(loaded.decode(loaded.encode(x)), sae.decode(sae.encode(x)), atol=1e-6)


def test_a_sparsify_folder_gives_dense_latents_that_decode_as_sparsify_does(tmp_path: Path) -> None:
    from sparsify import SaeConfig, SparseCoder

    torch.manual_seed(0)
    coder = SparseCoder(8, SaeConfig(k=3, num_latents=16))
    coder.save_to_disk(tmp_path / "sp" / "layers.1")
    loaded, library = load_sae(tmp_path / "sp" / "layers.1")
    x = torch.randn(5, 8)
    latents = loaded.encode(x)
    assert library == "sparsify" and latents.shape == (5, 16) and int((latents != 0).sum(1).max()) <= 3
    assert torch.allclose(loaded.decode(latents), coder(x).sae_out, atol=1e-5)
    with pytest.raises(NotFoundError, match=r"these folders below it hold one: .*sp/layers\.1"):
        load_sae(tmp_path / "sp")  # sparsify saves one folder per hookpoint


def test_a_sparsify_transcoder_is_refused(tmp_path: Path) -> None:
    from sparsify import SparseCoder, TranscoderConfig

    SparseCoder(8, TranscoderConfig(k=3, num_latents=16)).save_to_disk(tmp_path / "tc")
    with pytest.raises(ConfigError, match="transcoder"):
        load_sae(tmp_path / "tc")


def test_a_dictionary_learning_folder_loads_with_load_dictionary(tmp_path: Path) -> None:
    import json

    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    torch.manual_seed(0)
    ae = AutoEncoderTopK(8, 16, k=2)
    (tmp_path / "dl").mkdir()
    torch.save(ae.state_dict(), tmp_path / "dl" / "ae.pt")
    (tmp_path / "dl" / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoderTopK", "k": 2}}))
    loaded, library = load_sae(tmp_path / "dl")
    x = torch.randn(5, 8)
    assert library == "dictionary_learning" and torch.allclose(loaded.decode(loaded.encode(x)), ae(x), atol=1e-6)


def test_folders_without_an_sae_and_objects_without_encode_are_named(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="holds no saved SAE .*saelens: cfg.json \\+ sae_weights.safetensors"):
        load_sae(tmp_path)
    with pytest.raises(NotFoundError, match="is not a folder"):
        load_sae(tmp_path / "missing")
    with pytest.raises(ConfigError, match="has no encode or decode"):
        check_coder(torch.nn.Linear(2, 2))
