"""Page cache -> GPU: the two ways to move a warm ``.ts`` store's blocks into device memory, measured side by side.

1. **pread + pinned staging** (what `tensorstream.slots.CudaSlots` does today): ``threads`` readers each
   ``preadv`` a request into their own page-aligned pinned buffer (double-buffered), then enqueue
   ``copy_(non_blocking=True)`` on their own CUDA stream; a buffer is reused once its copy's event completed.
   The CPU copies the bytes once (page cache -> pinned), the DMA engine once more (pinned -> device).
2. **registered mapping** (zero CPU copy): each block file is mapped read-only (``PROT_READ``, ``MAP_SHARED``: the
   page cache's own pages), registered with ``cudaHostRegister(..., cudaHostRegisterReadOnly)`` so the DMA engine
   reads the page cache directly, copied with ``cudaMemcpyAsync`` (torch ``copy_`` from a tensor over the mapping),
   then unregistered. Variants: register/unregister per block and per pass (``per-pass``), or register every block
   once and keep it (``kept``: the pages are pinned, the kernel can no longer reclaim them).
   ``cudaHostRegisterReadOnly`` is required: registering a private writable mapping would make the kernel break
   copy-on-write on every page (a copy, the thing this avoids). Devices without
   ``cudaDevAttrHostRegisterReadOnlySupported`` skip this path.

Each path runs ``--passes`` passes over all block files after one warm-up pass (the files are read once first so
they sit in the page cache), and reports GB/s per pass (median). The bytes that arrive are checked against the
file (a checksum of the device copy of one block per path), so a fast wrong path cannot win.

NOT RUN: written on a machine without a GPU. ``scripts/gpu_check.sh`` runs it after ``gpu_bench.py`` (whose
standard store it reuses). Usage::

    python benchmarks/h2d_paths.py [--store STORE_FOLDER] [--threads 1 2 4 8] [--passes 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

REQUEST = 16 << 20
CUDA_HOST_REGISTER_READ_ONLY = 0x08  # cudaHostRegisterReadOnly
CUDA_DEV_ATTR_HOST_REGISTER_READ_ONLY_SUPPORTED = 113  # cudaDevAttrHostRegisterReadOnlySupported


def find_store(explicit: Path | None) -> Path:
    if explicit is not None:
        return explicit
    stores = sorted(Path("/tmp/tensorstream-gpu-bench/stores").glob("*/tensorstream.json"))
    if not stores:
        raise SystemExit("no store found: run benchmarks/gpu_bench.py first or pass --store")
    return stores[0].parent


def block_files(store: Path) -> list[tuple[Path, int, int]]:
    """(file, data offset, data size) of every block file of the store."""
    from tensorstream.format import read_ts_header

    files = []
    for path in sorted((store / "blocks").glob("*.ts.safetensors")):
        header = read_ts_header(path)
        files.append((path, header.data_offset, header.data_size))
    return files


def warm(files: list[tuple[Path, int, int]]) -> None:
    for path, _, _ in files:
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass


def pread_staging(files: list[tuple[Path, int, int]], device: torch.device, threads: int, slot: torch.Tensor) -> float:
    """One pass: readers pread into pinned buffers and copy to ``slot`` on their own streams; returns seconds."""
    from tensorstream.format import aligned_empty

    jobs = [(path, off + start, start, min(REQUEST, size - start)) for path, off, size in files
            for start in range(0, size, REQUEST)]  # fmt: skip
    jobs.reverse()
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            stream = torch.cuda.Stream(device=device)
            buffers = [aligned_empty(REQUEST, pin_memory=True) for _ in range(2)]
            views = [b.numpy().data.cast("B") for b in buffers]
            events: list[torch.cuda.Event | None] = [None, None]
            fds: dict[Path, int] = {}
            turn = 0
            while True:
                with lock:
                    if not jobs:
                        break
                    path, offset, start, length = jobs.pop()
                if events[turn] is not None:
                    events[turn].synchronize()  # the copy out of this buffer is done
                fd = fds.get(path)
                if fd is None:
                    fd = fds[path] = os.open(path, os.O_RDONLY)
                n = os.preadv(fd, [views[turn][:length]], offset)
                assert n == length, (path, offset, n, length)
                with torch.cuda.stream(stream):
                    # every block lands at the start of the slot (the size of the largest block)
                    slot[start : start + length].copy_(buffers[turn][:length], non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(stream)
                events[turn] = event
                turn ^= 1
            stream.synchronize()
            for fd in fds.values():
                os.close(fd)
        except BaseException as err:
            errors.append(err)

    torch.cuda.synchronize(device)
    begin = time.perf_counter()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    torch.cuda.synchronize(device)
    if errors:
        raise errors[0]
    return time.perf_counter() - begin


class Registered:
    """A read-only shared mapping of one file, registered with CUDA (read-only) while open."""

    def __init__(self, path: Path, offset: int, size: int) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.map = mmap.mmap(self.fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        with warnings.catch_warnings():  # a read-only buffer: torch warns that it is not writable; we never write
            warnings.simplefilter("ignore")
            whole = torch.frombuffer(self.map, dtype=torch.uint8)
        self.data = whole[offset : offset + size]
        self.base = whole.data_ptr()
        self.length = -(-len(self.map) // mmap.PAGESIZE) * mmap.PAGESIZE  # the mapping's pages, whole
        self.registered = False

    def register(self) -> None:
        err = torch.cuda.cudart().cudaHostRegister(self.base, self.length, CUDA_HOST_REGISTER_READ_ONLY)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister failed: {err}")
        self.registered = True

    def unregister(self) -> None:
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.base)
            self.registered = False

    def close(self) -> None:
        self.unregister()
        self.data = None  # type: ignore[assignment]
        try:
            self.map.close()
        except BufferError:
            pass
        os.close(self.fd)


def registered_pass(maps: list[Registered], device: torch.device, slot: torch.Tensor, keep: bool) -> float:
    stream = torch.cuda.Stream(device=device)
    torch.cuda.synchronize(device)
    begin = time.perf_counter()
    with torch.cuda.stream(stream):
        for m in maps:
            if not keep:
                m.register()
            slot[: m.data.numel()].copy_(m.data, non_blocking=True)
            if not keep:
                stream.synchronize()  # the DMA must be done before the pages are unpinned
                m.unregister()
    stream.synchronize()
    return time.perf_counter() - begin


def check(slot: torch.Tensor, path: Path, offset: int, size: int) -> bool:
    with open(path, "rb") as f:
        f.seek(offset)
        expected = torch.frombuffer(bytearray(f.read(size)), dtype=torch.uint8)
    return bool(torch.equal(slot[:size].cpu(), expected))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("gpu-check-out"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    device = torch.device("cuda", 0)
    files = block_files(find_store(args.store))
    total = sum(size for _, _, size in files)
    slot = torch.empty(max(size for _, _, size in files), dtype=torch.uint8, device=device)
    warm(files)
    report: dict[str, object] = {"gpu": torch.cuda.get_device_name(0), "bytes_per_pass": total, "paths": {}}
    paths: dict[str, object] = report["paths"]  # type: ignore[assignment]
    last_path, last_off, last_size = files[-1]

    for threads in args.threads:
        pread_staging(files, device, threads, slot)  # warm-up (pinned allocations, streams)
        seconds = [pread_staging(files, device, threads, slot) for _ in range(args.passes)]
        pread_staging(files[-1:], device, threads, slot)  # the last block alone, so the slot holds it whole
        paths[f"pread+pinned, {threads} threads"] = {
            "gb_per_s": total / statistics.median(seconds) / 1e9, "seconds": seconds,
            "correct": check(slot, last_path, last_off, last_size),
        }  # fmt: skip

    try:  # torch's cudart bindings may not expose the attribute query; cupy does
        import cupy  # type: ignore[import-not-found]

        read_only = int(cupy.cuda.runtime.deviceGetAttribute(CUDA_DEV_ATTR_HOST_REGISTER_READ_ONLY_SUPPORTED, 0))
    except Exception as err:
        print(f"cannot query cudaDevAttrHostRegisterReadOnlySupported ({err}); trying anyway")
        read_only = 1
    if not read_only:
        paths["registered mapping"] = {"error": "cudaHostRegisterReadOnly is not supported on this device"}
    else:
        maps = [Registered(path, off, size) for path, off, size in files]
        try:
            for keep in (False, True):
                label = "registered mapping, " + ("kept registered" if keep else "register per block per pass")
                try:
                    if keep:
                        for m in maps:
                            m.register()
                    registered_pass(maps, device, slot, keep)  # warm-up
                    pinned = maps[-1].data.is_pinned()
                    seconds = [registered_pass(maps, device, slot, keep) for _ in range(args.passes)]
                    paths[label] = {
                        "gb_per_s": total / statistics.median(seconds) / 1e9, "seconds": seconds,
                        "torch_sees_pinned": pinned, "correct": check(slot, last_path, last_off, last_size),
                    }  # fmt: skip
                except Exception as err:
                    paths[label] = {"error": repr(err)}
        finally:
            for m in maps:
                m.close()

    for label, figures in paths.items():
        print(f"{label:<55} {figures}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "h2d_paths.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
