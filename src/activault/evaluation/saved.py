"""A sparse coder from what a library saved (SAELens, dictionary_learning, sparsify), told apart by its files.

Each library is imported only when its files are found; none is a dependency of activault.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from activault.errors import ConfigError, NotFoundError

Library = Literal["saelens", "dictionary_learning", "sparsify"]

# The files each library's own save writes into one SAE's folder.
SIGNATURES: dict[Library, tuple[str, ...]] = {
    "saelens": ("cfg.json", "sae_weights.safetensors"),  # SAE.save_model
    "dictionary_learning": ("config.json", "ae.pt"),  # trainSAE's save_dir/trainer_{i}
    "sparsify": ("cfg.json", "sae.safetensors"),  # SparseCoder.save_to_disk, one folder per hookpoint
}


def check_coder(sae: Any) -> None:
    """A ConfigError unless `sae` has callable encode and decode."""
    missing = [m for m in ("encode", "decode") if not callable(getattr(sae, m, None))]
    if missing:
        raise ConfigError(
            f"{type(sae).__name__} has no {' or '.join(missing)}(): pass an object with encode(x) -> latents "
            "and decode(latents) -> x_hat, or the folder a library saved an SAE in"
        )


def detect(folder: Path) -> Library:
    """Which library saved the SAE in `folder`; an error naming the folders below that hold one."""
    if not folder.is_dir():
        raise NotFoundError(f"{folder} is not a folder: pass the folder a library saved the SAE in")
    for library, names in SIGNATURES.items():
        if all((folder / n).is_file() for n in names):
            return library
    below = sorted(
        str(sub)
        for sub in folder.rglob("*")
        if sub.is_dir() and any(all((sub / n).is_file() for n in names) for names in SIGNATURES.values())
    )
    hint = f"; these folders below it hold one: {', '.join(below[:5])}" if below else ""
    expected = "; ".join(f"{lib}: {' + '.join(names)}" for lib, names in SIGNATURES.items())
    raise NotFoundError(f"{folder} holds no saved SAE (expected the files of one library: {expected}){hint}")


class SparsifyCoder(nn.Module):
    """A sparsify SparseCoder with dense latents: encode(x) -> [n, num_latents], decode(latents) -> x_hat."""

    def __init__(self, coder: Any):
        super().__init__()
        self.coder = coder

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        out = self.coder.encode(x)
        latents = torch.zeros(x.shape[0], self.coder.num_latents, dtype=out.top_acts.dtype, device=x.device)
        return latents.scatter_(1, out.top_indices.long(), out.top_acts)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.to(self.coder.dtype) @ self.coder.W_dec + self.coder.b_dec


def _saelens(folder: Path, device: str) -> Any:
    from sae_lens import SAE

    return SAE.load_from_disk(folder, device=device)


def _dictionary_learning(folder: Path, device: str) -> Any:
    # load_dictionary reads ae.pt with torch.load, whose default since torch 2.6 is weights_only
    # (tensors only, no pickled code).
    from dictionary_learning.utils import load_dictionary

    ae, _ = load_dictionary(str(folder), device=device)
    return ae


def _sparsify(folder: Path, device: str) -> Any:
    from sparsify import SparseCoder

    coder = SparseCoder.load_from_disk(folder, device=device)
    if coder.cfg.transcode:
        raise ConfigError(
            f"{folder} holds a sparsify transcoder (input hook -> output hook): evaluate measures an SAE "
            "that reconstructs its own hook; evaluate the transcoder with its own loss on both hooks"
        )
    if coder.W_skip is not None:
        raise ConfigError(f"{folder} holds a sparsify SAE with a skip connection, which evaluate does not support yet")
    return SparsifyCoder(coder)


LOADERS = {"saelens": _saelens, "dictionary_learning": _dictionary_learning, "sparsify": _sparsify}


def load_sae(path: str | Path, device: str = "cpu") -> tuple[Any, Library]:
    """(the SAE, the library that saved it) from its folder, loaded the library's own way."""
    folder = Path(path)
    library = detect(folder)
    try:
        sae = LOADERS[library](folder, device)
    except ImportError as e:
        raise ConfigError(
            f"{folder} holds a {library} SAE but {library} is not installed ({e}): "
            "pip install 'activault[integrations]'"
        ) from None
    check_coder(sae)
    if isinstance(sae, nn.Module):
        sae.eval()
    return sae, library
