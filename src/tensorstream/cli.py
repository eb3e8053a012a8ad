"""The ``tensorstream`` command: ``reshard``, ``inspect`` and ``verify`` a store.

Exit codes: 0 success, 1 a tensorstream error (the message says what to do) or a damaged store, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import TensorStreamError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.func(args))
    except TensorStreamError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="tensorstream", description="Stream Hugging Face models from fast storage, block by block."
    )
    parser.add_argument("--version", action="version", version=f"tensorstream {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what tensorstream does (INFO)")
    sub = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "reshard",
        help="reshard a checkpoint into a store of per-block .ts files",
        description="Reshard a model folder or Hub id into STORAGE_PATH/<fingerprint>/ (once).",
    )
    p.add_argument("source", help="local model folder or Hub repo id")
    p.add_argument("storage_path", nargs="?", help="where stores live (default: <HF hub cache>/tensorstream)")
    p.add_argument("--dtype", help="convert floating weights: bf16, fp16 or fp32 (default: keep)")
    p.add_argument("--model-class", help="transformers class to build (default: config.architectures[0])")
    p.add_argument("--force", action="store_true", help="rebuild even if an up-to-date store exists")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    p.add_argument("--cache-dir", help="Hugging Face cache folder")
    p.add_argument("--local-files-only", action="store_true", help="never reach the Hub")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_reshard)

    p = sub.add_parser(
        "inspect",
        help="show a store's blocks, sizes, dtypes and alignment",
        description="Show a store's blocks, sizes, dtypes, alignment and checksums (headers only).",
    )
    p.add_argument("store", help="a store folder (STORAGE_PATH/<fingerprint>)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_inspect)

    p = sub.add_parser(
        "verify",
        help="check every file of a store against its checksum",
        description="Read every .ts file of a store and check it against its checksum. "
        "Exit code 1 when anything is damaged.",
    )
    p.add_argument("store", help="a store folder (STORAGE_PATH/<fingerprint>)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_verify)
    return parser


def _reshard(args: argparse.Namespace) -> int:
    from .reshard import reshard
    from .store import Store

    path = reshard(
        args.source,
        args.storage_path,
        dtype=args.dtype,
        model_class=args.model_class,
        force=args.force,
        revision=args.revision,
        cache_dir=args.cache_dir,
        local_files_only=args.local_files_only,
        progress=not args.json,
    )
    store = Store.open(path, verify="header")
    result = {"store": str(path), "blocks": len(store.blocks), "total_bytes": store.total_bytes}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"store: {path}\nblocks: {len(store.blocks)}, {store.total_bytes / 1e9:.3f} GB")
    return 0


def _rows(store_path: Path) -> tuple[Any, list[dict[str, Any]]]:
    from .format import DATA_ALIGNMENT, TENSOR_ALIGNMENT
    from .store import Store

    store = Store.open(store_path, verify="header")
    rows = []
    for entry in store.entries():
        header = store.header(entry)
        aligned = header.data_offset % DATA_ALIGNMENT == 0 and all(
            info.start % TENSOR_ALIGNMENT == 0 for info in header.tensors.values()
        )
        rows.append(
            {
                "block": entry.name or "(non-block)",
                "file": entry.file,
                "tensors": len(header.tensors),
                "bytes": entry.data_size,
                "dtypes": list(entry.dtypes),
                "aligned": aligned,
                "checksum": entry.checksum,
            }
        )
    return store, rows


def _inspect(args: argparse.Namespace) -> int:
    store, rows = _rows(Path(args.store))
    if args.json:
        print(
            json.dumps(
                {
                    "store": str(store.path),
                    "model_class": store.model_class,
                    "fingerprint": store.fingerprint,
                    "total_bytes": store.total_bytes,
                    "files": rows,
                }
            )
        )
        return 0
    print(
        f"store {store.path}\nmodel {store.model_class}, fingerprint {store.fingerprint}, "
        f"{len(store.blocks)} blocks, {store.total_bytes / 1e9:.3f} GB"
    )
    width = max(len(row["block"]) for row in rows)
    print(f"{'block':<{width}}  {'tensors':>7}  {'MB':>10}  {'dtypes':<12}  {'aligned':<7}  checksum")
    for row in rows:
        print(
            f"{row['block']:<{width}}  {row['tensors']:>7}  {row['bytes'] / 1e6:>10.2f}  "
            f"{','.join(row['dtypes']):<12}  {'yes' if row['aligned'] else 'NO':<7}  {row['checksum']}"
        )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .format import aligned_empty, read_data, verify_buffer
    from .store import Store

    store = Store.open(Path(args.store), verify="off")
    results = []
    for entry in store.entries():
        try:
            header = store.header(entry)
            buffer = aligned_empty(header.data_size)
            read_data(header.path, header, buffer)
            verify_buffer(header, buffer)
            results.append({"file": entry.file, "ok": True, "error": None})
        except (TensorStreamError, OSError) as err:
            results.append({"file": entry.file, "ok": False, "error": str(err)})
    damaged = [r for r in results if not r["ok"]]
    if args.json:
        print(json.dumps({"store": str(store.path), "ok": not damaged, "files": results}))
    else:
        for r in damaged:
            print(f"DAMAGED {r['file']}: {r['error']}")
        print(
            f"{len(results) - len(damaged)}/{len(results)} files ok"
            + ("; rerun `tensorstream reshard --force` on the source to rebuild the store" if damaged else "")
        )
    return 1 if damaged else 0


if __name__ == "__main__":
    sys.exit(main())
