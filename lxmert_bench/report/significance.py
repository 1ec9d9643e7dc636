"""Is a variant different from the spec's reference row? Paired tests, pairing by seed or example.

- With at least ``MIN_SEEDS`` seeds done for both rows: a paired t-test over seeds
  (``scipy.stats.ttest_rel``; seed s of the variant is paired with seed s of the reference).
- Otherwise (one or two seeds, the usual case at paper scale): a paired bootstrap over the dev
  examples of the saved per-example scores (``predictions/dev_scores.json``, paired by example id,
  averaged over the paired seeds), two-sided, 10,000 resamples with a fixed seed.

Differences are in percentage points (variant minus reference), like the tables.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats

from lxmert_bench.report.collect import MAIN_METRIC, ReportSpec, read_json_file
from lxmert_bench.store import DONE

MIN_SEEDS = 3
N_RESAMPLES = 10_000
ALPHA = 0.05
T_TEST, BOOTSTRAP, NONE = "paired t-test", "paired bootstrap", "none"


@dataclass(frozen=True)
class Comparison:
    """A variant vs the reference row on one task and metric."""

    variant: str
    reference: str
    task: str
    metric: str
    method: str  # T_TEST, BOOTSTRAP or NONE (not testable: see note)
    seeds: int  # paired seeds used
    examples: int  # paired dev examples (bootstrap), 0 otherwise
    diff: float  # mean difference in points, variant - reference
    ci_low: float  # 95% confidence interval of diff
    ci_high: float
    p_value: float
    significant: bool
    note: str = ""


def paired_t_test(variant: Sequence[float], reference: Sequence[float],
                  alpha: float = ALPHA) -> tuple[float, float, float, float]:
    """(mean difference, two-sided p, CI low, CI high) of a paired t-test over seeds."""
    a, b = np.asarray(variant, float), np.asarray(reference, float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"paired t-test needs two equally long lists of >= 2 values, got "
                         f"{len(a)} and {len(b)}")
    d = a - b
    mean = float(d.mean())
    if np.all(d == d[0]):  # no spread: scipy gives nan; the answer is exact
        return mean, (1.0 if mean == 0 else 0.0), mean, mean
    p = float(stats.ttest_rel(a, b).pvalue)
    half = float(stats.t.ppf(1 - alpha / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return mean, p, mean - half, mean + half


def paired_bootstrap(variant: np.ndarray, reference: np.ndarray, n_resamples: int = N_RESAMPLES,
                     seed: int = 0, alpha: float = ALPHA) -> tuple[float, float, float, float]:
    """(mean difference, two-sided p, CI low, CI high) of a paired bootstrap over examples.

    A resample's mean depends only on how often each distinct per-example difference is drawn, so
    with few distinct values (VQA soft scores, 0/1 accuracies) it draws multinomial counts of those
    values instead of n indices: exact, and fast on 25k-example dev sets. The p-value is that of the
    shifted null distribution: P(|mean* - mean| >= |mean|).
    """
    a, b = np.asarray(variant, float), np.asarray(reference, float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired bootstrap needs two equally long non-empty score arrays, got "
                         f"{a.shape} and {b.shape}")
    d = a - b
    n = len(d)
    observed = float(d.mean())
    rng = np.random.default_rng(seed)
    values, counts = np.unique(d, return_counts=True)
    if len(values) <= 4096:
        draws = rng.multinomial(n, counts / n, size=n_resamples)
        means = draws @ values / n
    else:  # continuous scores: resample indices in chunks of bounded memory
        means = np.empty(n_resamples)
        chunk = max(1, 4_000_000 // n)
        for start in range(0, n_resamples, chunk):
            k = min(chunk, n_resamples - start)
            means[start:start + k] = d[rng.integers(0, n, size=(k, n))].mean(axis=1)
    # a tolerance so that float noise on a constant difference is not counted as "as extreme"
    extreme = np.abs(means - observed) >= abs(observed) - 1e-12
    p = float((extreme.sum() + 1) / (n_resamples + 1)) if observed != 0 else 1.0
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return observed, p, float(low), float(high)


def load_scores(path: str) -> dict[str, float]:
    """``predictions/dev_scores.json``: ``{example_id: score in [0, 1]}``; errors name the file."""
    data = read_json_file(path)
    if data is None:
        raise FileNotFoundError(f"{path}: not found (per-example dev scores for the bootstrap)")
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a non-empty object {{example_id: score}}, got "
                         f"{type(data).__name__}")
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}: score of example {key!r} must be a number in [0, 1], "
                             f"got {value!r:.60}")
    return {str(k): float(v) for k, v in data.items()}


def _paired_examples(variant_files: Sequence[str], reference_files: Sequence[str]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Per-example scores averaged over the paired seeds, on the example ids all files share."""
    var = [load_scores(p) for p in variant_files]
    ref = [load_scores(p) for p in reference_files]
    ids = set(var[0])
    for s in var[1:] + ref:
        ids &= s.keys()
    order = sorted(ids)
    a = np.mean([[s[i] for i in order] for s in var], axis=0) if order else np.empty(0)
    b = np.mean([[s[i] for i in order] for s in ref], axis=0) if order else np.empty(0)
    return np.asarray(a) * 100, np.asarray(b) * 100  # points, like the metrics


def compare(frame: pd.DataFrame, variant: str, reference: str, task: str,
            metric: str = MAIN_METRIC, min_seeds: int = MIN_SEEDS, n_resamples: int = N_RESAMPLES,
            seed: int = 0, alpha: float = ALPHA) -> Comparison:
    """``variant`` vs ``reference`` on ``task``/``metric`` from the collected frame."""
    done = frame[(frame["kind"] == "finetune") & (frame["state"] == DONE)
                 & (frame["task"] == task) & (frame["metric"] == metric)]
    mine = done[done["variant"] == variant].drop_duplicates("seed").set_index("seed")
    theirs = done[done["variant"] == reference].drop_duplicates("seed").set_index("seed")
    seeds = sorted(set(mine.index) & set(theirs.index))
    base = dict(variant=variant, reference=reference, task=task, metric=metric)
    nan = math.nan
    if not seeds:
        return Comparison(**base, method=NONE, seeds=0, examples=0, diff=nan, ci_low=nan,
                          ci_high=nan, p_value=nan, significant=False,
                          note="no seed done for both rows")
    if len(seeds) >= min_seeds:
        diff, p, lo, hi = paired_t_test(mine.loc[seeds, "value"].to_numpy(float),
                                        theirs.loc[seeds, "value"].to_numpy(float), alpha)
        return Comparison(**base, method=T_TEST, seeds=len(seeds), examples=0, diff=diff,
                          ci_low=lo, ci_high=hi, p_value=p, significant=p < alpha)
    files_a = [mine.at[s, "scores_file"] for s in seeds]
    files_b = [theirs.at[s, "scores_file"] for s in seeds]
    diff_seeds = float((mine.loc[seeds, "value"].to_numpy(float)
                        - theirs.loc[seeds, "value"].to_numpy(float)).mean())
    if any(not isinstance(f, str) for f in files_a + files_b):
        return Comparison(**base, method=NONE, seeds=len(seeds), examples=0, diff=diff_seeds,
                          ci_low=nan, ci_high=nan, p_value=nan, significant=False,
                          note=f"fewer than {min_seeds} paired seeds and no per-example scores "
                               "(result.json predictions.scores)")
    try:
        a, b = _paired_examples(files_a, files_b)
    except FileNotFoundError as e:  # deleted predictions: say so, keep the report
        return Comparison(**base, method=NONE, seeds=len(seeds), examples=0, diff=diff_seeds,
                          ci_low=nan, ci_high=nan, p_value=nan, significant=False, note=str(e))
    if len(a) == 0:
        return Comparison(**base, method=NONE, seeds=len(seeds), examples=0, diff=diff_seeds,
                          ci_low=nan, ci_high=nan, p_value=nan, significant=False,
                          note="the per-example score files share no example id")
    diff, p, lo, hi = paired_bootstrap(a, b, n_resamples, seed, alpha)
    return Comparison(**base, method=BOOTSTRAP, seeds=len(seeds), examples=len(a), diff=diff,
                      ci_low=lo, ci_high=hi, p_value=p, significant=p < alpha)


def compare_to_reference(frame: pd.DataFrame, spec: ReportSpec, metric: str = MAIN_METRIC,
                         **kwargs: float) -> dict[tuple[str, str], Comparison]:
    """Every variant but the reference vs ``spec.reference_variant``, per task; keyed by
    (variant, task). Empty when the spec names no reference variant."""
    if spec.reference_variant is None:
        return {}
    variants = list(dict.fromkeys([*spec.variants, *frame.loc[frame["kind"] == "finetune", "variant"]]))
    return {
        (v, task): compare(frame, v, spec.reference_variant, task, metric, **kwargs)
        for task in spec.tasks for v in variants if v != spec.reference_variant
    }


def comparisons_frame(comparisons: Mapping[tuple[str, str], Comparison]) -> pd.DataFrame:
    return pd.DataFrame([asdict(c) for c in comparisons.values()])
