"""One full LXMERT pretraining step, ours vs ``transformers.LxmertForPreTraining``.

A step = forward with all five tasks (MLM, matching, obj / attr / feat, QA), backward and an
optimizer step (ours: our stages' BertAdam, fused; HF: torch's AdamW; ``--ours-optimizer adamw``
gives both the same AdamW, comparing the models alone), on the BASE config (768 hidden, 9/5/5
layers, 20 tokens, 36 objects) with dropout on. Both models hold the same weights (HF's random
init copied into ours with ``load_weights``) and see the same batch. After a warm-up the steps are
interleaved (ours, HF, ours, HF, ...) in one process, so load from other processes hits both alike;
the medians give samples/s and the ratio. On CUDA it also prints our step's model FLOP utilisation
(FLOPs of one forward + backward counted by ``torch.utils.flop_counter``, over the median step time
and the H100 SXM dense peak: bf16 989 TFLOP/s; fp32 494 with TF32 matmuls, else 67).

How to run (from the repository root)::

    python benchmarks/model_throughput.py --device cpu --batch 8 --steps 4
    python benchmarks/model_throughput.py --device cpu --batch 8 --steps 4 --compile
    python benchmarks/model_throughput.py --device cuda --batch 64 --steps 20 --bf16 --compile --json out.json
    python benchmarks/model_throughput.py --device cuda --batch 64 --steps 20 --tf32

``--preset tiny`` or ``test`` gives a quick smoke run. Needs ``transformers`` (a test dependency).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from lxmert_bench.model import LxmertConfig, LxmertForPretraining, load_weights
from lxmert_bench.model.weights import hf_config
from lxmert_bench.train.optim import BertAdam

# Dense peak of one H100 SXM, TFLOP/s.
H100_PEAK_TFLOPS = {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}
Batch = dict[str, Any]


def make_batch(config: LxmertConfig, batch: int, length: int, objects: int, device: torch.device,
               seed: int = 0) -> Batch:
    """A pretraining batch as the data pipeline makes it: padded text, 15% masked words and objects,
    half the pairs mismatched (their QA answer ignored); official -1 ignore labels."""
    g = torch.Generator().manual_seed(seed)
    low = 1000 if config.vocab_size > 2000 else 1  # BERT's vocabulary: skip [unused] / specials
    ids = torch.randint(low, config.vocab_size, (batch, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    mlm = torch.where((torch.rand(batch, length, generator=g) < 0.15) & mask.bool(), ids, -1)
    mlm[:, 1] = ids[:, 1]  # at least one labelled word per sentence
    xy = torch.rand(batch, objects, 2, generator=g) * 0.5
    feat_mask = (torch.rand(batch, objects, generator=g) < 0.15).float()
    matched = torch.randint(0, 2, (batch,), generator=g)
    b = {
        "input_ids": ids, "attention_mask": mask,
        "feats": torch.rand(batch, objects, config.visual_feat_dim, generator=g),
        "boxes": torch.cat([xy, xy + torch.rand(batch, objects, 2, generator=g) * 0.5], -1),
        "masked_lm_labels": mlm, "matched_label": matched,
        "ans": torch.where(matched.bool(), torch.randint(0, config.num_qa_labels, (batch,), generator=g), -1),
        "obj": (torch.randint(0, config.num_object_labels, (batch, objects), generator=g),
                torch.rand(batch, objects, generator=g)),
        "attr": (torch.randint(0, config.num_attr_labels, (batch, objects), generator=g),
                 torch.rand(batch, objects, generator=g)),
        "feat_mask": feat_mask,
    }
    return {k: (tuple(t.to(device) for t in v) if isinstance(v, tuple) else v.to(device))
            for k, v in b.items()}


def obj_labels(b: Batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    # feature regression targets the input features of the masked objects
    return {"obj": b["obj"], "attr": b["attr"], "feat": (b["feats"], b["feat_mask"])}


def ours_loss(model: torch.nn.Module, b: Batch) -> torch.Tensor:
    return model(b["input_ids"], b["attention_mask"], b["feats"], b["boxes"],
                 masked_lm_labels=b["masked_lm_labels"], obj_labels=obj_labels(b),
                 matched_label=b["matched_label"], ans=b["ans"])["loss"]


def hf_loss(model: torch.nn.Module, b: Batch) -> torch.Tensor:
    # HF ignores -100 where the official code uses -1
    return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], visual_feats=b["feats"],
                 visual_pos=b["boxes"], labels=b["masked_lm_labels"].masked_fill(b["masked_lm_labels"] < 0, -100),
                 obj_labels=obj_labels(b), matched_label=b["matched_label"],
                 ans=b["ans"].masked_fill(b["ans"] < 0, -100)).loss


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def make_step(model: torch.nn.Module, loss_fn: Callable, b: Batch, optimizer: torch.optim.Optimizer,
              device: torch.device, bf16: bool) -> Callable[[], float]:
    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, bf16):
            loss = loss_fn(model, b)
        loss.backward()
        optimizer.step()
        return loss.item()  # synchronises on CUDA
    return step


def timed(step: Callable[[], float], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def step_flops(model: torch.nn.Module, b: Batch, device: torch.device, bf16: bool) -> int:
    """FLOPs of one forward + backward of our step (matmuls and attention)."""
    counter = FlopCounterMode(display=False)
    with counter, autocast(device, bf16):
        ours_loss(model, b).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default="base", help="model preset (base = the paper's model)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per model first (more with --compile)")
    p.add_argument("--seq-len", type=int, default=20)
    p.add_argument("--objects", type=int, default=36)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for both models")
    p.add_argument("--compile", action="store_true", help="torch.compile our model")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode (e.g. max-autotune-no-cudagraphs, reduce-overhead)")
    p.add_argument("--ours-optimizer", default="bertadam", choices=["bertadam", "adamw"],
                   help="bertadam: our stages' optimizer (fused); adamw: the same foreach AdamW as HF's side")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (CUDA fp32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    import transformers  # test-only dependency

    config = LxmertConfig.preset(args.preset)
    torch.manual_seed(0)
    hf = transformers.LxmertForPreTraining(hf_config(config)).to(device)
    ours = LxmertForPretraining(config).to(device)
    load_weights(ours, hf.state_dict(), strict=True)
    b = make_batch(config, args.batch, args.seq_len, args.objects, device)

    # Sanity: same weights and batch give the same loss (dropout off).
    ours.eval(), hf.eval()
    with torch.no_grad():
        loss_diff = abs(ours_loss(ours, b).item() - hf_loss(hf, b).item())
    ours.train(), hf.train()
    if args.compile:
        ours.sparse_mlm = False  # static shapes: no boolean indexing inside the compiled graph
    flops = step_flops(ours, b, device, args.bf16)  # of the step that is timed (dense MLM if compiled)

    runner = torch.compile(ours, mode=args.compile_mode) if args.compile else ours
    opt = dict(lr=1e-4, weight_decay=0.01, eps=1e-6)
    # HF ships no optimizer: its side gets torch's default (foreach) AdamW. Ours gets what our
    # stages train with (BertAdam, fused), or with --ours-optimizer adamw the same AdamW as HF.
    ours_opt = (BertAdam(ours.parameters(), **opt) if args.ours_optimizer == "bertadam"
                else torch.optim.AdamW(ours.parameters(), **opt))
    steps = {
        "ours": make_step(runner, ours_loss, b, ours_opt, device, args.bf16),
        "hf": make_step(hf, hf_loss, b, torch.optim.AdamW(hf.parameters(), **opt), device, args.bf16),
    }
    warm_start = time.perf_counter()
    for _ in range(args.warmup + (2 if args.compile else 0)):  # compile + recompiles happen here
        for step in steps.values():
            step()
    warmup_s = time.perf_counter() - warm_start
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            times[name].append(timed(step, device))

    median = {name: statistics.median(t) for name, t in times.items()}
    result: dict[str, Any] = {
        "device": str(device), "device_name": torch.cuda.get_device_name() if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "preset": args.preset, "batch": args.batch, "seq_len": args.seq_len, "objects": args.objects,
        "bf16": args.bf16, "compile": args.compile, "ours_optimizer": args.ours_optimizer, "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "threads": torch.get_num_threads(), "steps": args.steps, "warmup_s": round(warmup_s, 2),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "eval_loss_diff": loss_diff,
        "step_s": {name: [round(t, 4) for t in ts] for name, ts in times.items()},
        "median_step_s": {name: round(t, 4) for name, t in median.items()},
        "samples_per_s": {name: round(args.batch / t, 3) for name, t in median.items()},
        "ratio_ours_over_hf": round(median["hf"] / median["ours"], 3),
        "gflop_per_step": round(flops / 1e9, 2),
        "ours_tflops": round(flops / median["ours"] / 1e12, 4),
    }
    if device.type == "cuda":
        precision = "bf16" if args.bf16 else ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
        result["mfu_precision"] = precision
        result["mfu_peak_tflops"] = H100_PEAK_TFLOPS[precision]
        result["mfu"] = round(result["ours_tflops"] / H100_PEAK_TFLOPS[precision], 4)

    print(f"device={result['device']} ({result['device_name']}) preset={args.preset} batch={args.batch} "
          f"L={args.seq_len} objects={args.objects} bf16={args.bf16} compile={args.compile} "
          f"optimizers ours={args.ours_optimizer} hf=adamw "
          f"threads={result['threads']}")
    print(f"eval-mode loss difference ours vs HF: {loss_diff:.2e}")
    for name in steps:
        runs = ", ".join(f"{t:.3f}" for t in times[name])
        print(f"{name:>5}: {result['samples_per_s'][name]:9.2f} samples/s  (median step {median[name]:.3f} s;"
              f" steps {runs})")
    print(f"ratio ours / HF: {result['ratio_ours_over_hf']:.2f}x")
    print(f"our step: {result['gflop_per_step']:.1f} GFLOP (forward + backward), "
          f"{result['ours_tflops']:.3f} TFLOP/s")
    if "mfu" in result:
        print(f"MFU ({result['mfu_precision']}, H100 SXM peak {result['mfu_peak_tflops']:.0f} TFLOP/s): "
              f"{100 * result['mfu']:.1f}%")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
