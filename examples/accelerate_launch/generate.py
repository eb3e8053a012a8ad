"""Every rank of an ``accelerate launch`` (or ``torchrun``) job streams the model into its own device.

Run (two GPUs, or two CPU processes with gloo on a machine without GPUs)::

    TENSORSTREAM_STORAGE_PATH=/nvme/tensorstream TENSORSTREAM_BUDGET_GB=8 \\
        accelerate launch --config_file examples/accelerate_launch/accelerate_config.yaml \\
        examples/accelerate_launch/generate.py --model org/some-model

    torchrun --nproc-per-node 2 examples/accelerate_launch/generate.py --model org/some-model

``from_pretrained(..., device_map="tensorstream")`` is called without a config: every rank reads its settings
from the ``TENSORSTREAM_*`` variables the launcher copied to it, and its device is ``cuda:$LOCAL_RANK`` (or
``cpu``). The first rank to arrive reshards into the shared store under a file lock while the others wait; then
they all stream from it. The model is not passed to ``Accelerator.prepare``, which refuses device-mapped models
in distributed mode: each rank simply runs its share of the prompts.

Without ``--model``, rank 0 first builds a tiny random Llama in ``--workdir``. With ``--check`` (small models
only) each rank also loads the model fully resident and checks that its logits and greedy generations are
identical. Each rank writes ``rank<N>.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import tensorstream


class ReshardLog(logging.Handler):
    """Records whether this process found the store already written (or waited for another rank to write it)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.reused = False

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "reusing" in message or "nothing to reshard" in message or "waiting for it" in message:
            self.reused = True


def build_tiny_llama(folder: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder or Hub id (default: a tiny random Llama built in --workdir)")
    parser.add_argument("--workdir", default=".accelerate_launch", help="where the tiny model is built")
    parser.add_argument("--out", help="folder for rank<N>.json (default: <workdir>/results)")
    parser.add_argument("--tokens", type=int, default=8, help="tokens to generate per prompt")
    parser.add_argument("--check", action="store_true", help="compare with the fully resident model")
    args = parser.parse_args()

    state = PartialState(cpu=not torch.cuda.is_available())  # gloo on CPU, nccl on GPUs
    rank = state.process_index
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(message)s")
    logging.getLogger("tensorstream").setLevel(logging.INFO)
    reshard_log = ReshardLog()
    logging.getLogger("tensorstream.reshard").addHandler(reshard_log)
    log = logging.getLogger("generate")
    log.setLevel(logging.INFO)

    workdir = Path(args.workdir)
    model_path: str | Path = args.model or workdir / "tiny-llama"
    if args.model is None:
        if state.is_main_process and not (workdir / "tiny-llama" / "config.json").exists():
            build_tiny_llama(workdir / "tiny-llama")
        state.wait_for_everyone()

    config = tensorstream.Config.from_env()  # only to report the settings; from_pretrained reads them itself
    log.info(
        "world size %d, device %s, budget %s GB, store %s",
        state.num_processes,
        config.execution_device,
        config.budget_gb,
        config.store_root,
    )
    model = AutoModelForCausalLM.from_pretrained(model_path, device_map="tensorstream")
    log.info("%s the store", "reused" if reshard_log.reused else "resharded")

    device = config.execution_device
    prompt = torch.tensor([[1, 10 + rank, 20, 30 + rank, 40]], device=device)  # each rank has its own prompt
    with torch.inference_mode():
        logits = model(prompt).logits
        tokens = model.generate(prompt, max_new_tokens=args.tokens, do_sample=False)
    stats = tensorstream.stats(model)
    log.info("generated %s; %s", tokens[0].tolist(), stats)

    result: dict[str, object] = {
        "rank": rank,
        "world_size": state.num_processes,
        "device": str(device),
        "resharded": not reshard_log.reused,
        "tokens": tokens[0].tolist(),
        "bytes_read": stats.bytes_read,
        "streamed_blocks": stats.streamed_blocks,
    }
    if args.check:
        reference = AutoModelForCausalLM.from_pretrained(model_path).to(device)
        with torch.inference_mode():
            result["logits_equal"] = torch.equal(reference(prompt).logits, logits)
            expected = reference.generate(prompt, max_new_tokens=args.tokens, do_sample=False)
            result["generate_equal"] = torch.equal(expected, tokens)
        log.info(
            "identical to the resident model: logits %s, generate %s",
            *map(result.get, ("logits_equal", "generate_equal")),
        )
    out = Path(args.out) if args.out else workdir / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    state.wait_for_everyone()
    if state.is_main_process:
        log.info("all %d ranks done; results in %s", state.num_processes, out)
    ok = result.get("logits_equal", True) and result.get("generate_equal", True)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
