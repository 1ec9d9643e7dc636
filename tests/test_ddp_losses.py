"""DDP equals one process (issue 12): the token-averaged pretraining losses (MLM over labelled
words, QA over labelled answers) are normalised by the GLOBAL count of labels, so two gloo ranks
holding halves of a global batch give the losses and gradients of one process holding all of it.

The ranks follow the training loop's contract (train/loop.py): each backpropagates its loss x
share x world (share = its examples / the global batch's) and DDP averages the gradients; the
logged loss is the all-reduced sum of loss x share.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _helpers import free_port, synthetic_data

from lxmert_bench.config import DataConfig, PretrainConfig
from lxmert_bench.data.root import ensure_data_root
from lxmert_bench.data.tasks import PretrainCorpus
from lxmert_bench.model import LxmertConfig, LxmertForPretraining
from lxmert_bench.train.common import load_tokenizer
from lxmert_bench.train.loop import TRAIN_STREAM, example_rng
from lxmert_bench.train.pretrain import make_examples, pretrain_forward, pretrain_train_forward

SPLITS = ("mscoco_train", "mscoco_nominival", "vgnococo")
GLOBAL_BATCH = 16
P = PretrainConfig()  # all five tasks, QA from the start
NAMES = ("mlm", "matched", "obj", "attr", "feat", "qa")


def model_config(num_answers: int) -> LxmertConfig:
    return LxmertConfig.preset("test", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                               num_qa_labels=num_answers)


def global_batch(root: str) -> tuple[dict[str, torch.Tensor], int]:
    data = DataConfig(root=root)
    corpus = PretrainCorpus(root, SPLITS)
    examples = make_examples(P, corpus, load_tokenizer(data), 0)
    items = [examples.example(i, 0, example_rng(3, TRAIN_STREAM, 0, i)) for i in range(GLOBAL_BATCH)]
    return examples.collate(items), len(corpus.answer_table)


def new_model(num_answers: int) -> LxmertForPretraining:
    torch.manual_seed(0)
    return LxmertForPretraining(model_config(num_answers), num_answers=num_answers)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _rank(rank: int, world: int, port: int, root: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        batch, num_answers = global_batch(root)
        local = {k: v[rank::world] for k, v in batch.items()}
        share = local["input_ids"].shape[0] / GLOBAL_BATCH
        result = {}
        for name, forward in (("global", pretrain_train_forward), ("per_rank", pretrain_forward)):
            model = torch.nn.parallel.DistributedDataParallel(new_model(num_answers),
                                                              find_unused_parameters=True)
            out = forward(model, local, P, True, 1.0)
            (out["loss"] * (share * world)).backward()
            values = torch.stack([out["losses"][k].detach() for k in NAMES]) * share
            dist.all_reduce(values)
            result[name] = {"losses": dict(zip(NAMES, values.tolist())),
                            "grads": grads(model.module)}
        if rank == 0:
            torch.save(result, Path(out_dir) / "two.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return synthetic_data(tmp_path_factory).root


def test_two_gloo_ranks_give_the_losses_and_gradients_of_one_process(root, tmp_path, one_thread):
    batch, num_answers = global_batch(root)
    labels = batch["masked_lm_labels"] != -1
    answers = batch["ans"] != -1
    # the halves differ in labelled words and answers, else per-rank means would agree anyway
    assert labels[0::2].sum() != labels[1::2].sum() and answers[0::2].sum() != answers[1::2].sum()
    model = new_model(num_answers)
    out = pretrain_train_forward(model, batch, P, True, 1.0)  # one process: no DDP, local = global
    out["loss"].backward()
    one = {k: float(out["losses"][k]) for k in NAMES}
    g1 = grads(model)

    mp.spawn(_rank, args=(2, free_port(), root, str(tmp_path)), nprocs=2, join=True)
    two = torch.load(tmp_path / "two.pt", weights_only=False)
    for k in NAMES:
        assert two["global"]["losses"][k] == pytest.approx(one[k], rel=1e-5, abs=1e-6), k
    for n, g in g1.items():
        assert torch.allclose(two["global"]["grads"][n], g, rtol=1e-4, atol=1e-7), n
    # the old per-rank means: MLM and QA differ (what the issue measured), the others agree
    for k in ("mlm", "qa"):
        assert abs(two["per_rank"]["losses"][k] - one[k]) > 1e-4, k
    for k in ("matched", "obj", "attr", "feat"):
        assert two["per_rank"]["losses"][k] == pytest.approx(one[k], rel=1e-5), k


def test_pretraining_stage_with_two_ranks_logs_the_one_process_losses(root, tmp_path, one_thread):
    """End to end through the training loop: all five tasks (MLM and QA token-averaged), two gloo
    ranks launched as torchrun would, against one process; every step's logged per-task losses."""
    import dataclasses
    import json
    import subprocess
    import sys

    from lxmert_bench.config import OptimConfig, RunConfig
    from lxmert_bench.store import RunDir
    from lxmert_bench.train.stages import run_stage

    data = DataConfig(root=root, synthetic=True, synthetic_images=120, image_limit=6)
    cfg = RunConfig(kind="pretrain", seed=2, model=model_config(9500), data=data,
                    pretrain=dataclasses.replace(P, optim=OptimConfig(batch_size=16, epochs=1,
                                                                      max_steps=3)),
                    log_every=1, checkpoint_every=100, device="cpu")
    ensure_data_root(data)
    dirs = {}
    for name in ("one", "two"):
        dirs[name] = RunDir(tmp_path / name, cfg.stage_id)
        dirs[name].write_config(cfg)
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    ranks = [subprocess.Popen([sys.executable, "-m", "lxmert_bench.train.stages", str(dirs["two"].path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    run_stage(dirs["one"])
    for p in ranks:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    logs = {name: [r for r in map(json.loads, rd.log_path.read_text().splitlines()) if "losses" in r]
            for name, rd in dirs.items()}
    assert [r["step"] for r in logs["one"]] == [r["step"] for r in logs["two"]] == [1, 2, 3]
    assert set(logs["one"][0]["losses"]) == set(NAMES)
    for a, b in zip(logs["one"], logs["two"]):
        for k in NAMES:
            assert b["losses"][k] == pytest.approx(a["losses"][k], rel=1e-5, abs=1e-6), (a["step"], k)
