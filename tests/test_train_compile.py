"""run.compile (issue 13): the compiled training step equals the eager one within rounding, its
recompiles are counted and logged, and a compile that fails falls back to eager with a warning
naming the cause (the stage goes on). The default is off on a CPU (README, Performance)."""

from __future__ import annotations

import pytest
import torch
from test_train_loop import ToyData, make_model, read_log, settings, step

from lxmert_bench.config import OptimConfig
from lxmert_bench.train.loop import compile_mode, train

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIM = OptimConfig(lr=1e-2, batch_size=8, epochs=2, warmup=0.1)


def test_compile_is_on_by_default_on_cuda_only():
    assert compile_mode("auto", torch.device("cpu")) is None
    assert compile_mode("auto", torch.device("cuda")) == "default"
    assert compile_mode("none", torch.device("cuda")) is None
    assert compile_mode("reduce-overhead", torch.device("cpu")) == "reduce-overhead"
    with pytest.raises(ValueError, match="run.compile"):
        compile_mode("fast", torch.device("cpu"))


def test_compiled_step_equals_the_eager_one(tmp_path):
    # without dropout: inductor draws its own dropout masks (the same distribution, other bits)
    eager = make_model(dropout=0.0)
    train(eager, ToyData(), step, settings(tmp_path / "eager", optim=OPTIM))
    compiled = make_model(dropout=0.0)
    summary = train(compiled, ToyData(), step,
                    settings(tmp_path / "compiled", optim=OPTIM, compile="default"))
    assert summary.execution["compile"] == {"mode": "default", "recompiles": 0, "failed": None}
    for k, v in eager.state_dict().items():
        assert torch.allclose(v, compiled.state_dict()[k], atol=1e-5, rtol=1e-4), k
    lines = [r for r in read_log(tmp_path / "compiled" / "log.jsonl") if "loss" in r]
    assert lines and all(r["compile"]["recompiles"] == 0 for r in lines)
    # the compiled run really compiled: eager runs log no compile record
    assert all("compile" not in r for r in read_log(tmp_path / "eager" / "log.jsonl"))


def test_recompiles_are_counted_and_logged(tmp_path, capsys):
    def halves_from_epoch_2(model, batch, epoch):  # new input shapes in epoch 2: one recompile
        if epoch == 1:
            batch = {k: v[:4] for k, v in batch.items()}
        return step(model, batch, epoch)

    summary = train(make_model(dropout=0.0), ToyData(), halves_from_epoch_2,
                    settings(tmp_path, optim=OPTIM, compile="default"))
    assert summary.execution["compile"]["recompiles"] == 1
    lines = [r for r in read_log(tmp_path / "log.jsonl") if "loss" in r]
    assert [r["compile"]["recompiles"] for r in lines] == [0, 0, 1, 1, 1]
    assert "torch.compile recompiled the training step (1 recompile(s))" in capsys.readouterr().err


@pytest.mark.slow  # ~3 min on 2 cores: inductor compiles the LXMERT pretraining step
def test_compiled_pretraining_step_equals_the_eager_one(tmp_path):
    from test_train_accumulation import _Fixed

    from lxmert_bench.model import LxmertConfig, LxmertForPretraining

    config = LxmertConfig.preset("test", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    g = torch.Generator().manual_seed(0)
    items = []
    for _ in range(16):
        ids = torch.randint(5, config.vocab_size, (20,), generator=g)
        items.append({"input_ids": ids, "attention_mask": torch.ones(20, dtype=torch.long),
                      "feats": torch.rand(config.num_objects, config.visual_feat_dim, generator=g),
                      "boxes": torch.rand(config.num_objects, 4, generator=g),
                      "masked_lm_labels": torch.where(torch.rand(20, generator=g) < 0.15, ids, -1),
                      "matched_label": torch.randint(0, 2, (), generator=g)})
    data = _Fixed(items, lambda ex: {k: torch.stack([e[k] for e in ex]) for k in ex[0]})

    def pretrain_step(m, batch, epoch):
        return m(batch["input_ids"], batch["attention_mask"], batch["feats"], batch["boxes"],
                 masked_lm_labels=batch["masked_lm_labels"], matched_label=batch["matched_label"])

    runs = {}
    for mode in ("none", "default"):
        torch.manual_seed(0)
        model = LxmertForPretraining(config, visual_losses=(), qa=False)
        optim = OptimConfig(lr=1e-3, batch_size=8, epochs=1, max_steps=2)
        summary = train(model, data, pretrain_step, settings(tmp_path / mode, optim=optim,
                                                             compile=mode))
        runs[mode] = model.state_dict()
        assert model.sparse_mlm is (mode == "none")  # compiled: the static-shape MLM head
    assert summary.execution["compile"] == {"mode": "default", "recompiles": 0, "failed": None}
    for k, v in runs["none"].items():
        assert torch.allclose(v, runs["default"][k], atol=1e-5, rtol=1e-4), k


def test_a_compile_failure_falls_back_to_eager_with_a_warning(tmp_path, monkeypatch):
    # a real failure: inductor's C++ compiler does not exist (fresh caches, so it is needed)
    import torch._inductor.config as inductor

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-cache"))
    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(inductor, "fx_graph_cache", False)
    torch._dynamo.reset()
    eager = make_model()
    train(eager, ToyData(), step, settings(tmp_path / "eager", optim=OPTIM))
    fallen = make_model()
    with pytest.warns(RuntimeWarning, match=r"torch.compile \(mode default\) failed, training eagerly"):
        summary = train(fallen, ToyData(), step,
                        settings(tmp_path / "fallen", optim=OPTIM, compile="default"))
    assert summary.steps == 10
    assert "InvalidCxxCompiler" in summary.execution["compile"]["failed"]  # the cause, named
    # the failed step was redone from the same RNG state: exactly the eager run
    for k, v in eager.state_dict().items():
        assert torch.equal(v, fallen.state_dict()[k]), k
    last = [r for r in read_log(tmp_path / "fallen" / "log.jsonl") if "loss" in r][-1]
    assert last["compile"]["failed"] == summary.execution["compile"]["failed"]
    torch._dynamo.reset()
