"""The quantized matmul kernels a quantized store binds, against the bf16 matmul, at decode shapes.

An ``int8`` / ``int4`` store computes with the compact weights through PyTorch's quantized matmuls
(``torch.ops.aten._weight_int8pack_mm`` on CPU, per output channel only; ``_weight_int4pack_mm_for_cpu`` /
``_weight_int4pack_mm`` on CUDA, group-wise) instead of expanding each block to bf16 (the first layout of these
stores, issue 12: 2.75 ms for int8 and 7.26 ms for int4 per 4096 x 4096 weight on this machine). This times, for a
``rows x cols`` weight and a batch of activations on ``--device``:

* ``bf16 matmul``: the resident model's cost;
* ``copy bf16``: what streaming a plain block costs on top when the bytes are in memory (a copy into the slot);
* ``int8pack_mm`` / ``int4pack_mm``: the quantized kernels, when this torch has them on this device;
* on the CPU, the linears an ``int8`` / ``int4`` store binds (`tensorstream.compact`: ``Int8PackedTensor`` on
  ``_weight_int8pack_mm``, torchao's ``Int4OpaqueTensor`` on ``_weight_int4pack_mm_for_cpu``) and torchao's own
  int8 weight-only linear (``Int8Tensor``: the int8 matrix converted at every call, then the bf16 matmul).

``--batch`` above 1 shows prefill-sized calls (``--batch 128``: the quantized kernels lose to the bf16 matmul there).

Usage::

    python benchmarks/quantized_matmul.py --device cpu --out benchmarks/results/quantized-matmul-cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def timed(fn: Callable[[], Any], device: torch.device, repeat: int) -> float:
    """Median milliseconds of ``fn`` over ``repeat`` calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    weight = (torch.randn(args.rows, args.cols) * 0.02).to(torch.bfloat16)
    x = torch.randn(args.batch, args.cols, dtype=torch.bfloat16, device=device)
    w = weight.to(device)
    out = torch.empty_like(w)
    figures: dict[str, float] = {
        "bf16 matmul": timed(lambda: x @ w.T, device, args.repeat),
        "copy bf16": timed(lambda: out.copy_(w), device, args.repeat),
    }
    q = torch.randint(-127, 128, (args.rows, args.cols), dtype=torch.int8, device=device)
    scales = torch.rand(args.rows, dtype=torch.bfloat16, device=device)
    try:
        figures["int8pack_mm"] = timed(lambda: torch.ops.aten._weight_int8pack_mm(x, q, scales), device, args.repeat)
    except (RuntimeError, NotImplementedError) as err:
        print(f"int8pack_mm: not available here ({str(err).splitlines()[0]})")
    try:
        values = torch.randint(0, 16, (args.rows, args.cols), dtype=torch.int32, device=device)
        group = 64
        zeros = torch.rand(args.cols // group, args.rows, 2, dtype=torch.bfloat16, device=device)
        if device.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
            kernel = torch.ops.aten._weight_int4pack_mm_for_cpu
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack(
                (values[:, ::2] << 4 | values[:, 1::2]).to(torch.uint8), 8
            )
            kernel = torch.ops.aten._weight_int4pack_mm
        figures["int4pack_mm"] = timed(lambda: kernel(x, packed, group, zeros), device, args.repeat)
    except (RuntimeError, NotImplementedError) as err:
        print(f"int4pack_mm: not available here ({str(err).splitlines()[0]})")
    if device.type == "cpu":  # the linears a quantized store binds, and torchao's own int8 weight-only linear
        from torchao.quantization import Int8Tensor, PerRow

        from tensorstream.compact import quantize_weight

        functional = torch.nn.functional
        torchao_int8 = Int8Tensor.from_hp(weight, PerRow())
        figures["torchao Int8Tensor linear"] = timed(lambda: functional.linear(x, torchao_int8), device, args.repeat)
        for kind, label in (("int8", "int8 store linear (Int8PackedTensor)"), ("int4", "int4 store linear (opaque)")):
            bound = quantize_weight(weight, kind)
            figures[label] = timed(lambda: functional.linear(x, bound), device, args.repeat)  # noqa: B023
    for name, ms in figures.items():
        print(f"{name:<36} {ms:8.3f} ms")
    if args.out:
        info = {
            "device": str(device),
            "torch": torch.__version__,
            "shape": [args.rows, args.cols],
            "batch": args.batch,
        }
        Path(args.out).write_text(json.dumps({**info, "ms": figures}, indent=1))


if __name__ == "__main__":
    main()
