"""Training throughput and the end-to-end demo pipeline.

    python benchmarks/train_step.py step                       # base model, CPU, batch 4
    python benchmarks/train_step.py step --device cuda --bf16  # base model on a GPU, batch 64
    python benchmarks/train_step.py demo                       # tiny model on the synthetic benchmark

``step``: samples/s of one full pretraining step (all five tasks: forward, backward, gradient
clipping, BertAdam) of the paper's base model on random inputs of the real shapes.

``demo``: the laptop pipeline of the ``demo`` profile: the synthetic benchmark, a ``tiny`` model
pretrained on the profile's schedule, then fine-tuned on VQA, GQA and NLVR2; and the same
fine-tunings from scratch (Table 3's "Train + scratch"). Prints the dev metrics of both, the gain
from pretraining and the wall time of each stage. ``--pretrain-epochs``, ``--pretrain-lr``,
``--finetune-epochs``, ``--finetune-lr``, ``--images`` and ``--seed`` change the schedule.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from lxmert_bench.config import TASK_DEFAULTS, DataConfig, OptimConfig, PretrainConfig, RunConfig
from lxmert_bench.model import LxmertConfig, LxmertForPretraining
from lxmert_bench.train.loop import autocast, select_device
from lxmert_bench.train.optim import build_optimizer


def random_batch(config: LxmertConfig, batch: int, device: torch.device, length: int = 20) -> dict:
    g = torch.Generator().manual_seed(0)
    n = config.num_objects

    def labels(high: int, shape: tuple[int, ...], p: float = 0.15) -> torch.Tensor:
        lab = torch.randint(0, high, shape, generator=g)
        return torch.where(torch.rand(shape, generator=g) < p, lab, torch.full_like(lab, -1))

    b = {
        "input_ids": torch.randint(5, config.vocab_size, (batch, length), generator=g),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
        "feats": torch.rand(batch, n, config.visual_feat_dim, generator=g),
        "boxes": torch.rand(batch, n, 4, generator=g).sort(-1).values,
        "masked_lm_labels": labels(config.vocab_size, (batch, length)),
        "matched_label": torch.randint(0, 2, (batch,), generator=g),
        "ans": labels(config.num_qa_labels, (batch,), p=0.5),
        "obj": (torch.randint(0, config.num_object_labels, (batch, n), generator=g), torch.rand(batch, n, generator=g)),
        "attr": (torch.randint(0, config.num_attr_labels, (batch, n), generator=g), torch.rand(batch, n, generator=g)),
        "feat_mask": (torch.rand(batch, n, generator=g) < 0.15).float(),
    }
    b["feat"] = (b["feats"].clone(), b["feat_mask"])
    return {k: tuple(t.to(device) for t in v) if isinstance(v, tuple) else v.to(device) for k, v in b.items()}


def bench_step(preset: str, batch: int, steps: int, device_name: str, bf16: bool) -> dict:
    device = select_device(device_name)
    config = LxmertConfig.preset(preset)
    model = LxmertForPretraining(config).to(device).train()
    opt, sched = build_optimizer(model.parameters(), OptimConfig(lr=1e-4), t_total=10**6)
    data = random_batch(config, batch, device)
    precision = "bf16" if bf16 else "fp32"

    def step() -> float:
        sched.step()
        with autocast(device, precision):
            out = model(data["input_ids"], data["attention_mask"], data["feats"], data["boxes"],
                        masked_lm_labels=data["masked_lm_labels"], matched_label=data["matched_label"],
                        obj_labels={k: data[k] for k in ("obj", "attr", "feat")}, ans=data["ans"])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(out["loss"].detach())  # a host sync, as the loop's NaN check does

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):  # warm-up (allocator, kernels)
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    return {"what": "pretraining step (all tasks)", "preset": preset, "params": params,
            "device": str(device), "precision": precision, "threads": torch.get_num_threads(),
            "batch": batch, "steps": steps, "s_per_step": round(dt / steps, 4),
            "samples_per_s": round(batch * steps / dt, 2),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


# ---------------------------------------------------------------------------------------------
def demo_schedule() -> dict[str, float]:
    """The demo profile's schedules (profiles/demo.yaml), so this benchmark times what it runs."""
    from lxmert_bench.spec import load_profile

    o = load_profile("demo").overrides
    return {"pretrain_epochs": o["pretrain.optim.epochs"], "pretrain_lr": o["pretrain.optim.lr"],
            "pretrain_batch": o["pretrain.optim.batch_size"], "images": o["data.synthetic_images"],
            "finetune_epochs": o["finetune.optim.epochs"], "finetune_lr": o["finetune.optim.lr"],
            "finetune_batch": o["finetune.optim.batch_size"]}


def demo(workdir: Path, device: str, seed: int = 0, **schedule: float) -> dict:
    """Pretraining then VQA / GQA / NLVR2 fine-tuning, and the same fine-tunings from scratch
    (Table 3's "Train + scratch"), on the demo profile's schedule unless ``schedule`` says otherwise."""
    from lxmert_bench.data.root import ensure_data_root
    from lxmert_bench.plan import synthetic_name
    from lxmert_bench.store import RunDir
    from lxmert_bench.train.stages import run_stage

    sched = {**demo_schedule(), **{k: v for k, v in schedule.items() if v is not None}}
    images = int(sched["images"])

    data = DataConfig(synthetic=True, synthetic_images=images)
    data = replace(data, root=str(workdir / "data" / synthetic_name(data)))
    model = LxmertConfig.preset("tiny")
    common = dict(model=model, data=data, log_every=10, checkpoint_every=200, device=device)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ensure_data_root(data)
    timings["data"] = time.perf_counter() - t0

    def stage(name: str, cfg: RunConfig) -> dict:
        rd = RunDir(workdir, cfg.stage_id)
        rd.write_config(cfg)
        t = time.perf_counter()
        result = run_stage(rd)
        timings[name] = time.perf_counter() - t
        print(f"{name}: {json.dumps(result['metrics'])} ({result['steps']} steps, "
              f"{timings[name]:.1f} s)", file=sys.stderr, flush=True)
        return result

    pre = RunConfig(kind="pretrain", seed=seed, pretrain=PretrainConfig(optim=OptimConfig(
        batch_size=int(sched["pretrain_batch"]), epochs=int(sched["pretrain_epochs"]),
        lr=sched["pretrain_lr"])), **common)
    pre_result = stage("pretrain", pre)
    results: dict = {"pretrain": {"steps": pre_result["steps"], "metrics": pre_result["metrics"]}}
    for task in ("vqa", "gqa", "nlvr2"):
        ft = replace(TASK_DEFAULTS[task], optim=replace(
            TASK_DEFAULTS[task].optim, batch_size=int(sched["finetune_batch"]),
            epochs=int(sched["finetune_epochs"]), lr=sched["finetune_lr"]))
        with_pre = stage(f"{task} (pretrained)", RunConfig(kind="finetune", seed=seed, finetune=ft,
                                                           init_from=pre.stage_id, **common))
        scratch = stage(f"{task} (scratch)", RunConfig(
            kind="finetune", seed=seed, finetune=replace(ft, load_qa_head=False), **common))
        results[task] = {"pretrained": with_pre["metrics"], "scratch": scratch["metrics"],
                         "gain": round(with_pre["metrics"]["accuracy"]
                                       - scratch["metrics"]["accuracy"], 2),
                         "steps": with_pre["steps"]}
    pipeline = timings["data"] + timings["pretrain"] + sum(
        v for k, v in timings.items() if k.endswith("(pretrained)"))
    return {"what": "demo pipeline (tiny model, synthetic benchmark)", "schedule": sched,
            "seed": seed,
            "results": results, "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "pipeline_s": round(pipeline, 1), "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["step", "demo"])
    ap.add_argument("--preset", default="base")
    ap.add_argument("--batch", type=int, default=None, help="default: 4 on CPU, 64 on GPU")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (the GPU default)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workdir", default="benchmarks/.demo", help="demo: run directories and data")
    ap.add_argument("--seed", type=int, default=0, help="demo: seed of every stage")
    for key, kind in (("images", int), ("pretrain_epochs", int), ("pretrain_lr", float),
                      ("finetune_epochs", int), ("finetune_lr", float)):
        ap.add_argument(f"--{key.replace('_', '-')}", type=kind, default=None,
                        help="demo: overrides the demo profile's value")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "step":
        batch = args.batch or (64 if args.device.startswith("cuda") else 4)
        out = bench_step(args.preset, batch, args.steps, args.device, args.bf16)
    else:
        out = demo(Path(args.workdir), args.device, args.seed, images=args.images,
                   pretrain_epochs=args.pretrain_epochs, pretrain_lr=args.pretrain_lr,
                   finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
