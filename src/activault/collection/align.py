"""Collecting a second model aligned to a stored run (`data_config.align_to`): the same documents,
packing and token order, so file k of both runs holds the same tokens.

The aligned run takes the reference's data config (the fields of `ALIGNED`); a key this config sets
to another value is refused, naming it. Then, before weights load, this model's tokenizer packs the
machine's first file and its ids, positions and documents are compared with the reference's stored
ones: a tokenizer that gives other ids is refused, naming the first difference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from activault.collection.resume import FIELDS, MISSING, lookup, source_record
from activault.config import Config, parse_config
from activault.errors import ConfigError, NotFoundError
from activault.storage.base import join
from activault.vault.runs import StoredRun, locate_run

if TYPE_CHECKING:
    import torch

# Every field that decides which tokens land in which file: the reference's values are used.
# skip_cache is the aligned run's own choice (it stores activations or not, the tokens are the same).
ALIGNED = [
    *(p for p, kind in FIELDS.items() if kind == "data" and p.startswith("data_config.")),
    "num_runs",
    "upload_config.batches_per_upload",
]
ALIGNED = [p for p in ALIGNED if p not in ("data_config.align_to", "data_config.skip_cache")]
SECTIONS = ("transformer_config", "data_config", "upload_config")
ONLY_SAME_TOKENIZER = (
    "align only a model whose tokenizer is the reference's (same vocabulary, merges and special "
    "tokens), or collect this model as a run of its own, without data_config.align_to"
)


def reference(cfg: Config) -> StoredRun | None:
    """The run `cfg` aligns to (None without `align_to`); NotFoundError naming the URI if it holds
    no run, ConfigError if it holds no collection's config to align to."""
    uri = cfg.data_config.align_to
    if uri is None:
        return None
    try:
        found = locate_run(uri)
    except NotFoundError as e:
        raise NotFoundError(f"data_config.align_to: {e}") from None
    rec = found.record
    if not rec.config or rec.imported_from is not None or rec.original is not None:
        raise ConfigError(
            f"data_config.align_to: {found.store.url(found.run)} is not a collected run (an import or "
            "another tool's run): only a run activault collected can be aligned to; name such a run"
        )
    return found


def aligned_config(cfg: Config, ref: StoredRun) -> Config:
    """`cfg` with the reference's data fields (`ALIGNED`); a ConfigError naming every key set to
    another value."""
    ours: dict[str, Any] = cfg.model_dump(mode="json")
    conflicts = []
    for path in ALIGNED:
        theirs = lookup(ref.record.config, path)
        if theirs is MISSING or lookup(ours, path) == theirs:
            continue
        if path == "data_config.data_key" and _same_source(cfg, ref):
            continue  # the same files named by another path
        if _is_set(cfg, path):
            conflicts.append(f"  {path}: the reference has {theirs!r}, this config {lookup(ours, path)!r}")
        else:
            _assign(ours, path, theirs)
    if conflicts:
        raise ConfigError(
            f"run {cfg.run_name!r} aligns to {ref.store.url(ref.run)} (data_config.align_to) but sets its "
            "data otherwise:\n" + "\n".join(conflicts) + "\nan aligned run takes these from the run it "
            "aligns to: remove these keys from the config, or set the reference's values"
        )
    return parse_config(ours, f"(aligned to {ref.store.url(ref.run)})")


def check_other(ref: StoredRun, destination: str) -> None:
    """Refuse a run aligned to itself (`destination`: the URL of the run being collected)."""
    if ref.store.url(ref.run).rstrip("/") == destination.rstrip("/"):
        raise ConfigError(f"{destination} aligns to itself: data_config.align_to must name another run")


def _same_source(cfg: Config, ref: StoredRun) -> bool:
    """Whether `cfg`'s source resolves to the reference's recorded one (local files named absolutely)."""
    try:
        return ref.record.source is not None and source_record(cfg.data_config) == ref.record.source
    except ConfigError:
        return False


def _is_set(cfg: Config, path: str) -> bool:
    """Whether the config file wrote `path` (a default was not written, so the reference's is taken)."""
    *sections, leaf = path.split(".")
    node: Any = cfg
    for s in sections:
        node = getattr(node, s)
    return leaf in node.model_fields_set


def _assign(tree: dict[str, Any], path: str, value: Any) -> None:
    *sections, leaf = path.split(".")
    for s in sections:
        tree = tree[s]
    tree[leaf] = value


def check_tokens(cfg: Config, tokenizer: Any, ref: StoredRun, machine: int) -> None:
    """Refuse a tokenizer whose packing of this machine's first file differs from the reference's
    stored one (ids, positions, documents), naming the file and the first difference."""
    from activault.collection.packing import iter_batches
    from activault.collection.repair import stored_tokens

    dc, uc = cfg.data_config, cfg.upload_config
    stored = _stored(ref, machine)
    url = stored.pop("url")
    batches = iter_batches(dc, tokenizer, machine=machine, num_runs=cfg.num_runs)
    for _ in range(dc.start_batch):
        if next(batches, None) is None:
            break
    parts: dict[str, list[torch.Tensor]] = {"input_ids": [], "positions": [], "documents": []}
    for _, batch in zip(range(uc.batches_per_upload), batches, strict=False):
        ids, pos, flat = stored_tokens(batch, dc.seq_length)
        parts["input_ids"].append(ids)
        parts["positions"].append(pos)
        parts["documents"].append(batch.documents.reshape(-1)[flat].view(ids.shape))
    import torch

    ours = {k: torch.cat(v) if v else torch.empty(0, dc.seq_length, dtype=torch.int64) for k, v in parts.items()}
    if ours["input_ids"].shape != stored["input_ids"].shape:
        raise ConfigError(
            f"{url} holds {stored['input_ids'].shape[0]} rows, this model's tokenizer packs "
            f"{ours['input_ids'].shape[0]} rows for it: it tokenizes the documents differently; {ONLY_SAME_TOKENIZER}"
        )
    for name in ("input_ids", "positions", "documents"):
        if name not in stored:
            continue
        diff = (ours[name] != stored[name].to(torch.int64)).nonzero()
        if len(diff):
            r, c = (int(x) for x in diff[0])
            what = "token id" if name == "input_ids" else f"{name} value"
            raise ConfigError(
                f"this model's tokenizer does not give the aligned run's tokens: {url}, row {r}, column {c}: "
                f"the reference stores {what} {int(stored[name][r, c])}, this tokenizer gives "
                f"{int(ours[name][r, c])}; {ONLY_SAME_TOKENIZER}"
            )


def _stored(ref: StoredRun, machine: int) -> dict[str, Any]:
    """The reference's first file of `machine`: its url and stored input_ids, positions (and documents)."""
    import torch

    from activault.vault.megabatch import fetch_header
    from activault.vault.records import file_name

    key = join(ref.run, ref.record.hooks[0], file_name(machine, 0))
    url = ref.store.url(key)
    try:
        header = fetch_header(ref.store, key)
    except NotFoundError:
        raise ConfigError(
            f"{url} does not exist: the run aligned to has no file of machine {machine} yet (or it stored "
            f"none: data_config.skip_cache), so its tokens cannot be compared; collect machine {machine} "
            "of that run first"
        ) from None
    out: dict[str, Any] = {"url": url}
    for name in ("input_ids", "positions", "documents"):
        if name in header.tensors:
            start, end = header.byte_range(name)
            info = header.tensors[name]
            raw = bytearray(ref.store.get_range(key, start, end))  # writable: torch.frombuffer warns otherwise
            out[name] = torch.frombuffer(raw, dtype=info.dtype).view(info.shape)
    return out
