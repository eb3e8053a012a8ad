"""The ``tensorstream`` command: ``reshard``, ``inspect``, ``verify``, ``bench``, ``push`` and ``pull``.

Each subcommand is added by one ``_add_<name>`` function listed in `SUBCOMMANDS` and run by one ``_<name>``
function that returns the exit code; a new subcommand is one more pair.

Exit codes:

| code | meaning |
| --- | --- |
| 0 | success |
| 1 | a tensorstream error (the message says what to do), a damaged store, or a missing file or repo |
| 2 | bad usage (unknown option, missing argument) |
| 3 | the Hugging Face Hub could not be reached or refused the request (network, authentication) |
| 130 | interrupted (Ctrl-C) |
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, HubUnavailableError, TensorStreamError

__all__ = ["EXIT_ERROR", "EXIT_HUB", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "SUBCOMMANDS", "main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_HUB = 3
EXIT_INTERRUPTED = 130

Subparsers = Any  # argparse's _SubParsersAction


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.func(args))
    except HubUnavailableError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_HUB
    except (TensorStreamError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(
            "interrupted; nothing half-written is kept as a store: running the same command again resumes a "
            "reshard from the blocks already written",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except Exception as err:
        if not _is_hub_error(err):
            raise
        print(f"error: the Hugging Face Hub: {err}", file=sys.stderr)
        return EXIT_HUB


def _is_hub_error(err: BaseException) -> bool:
    """An error raised by huggingface_hub or its HTTP client (HTTP status, connection, offline mode)."""
    return any(cls.__module__.split(".")[0] in ("huggingface_hub", "httpx", "httpx2") for cls in type(err).__mro__)


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="tensorstream",
        description="Stream Hugging Face models from fast storage, block by block.",
        epilog="Exit codes: 0 success, 1 error or damaged store, 2 bad usage, 3 Hub unreachable or refused. "
        "`tensorstream COMMAND --help` describes each command.",
    )
    parser.add_argument("--version", action="version", version=f"tensorstream {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what tensorstream does (INFO)")
    sub = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as one JSON object (no progress bars)")


def _hub_source_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--revision", help="Hub revision of the source (branch, tag or commit)")
    p.add_argument("--cache-dir", help="Hugging Face cache folder")
    p.add_argument("--local-files-only", action="store_true", help="never reach the Hub; use the cache only")


# -- reshard -----------------------------------------------------------------------------------------------------


def _add_reshard(sub: Subparsers) -> None:
    p = sub.add_parser(
        "reshard",
        help="reshard a checkpoint into a store of per-block .ts files",
        description="Reshard a model folder or Hub id into STORAGE_PATH/<fingerprint>/ (once; an up-to-date store "
        "is reused).",
    )
    p.add_argument("source", help="local model folder or Hub repo id")
    p.add_argument("storage_path", nargs="?", help="where stores live (default: <HF hub cache>/tensorstream)")
    p.add_argument("--dtype", help="convert floating weights: bf16, fp16 or fp32 (default: keep)")
    _store_kind_flags(p)
    p.add_argument(
        "--dequantize",
        choices=["per_block", "once"],  # Config.DEQUANTIZE_CHOICES (config imports torch; --help must not)
        default="per_block",
        help="an FP8 or MXFP4 checkpoint: store its compact bytes, dequantized as each block loads (per_block, the "
        "default), or the bf16 weights transformers dequantizes it to (once: ~1.9x the bytes, faster on a CPU)",
    )
    p.add_argument("--model-class", help="transformers class to build (default: config.architectures[0])")
    p.add_argument("--force", action="store_true", help="rebuild even if an up-to-date store exists")
    _hub_source_flags(p)
    _json_flag(p)
    p.set_defaults(func=_reshard)


def _store_kind_flags(p: argparse.ArgumentParser) -> None:
    kind = p.add_mutually_exclusive_group()
    kind.add_argument(
        "--quantize",
        choices=["int8", "int4"],
        help="store the blocks' weight matrices group-wise quantized (fewer bytes per token; docs/quantization.md)",
    )
    kind.add_argument(
        "--compression",
        choices=["lossless"],
        help="store 16-bit weights as byte planes, the high one zstd-compressed (bit-exact; docs/quantization.md)",
    )


def _reshard(args: argparse.Namespace) -> int:
    from .reshard import reshard
    from .store import Store

    path = reshard(
        args.source,
        args.storage_path,
        dtype=args.dtype,
        quantize=args.quantize,
        compression=args.compression,
        dequantize=args.dequantize,
        model_class=args.model_class,
        force=args.force,
        revision=args.revision,
        cache_dir=args.cache_dir,
        local_files_only=args.local_files_only,
        progress=not args.json,
    )
    store = Store.open(path, verify="header")
    kind = store.kind or "plain"
    result = {"store": str(path), "blocks": len(store.blocks), "total_bytes": store.total_bytes, "kind": kind}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"store: {path}\nblocks: {len(store.blocks)}, {store.total_bytes / 1e9:.3f} GB ({kind})")
    return EXIT_OK


# -- inspect -----------------------------------------------------------------------------------------------------


def _add_inspect(sub: Subparsers) -> None:
    p = sub.add_parser(
        "inspect",
        help="show a store's blocks, sizes, dtypes, alignment and checksums as a table",
        description="Show a store's files as a table: block, tensor count, size, dtypes, alignment, checksum and "
        "its status. By default only headers are read (status 'recorded': the header matches the manifest); "
        "--checksum also reads the data and checks it (status 'ok' or 'DAMAGED', exit code 1 if any is).",
    )
    p.add_argument("store", help="a store folder (STORAGE_PATH/<fingerprint>) or a preshard repo snapshot")
    p.add_argument("--checksum", action="store_true", help="read every file and check its checksum")
    _json_flag(p)
    p.set_defaults(func=_inspect)


def _check_data(store: Any, entry: Any) -> str | None:
    """``None`` when ``entry``'s file reads back with its checksum, else what is wrong."""
    from .format import aligned_empty, read_data, verify_buffer

    try:
        header = store.header(entry)
        buffer = aligned_empty(header.data_size)
        read_data(header.path, header, buffer)
        verify_buffer(header, buffer)
    except (TensorStreamError, OSError) as err:
        return str(err)
    return None


def _rows(store_path: Path, checksum: bool) -> tuple[Any, list[dict[str, Any]]]:
    from .format import DATA_ALIGNMENT, TENSOR_ALIGNMENT

    store = _open_store(store_path, "inspect", verify="header")
    rows = []
    for entry in store.entries():
        header = store.header(entry)
        aligned = header.data_offset % DATA_ALIGNMENT == 0 and all(
            info.start % TENSOR_ALIGNMENT == info.phase for info in header.tensors.values()
        )
        error = _check_data(store, entry) if checksum else None
        rows.append(
            {
                "block": entry.name or "(non-block)",
                "file": entry.file,
                "tensors": len(header.tensors),
                "bytes": entry.data_size,
                "dtypes": list(entry.dtypes),
                "aligned": aligned,
                "checksum": entry.checksum,
                "checksum_status": ("DAMAGED" if error else "ok") if checksum else "recorded",
                "error": error,
            }
        )
    return store, rows


def _inspect(args: argparse.Namespace) -> int:
    from .prequantized import describe_quantization

    store, rows = _rows(Path(args.store), args.checksum)
    damaged = any(row["checksum_status"] == "DAMAGED" for row in rows)
    if args.json:
        info = {
            "store": str(store.path),
            "model_class": store.model_class,
            "fingerprint": store.fingerprint,
            "kind": store.kind or "plain",
            "total_bytes": store.total_bytes,
            "quantization": describe_quantization(store.manifest),
            "files": rows,
        }
        print(json.dumps(info))
        return EXIT_ERROR if damaged else EXIT_OK
    print(
        f"store {store.path}\nmodel {store.model_class}, fingerprint {store.fingerprint}, "
        f"{len(store.blocks)} blocks, {store.total_bytes / 1e9:.3f} GB, {store.kind or 'plain'} store"
    )
    quantization = describe_quantization(store.manifest)
    if quantization:
        print(quantization)
    width = max(len(row["block"]) for row in rows)
    print(f"{'block':<{width}}  {'tensors':>7}  {'MB':>10}  {'dtypes':<12}  {'aligned':<7}  {'checksum':<14}  status")
    for row in rows:
        print(
            f"{row['block']:<{width}}  {row['tensors']:>7}  {row['bytes'] / 1e6:>10.2f}  "
            f"{','.join(row['dtypes']):<12}  {'yes' if row['aligned'] else 'NO':<7}  {row['checksum']:<14}  "
            f"{row['checksum_status']}"
        )
    if damaged:
        print(f"damaged files: {_repair(store.path)}")
    return EXIT_ERROR if damaged else EXIT_OK


def _open_store(path: str | Path, command: str, verify: str) -> Any:
    """`Store.open`, after a clear error for a path that does not exist or is a storage root (not a store)."""
    from .store import FINGERPRINT_PATTERN, MANIFEST_NAME, Store

    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(
            f"{folder} does not exist; pass a store folder (`tensorstream cache ls` lists the stores)."
        )
    if folder.is_dir() and not (folder / MANIFEST_NAME).exists():
        stores = sorted(
            p.name for p in folder.iterdir() if FINGERPRINT_PATTERN.fullmatch(p.name) and (p / MANIFEST_NAME).is_file()
        )
        if stores:
            raise FileNotFoundError(
                f"{folder} is a storage root holding {len(stores)} store(s), not a store; pass one of them, e.g. "
                f"`tensorstream {command} {folder / stores[0]}` (`tensorstream cache ls {folder}` lists them all)."
            )
    return Store.open(folder, verify=verify)


def _repair_command(store_path: Path) -> str:
    from .store import repair_command

    return repair_command(store_path)


def _repair(store_path: Path) -> str:
    from .store import repair_hint

    return repair_hint(store_path)


# -- verify ------------------------------------------------------------------------------------------------------


def _add_verify(sub: Subparsers) -> None:
    p = sub.add_parser(
        "verify",
        help="check every file of a store against its checksum",
        description="Read every .ts file of a store and check it against its checksum. "
        "Exit code 1 when anything is damaged.",
    )
    p.add_argument("store", help="a store folder (STORAGE_PATH/<fingerprint>) or a preshard repo snapshot")
    _json_flag(p)
    p.set_defaults(func=_verify)


def _verify(args: argparse.Namespace) -> int:
    store = _open_store(args.store, "verify", verify="off")
    results = []
    for entry in store.entries():
        error = _check_data(store, entry)
        results.append({"file": entry.file, "ok": error is None, "error": error})
    damaged = [r for r in results if not r["ok"]]
    if args.json:
        repair = {"repair_command": _repair_command(store.path)} if damaged else {}
        print(json.dumps({"store": str(store.path), "ok": not damaged, "files": results, **repair}))
    else:
        for r in damaged:
            print(f"DAMAGED {r['file']}: {r['error']}")
        print(
            f"{len(results) - len(damaged)}/{len(results)} files ok" + (f"; {_repair(store.path)}" if damaged else "")
        )
    return EXIT_ERROR if damaged else EXIT_OK


# -- bench -------------------------------------------------------------------------------------------------------


def _add_bench(sub: Subparsers) -> None:
    p = sub.add_parser(
        "bench",
        help="measure the disk, tensorstream and (optionally) accelerate on one model, as ratios",
        description="Measure, in one run: the raw cold read speed of the model's .ts files (the disk), "
        "tensorstream's decode speed with the budget (cold: page cache dropped before every step, and warm), "
        "optionally accelerate's disk offload at the same budget, and the resident model when it fits. Prints a "
        "table with the ratios and writes JSON. Without MODEL_OR_STORE it builds the standard benchmark model "
        "(a random Llama of ~1.9 GB in bf16, 16 blocks) once. With --diffusers, or given a diffusers model folder, "
        "it measures seconds per denoising step instead (docs/diffusers.md).",
    )
    p.add_argument("model", nargs="?", help="model folder, Hub id or store (default: the standard model)")
    p.add_argument(
        "--diffusers",
        action="store_true",
        help="measure a diffusers model (seconds per denoising step: resident, tensorstream and, with --compare "
        "diffusers, diffusers' group offload to disk); without MODEL, a random ~330 MB Flux transformer. Implied "
        "by a diffusers model folder",
    )
    p.add_argument("--budget-fraction", type=float, default=0.25, help="budget as a fraction of the model (0.25)")
    p.add_argument("--budget-gb", type=float, help="budget in GB (overrides --budget-fraction)")
    p.add_argument("--device", help="execution device (default: cuda:$LOCAL_RANK if available, else cpu)")
    p.add_argument("--batch", type=int, action="append", help="decode batch size; repeat for several (1 and 4)")
    p.add_argument("--tokens", type=int, default=8, help="new tokens per generation (8)")
    p.add_argument("--runs", type=int, default=3, help="generations per condition; medians are reported (3)")
    p.add_argument("--cache", choices=("cold", "warm"), action="append", help="cache condition(s) (both)")
    p.add_argument(
        "--compare",
        choices=("accelerate", "diffusers"),
        action="append",
        default=[],
        help="also measure a peer: accelerate's disk offload, or (a diffusers model) diffusers' group offload to disk",
    )
    p.add_argument("--no-resident", action="store_true", help="skip the fully resident model")
    p.add_argument(
        "--backend",
        choices=("auto", "posix", "mmap", "kvikio"),
        action="append",
        help="tensorstream backend(s) to measure, one after the other in this run; repeat for several (auto)",
    )
    p.add_argument(
        "--assistant",
        help="also measure assisted generation (warm, batch 1): 'prompt-lookup' or a draft model folder / Hub id",
    )
    p.add_argument(
        "--kv-cache",
        choices=("dynamic", "offloaded", "static", "offloaded_static"),
        action="append",
        help="transformers KV cache implementation(s) to decode with, one after the other in this run; repeat for "
        "several, e.g. --kv-cache dynamic --kv-cache offloaded (KV cache in host RAM; CUDA only) (dynamic)",
    )
    p.add_argument(
        "--quantize",
        choices=("int8", "int4"),
        action="append",
        help="also measure a quantized store of the same model (rows 'ts int8', 'ts int4'); repeat for several",
    )
    p.add_argument(
        "--compression",
        choices=("lossless",),
        action="append",
        help="also measure a losslessly compressed store of the same model (rows 'ts lossless')",
    )
    p.add_argument("--workdir", help="where the standard model and stores are kept (<storage_path>/bench)")
    p.add_argument("--out", default="tensorstream-bench.json", help="JSON output file (tensorstream-bench.json)")
    p.add_argument("--plot", help="also write a PNG bar chart here (needs matplotlib)")
    _json_flag(p)
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    from .bench import format_table, plot, run_bench, to_json, write_json

    model = args.model  # a model folder, Hub id, or a store (benchmarked as it is)
    if args.diffusers or _is_diffusers_folder(model):
        return _bench_diffusion(args)
    if "diffusers" in args.compare:
        raise ConfigError("--compare diffusers measures a diffusers model: add --diffusers, or pass its folder.")
    result = run_bench(
        model,
        workdir=args.workdir,
        budget_fraction=args.budget_fraction,
        budget_gb=args.budget_gb,
        device=args.device,
        batches=tuple(args.batch or (1, 4)),
        tokens=args.tokens,
        runs=args.runs,
        caches=tuple(args.cache or ("cold", "warm")),
        compare=tuple(args.compare),
        resident=not args.no_resident,
        backends=tuple(args.backend or ()),
        assistant=args.assistant,
        kv_caches=tuple(args.kv_cache or ("dynamic",)),
        kinds=(*(args.quantize or ()), *(args.compression or ())),
        progress=None if args.json else (lambda line: print(f"... {line}", file=sys.stderr, flush=True)),
    )
    write_json(result, args.out)
    if args.plot:
        plot(result, args.plot)
    print(to_json(result) if args.json else f"{format_table(result)}\n\nwrote {args.out}")
    return EXIT_OK


def _is_diffusers_folder(model: str | None) -> bool:
    from .integrations.diffusers_reshard import is_diffusers_model

    return model is not None and Path(model).is_dir() and is_diffusers_model(Path(model))


def _bench_diffusion(args: argparse.Namespace) -> int:
    from .integrations.diffusers_bench import bench_command

    return bench_command(args)


# -- push --------------------------------------------------------------------------------------------------------


def _add_push(sub: Subparsers) -> None:
    p = sub.add_parser(
        "push",
        help="reshard (if needed) and publish a preshard repo on the Hugging Face Hub",
        description="Reshard SOURCE (or reuse its up-to-date store) and publish it as the preshard repo REPO_ID: "
        "the .ts files, the manifest, the configs, a standard model.safetensors.index.json, the tokenizer files "
        "and a model card. from_pretrained(REPO_ID, device_map='tensorstream') then streams it without resharding.",
    )
    p.add_argument("source", help="local model folder, Hub repo id, or a store folder")
    p.add_argument("repo_id", help="the repo to publish to, e.g. me/my-model-tensorstream")
    p.add_argument("--private", action="store_true", help="create the repo private (if it does not exist)")
    p.add_argument("--token", help="Hub token with write access (default: the saved login or HF_TOKEN)")
    p.add_argument("--commit-message", help="message of the upload commit")
    p.add_argument("--storage-path", help="where stores live (default: <HF hub cache>/tensorstream)")
    p.add_argument("--dtype", help="convert floating weights when resharding: bf16, fp16 or fp32")
    p.add_argument("--model-class", help="transformers class to build (default: config.architectures[0])")
    p.add_argument("--tokenizer", help="folder to take the tokenizer files from (default: the source)")
    p.add_argument("--base-model", help="Hub id for the model card's base_model (default: SOURCE if a Hub id)")
    _hub_source_flags(p)
    p.add_argument("--dry-run", action="store_true", help="prepare the repo's files and list them; upload nothing")
    _json_flag(p)
    p.set_defaults(func=_push)


def _push(args: argparse.Namespace) -> int:
    import tempfile

    from .integrations.publish import prepare_repo, push

    options: dict[str, Any] = dict(
        storage_path=args.storage_path,
        dtype=args.dtype,
        model_class=args.model_class,
        tokenizer=args.tokenizer,
        base_model=args.base_model,
        revision=args.revision,
        cache_dir=args.cache_dir,
        local_files_only=args.local_files_only,
        token=args.token,
        progress=not args.json,
    )
    if args.dry_run:
        with tempfile.TemporaryDirectory(prefix="tensorstream-push-") as tmp:
            staged = prepare_repo(args.source, Path(tmp) / "repo", **options)
            files = {p.relative_to(staged).as_posix(): p.stat().st_size for p in staged.rglob("*") if p.is_file()}
            card = (staged / "README.md").read_text(encoding="utf-8")
        result: dict[str, Any] = {
            "repo_id": args.repo_id,
            "dry_run": True,
            "files": dict(sorted(files.items())),
            "total_bytes": sum(files.values()),
            "model_card": card,
        }
        if args.json:
            print(json.dumps(result))
        else:
            for name, size in result["files"].items():
                print(f"{size / 1e6:>10.2f} MB  {name}")
            print(f"dry run: {len(files)} files, {result['total_bytes'] / 1e9:.3f} GB would go to {args.repo_id}")
        return EXIT_OK
    pushed = push(
        args.source, args.repo_id, private=args.private or None, commit_message=args.commit_message, **options
    )
    if args.json:
        print(
            json.dumps(
                {
                    "repo_id": pushed.repo_id,
                    "commit_url": pushed.commit_url,
                    "files": list(pushed.files),
                    "total_bytes": pushed.total_bytes,
                }
            )
        )
    else:
        print(f"pushed {len(pushed.files)} files ({pushed.total_bytes / 1e9:.3f} GB) to {pushed.repo_id}")
        print(f"commit: {pushed.commit_url}")
    return EXIT_OK


# -- pull --------------------------------------------------------------------------------------------------------


def _add_pull(sub: Subparsers) -> None:
    p = sub.add_parser(
        "pull",
        help="download a preshard repo's store into the Hub cache",
        description="Download what streaming the preshard repo REPO_ID needs (the manifest, the .ts files and the "
        "configs) into the Hugging Face cache and print the snapshot folder. Exit code 1 if REPO_ID is not a "
        "preshard repo.",
    )
    p.add_argument("repo_id", help="a preshard repo, e.g. org/my-model-tensorstream")
    p.add_argument("--revision", help="branch, tag or commit")
    p.add_argument("--cache-dir", help="Hugging Face cache folder")
    p.add_argument("--token", help="Hub token (for private or gated repos)")
    p.add_argument("--local-files-only", action="store_true", help="check the cache only; never reach the Hub")
    _json_flag(p)
    p.set_defaults(func=_pull)


def _pull(args: argparse.Namespace) -> int:
    from .integrations.publish import pull
    from .store import Store

    folder = pull(
        args.repo_id,
        revision=args.revision,
        cache_dir=args.cache_dir,
        local_files_only=args.local_files_only,
        token=args.token,
    )
    store = Store.open(folder, verify="off")
    if args.json:
        info = {
            "repo_id": args.repo_id,
            "folder": str(folder),
            "model_class": store.model_class,
            "blocks": len(store.blocks),
            "total_bytes": store.total_bytes,
        }
        print(json.dumps(info))
    else:
        print(f"{args.repo_id}: {store.model_class}, {len(store.blocks)} blocks, {store.total_bytes / 1e9:.3f} GB")
        print(f"folder: {folder}")
    return EXIT_OK


# -- cache -------------------------------------------------------------------------------------------------------


def _add_cache(sub: Subparsers) -> None:
    p = sub.add_parser(
        "cache",
        help="list or remove the stores under a storage root (like `hf cache`)",
        description="List the stores under a storage root with their size, source and last use, and the leftovers "
        "of reshards (lock files, interrupted .partial folders); remove stores or stale leftovers. Nothing outside "
        "the storage root is touched, links are not followed, and entries in use by a running reshard are kept.",
    )
    actions = p.add_subparsers(title="actions", required=True, metavar="ACTION")
    ls = actions.add_parser("ls", help="list stores and leftovers", description="List stores and leftovers.")
    ls.add_argument(
        "storage_path",
        nargs="?",
        help="the storage root (default: $TENSORSTREAM_STORAGE_PATH or <HF hub cache>/tensorstream)",
    )
    _json_flag(ls)
    ls.set_defaults(func=_cache_ls)
    rm = actions.add_parser(
        "rm",
        help="remove stores (by fingerprint) and/or stale leftovers",
        description="Remove the stores named by FINGERPRINT (or its first 4+ characters, or its path), each with its "
        "leftovers, and with --stale every lock file and interrupted reshard no process is using. --dry-run lists "
        "what would go.",
    )
    rm.add_argument("targets", nargs="*", metavar="FINGERPRINT", help="stores to remove")
    rm.add_argument("--storage-path", help="the storage root (default as for `cache ls`)")
    rm.add_argument("--stale", action="store_true", help="also remove stale lock files and interrupted reshards")
    rm.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    _json_flag(rm)
    rm.set_defaults(func=_cache_rm)


def _cache_root(value: str | None) -> Path:
    from .cache import default_root

    return Path(value).expanduser() if value else default_root()


def _cache_ls(args: argparse.Namespace) -> int:
    from .cache import age, scan

    root = _cache_root(args.storage_path)
    entries = scan(root) if root.exists() else []
    if args.json:
        print(json.dumps({"storage_path": str(root), "entries": [e.as_dict() for e in entries]}))
        return EXIT_OK
    if not entries:
        print(f"no stores in {root}")
        return EXIT_OK
    print(f"{'fingerprint':<16}  {'kind':<7}  {'GB':>8}  {'last used':<14}  {'class':<22}  source")
    for e in entries:
        kind = e.kind + ("*" if e.in_use else "")
        what = "DAMAGED (no readable manifest)" if e.damaged else e.source
        print(
            f"{e.fingerprint:<16}  {kind:<7}  {e.size_bytes / 1e9:>8.3f}  {age(e.last_used):<14}  "
            f"{e.model_class or '-':<22}  {what}"
        )
    total = sum(e.size_bytes for e in entries)
    stale = [e for e in entries if e.stale]
    print(f"\n{len([e for e in entries if e.kind == 'store'])} store(s), {total / 1e9:.3f} GB in {root}")
    if any(e.in_use for e in entries):
        print("* in use: a reshard is running")
    if stale:
        print(f"{len(stale)} stale leftover(s): `tensorstream cache rm --stale --storage-path {root}` removes them")
    return EXIT_OK


def _cache_rm(args: argparse.Namespace) -> int:
    from .cache import remove, scan, select

    if not args.targets and not args.stale:
        print(
            "error: name the stores to remove (FINGERPRINT ...) or pass --stale; `tensorstream cache ls` lists them",
            file=sys.stderr,
        )
        return EXIT_USAGE
    root = _cache_root(args.storage_path)
    chosen = select(scan(root), args.targets, stale=args.stale)
    removed = remove(chosen, dry_run=args.dry_run)
    freed = sum(e.size_bytes for e in removed)
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "removed": [e.path for e in removed], "freed_bytes": freed}))
        return EXIT_OK
    verb = "would remove" if args.dry_run else "removed"
    for e in removed:
        print(f"{verb} {e.path} ({e.kind}, {e.size_bytes / 1e9:.3f} GB)")
    print(f"{verb} {len(removed)} entr{'y' if len(removed) == 1 else 'ies'}, {freed / 1e9:.3f} GB")
    return EXIT_OK


#: The subcommands, in the order ``--help`` lists them; each adds its parser (and its ``func``) to ``sub``.
SUBCOMMANDS: list[Callable[[Subparsers], None]] = [
    _add_reshard,
    _add_inspect,
    _add_verify,
    _add_bench,
    _add_push,
    _add_pull,
    _add_cache,
]


if __name__ == "__main__":
    sys.exit(main())
