"""activault: collect, store and stream LLM activations for interpretability research."""

from activault.version import __version__

__all__ = [
    "ActivationDataset",
    "Config",
    "RCache",
    "ReadOptions",
    "S3RCache",
    "TokenFilter",
    "TokenLoader",
    "__version__",
    "collect",
    "load_config",
    "open_store",
]


def __getattr__(name: str):
    # Lazy: `import activault` stays cheap (no torch or transformers until something is used).
    if name in ("Config", "load_config"):
        import activault.config as config

        return getattr(config, name)
    if name == "collect":
        from activault.collection.pipeline import collect

        return collect
    if name == "open_store":
        from activault.storage import open_store

        return open_store
    if name in ("RCache", "S3RCache"):
        import activault.reading.rcache as reader

        return getattr(reader, name)
    if name in ("ReadOptions", "TokenFilter"):
        import activault.reading.options as options

        return getattr(options, name)
    if name == "TokenLoader":
        from activault.reading.tokens import TokenLoader

        return TokenLoader
    if name == "ActivationDataset":
        from activault.reading.dataset import ActivationDataset

        return ActivationDataset
    raise AttributeError(f"module 'activault' has no attribute {name!r}")
