"""The Python examples of the README and the docs pages run as written, and do what their comments say.

Every ```` ```python ```` block of the pages in ``PAGES`` is executed verbatim, the blocks of one page
in order and in one namespace (a page's later blocks use what its earlier ones made). The names a
block takes from the reader's own training loop (``logits_img``, ``rewards``, ``micro_batches``,
``model``, ...) are provided by a small toy batch; nothing in the blocks is edited. After a page has
run, the claims of its comments are checked: shapes, "exactly ``ceil(k·n)`` per trajectory", "the
gradients add up to the full-batch gradient", global counts over ranks. The pages that pass
``process_group="world"`` run on two spawned gloo ranks, each with its shard of one global batch, and
are compared with the single-process result. ``examples/quickstart.py`` runs as a script.

Stand-ins, where a page needs what the test machine lacks:
    - ``docs/trainers.md`` builds a ``GRPOConfig`` with TRL's defaults, which ask for bf16 on a GPU;
      on a machine without one, ``bf16=False, use_cpu=True`` are added (the only change), and the
      trainer really trains the tiny Qwen2-VL of ``examples/trl_vppo.py``.
    - ``docs/analysis.md``'s TensorBoard and W&B blocks run against minimal stand-ins (whether or
      not the packages are installed) that enforce those APIs' documented checks (TensorBoard: as
      many bucket limits as counts; W&B: ``len(bins) == len(counts) + 1``, at most 512 bins) and
      record what was logged, which the test then checks.
"""

from __future__ import annotations

import math
import re
import runpy
import sys
import textwrap
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

import vppo_core as V

from .helpers import gloo_group

ROOT = Path(__file__).resolve().parents[1]
PAGES = (
    "README.md",
    "docs/index.md",
    "docs/usage.md",
    "docs/family.md",
    "docs/analysis.md",
    "docs/integration.md",
    "docs/trainers.md",
)
WORLD = 2
BATCH, SEQ, VOCAB, GROUP = 16, 12, 40, 4  # 4 prompts x 4 responses; 8 per rank on two ranks


def python_blocks(page: str) -> list[str]:
    """The ```` ```python ```` blocks of a Markdown page, in order, indented ones (in a list item) dedented."""
    fences = re.finditer(
        r"^(?P<indent>[ \t]*)```python\n(?P<body>.*?)^(?P=indent)```", (ROOT / page).read_text(), re.S | re.M
    )
    return [textwrap.dedent(m["body"]) for m in fences]


Hook = Callable[[dict[str, Any]], None]


def run_blocks(page: str, namespace: dict[str, Any], after: dict[int, Hook] | None = None) -> dict[str, Any]:
    """Run the page's blocks in order in ``namespace``; ``after[i](namespace)`` once block ``i`` has run."""
    for i, block in enumerate(python_blocks(page), 1):
        exec(compile(block, f"{page} (python block {i})", "exec"), namespace)
        if after and i in after:
            after[i](namespace)
    return namespace


def test_every_page_with_python_examples_is_run():
    pages = [str(p.relative_to(ROOT)) for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]]
    with_code = {page for page in pages if python_blocks(page)}
    assert with_code == set(PAGES), f"pages with python blocks {sorted(with_code)} != PAGES {sorted(PAGES)}"
    for page in PAGES:  # every fence is found, indented or not
        assert len(python_blocks(page)) == (ROOT / page).read_text().count("```python"), page


# --- the toy batch: what the reader's own loop would hold -----------------------------------------


def toy_batch(seed: int = 0) -> dict[str, Any]:
    """Logits of two views, sampled tokens, old and current log-probs, rewards, groups, a right-padded mask."""
    g = torch.Generator().manual_seed(seed)
    logits_img = 2 * torch.randn(BATCH, SEQ, VOCAB, generator=g)
    visual = torch.rand(BATCH, SEQ, 1, generator=g) ** 4 * 3  # a few tokens depend strongly on the image
    logits_noimg = logits_img + visual * torch.randn(BATCH, SEQ, VOCAB, generator=g)
    lengths = torch.randint(SEQ // 2, SEQ + 1, (BATCH,), generator=g)
    response_mask = torch.arange(SEQ) < lengths[:, None]
    tokens = torch.multinomial(logits_img.softmax(-1).flatten(0, 1), 1, generator=g).view(BATCH, SEQ)
    old_logprobs = logits_img.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    current = old_logprobs + 0.1 * torch.randn(BATCH, SEQ, generator=g)  # the policy moved a little
    rewards = (torch.rand(BATCH, generator=g) < 0.5).float()
    return {
        "logits_img": logits_img,
        "logits_noimg": logits_noimg,
        "old_logits": logits_img,
        "response_mask": response_mask,
        "old_logprobs": old_logprobs,
        "current": current,
        "rewards": rewards,
        "group_ids": torch.arange(BATCH) // GROUP,
    }


def rank_rows(rank: int) -> slice:
    """Uneven shards (6 and 10 rows), so that the second prompt's responses sit on both ranks."""
    return [slice(0, 6), slice(6, BATCH)][rank]


def shard(batch: dict[str, Any], rows: slice) -> dict[str, Any]:
    return {name: value[rows] for name, value in batch.items()}


def loop_names(batch: dict[str, Any], micro: int = 2) -> dict[str, Any]:
    """The names the pages take from the reader's loop, as fresh leaves where gradients are read."""
    rows = batch["response_mask"].shape[0]
    micro_batches = [slice(i, min(i + micro, rows)) for i in range(0, rows, micro)]
    logprobs = batch["current"].clone().requires_grad_()
    lp = batch["current"].clone().requires_grad_()
    logged: list[dict[str, Any]] = []
    return {
        **{k: v for k, v in batch.items() if k != "current"},
        "logprobs": logprobs,
        "lp": lp,
        "old": batch["old_logprobs"],
        "micro_batches": micro_batches,
        "logprobs_of": lambda mb: logprobs[mb],
        "log": logged.append,
        "logged": logged,
    }


def assert_tgf_counts(keep: torch.Tensor, response_mask: torch.Tensor, k: float) -> None:
    n = response_mask.sum(-1)
    expected = torch.tensor([math.ceil(k * int(m)) for m in n])
    assert torch.equal(keep.sum(-1), expected), "TGF keeps exactly ceil(k n) tokens per trajectory"
    assert not (keep & ~response_mask).any(), "TGF keeps no padding"


# --- README.md and docs/index.md: the five-line pipeline -------------------------------------------


@pytest.mark.parametrize("page", ["README.md", "docs/index.md"])
def test_front_page_pipeline(page):
    ns = run_blocks(page, loop_names(toy_batch()))
    mask = ns["response_mask"]
    assert ns["dep"].shape == mask.shape  # "[batch, seq], exact KL"
    exact = V.visual_dependency(ns["logits_img"].double(), ns["logits_noimg"].double(), mask, backend="torch")
    torch.testing.assert_close(ns["dep"].double(), exact, rtol=1e-5, atol=1e-6)
    assert_tgf_counts(ns["keep"], mask, 0.4)
    assert torch.isfinite(ns["out"].loss)
    grad = ns["logprobs"].grad
    assert grad is not None and torch.isfinite(grad).all()
    assert (grad[~ns["keep"]] == 0).all() and (grad[ns["keep"]] != 0).any()  # filtered tokens get none


# --- docs/usage.md and docs/family.md: the pages that use process_group="world" ---------------------


def _usage_checks(ns: dict[str, Any], full: dict[str, Any], rows: slice) -> None:
    mask = ns["response_mask"]
    assert_tgf_counts(ns["keep"], mask, 0.4)
    # Block 3: "gradients add up to the full-batch gradient" (of this rank's batch).
    lp = ns["batch_lp"].clone().requires_grad_()
    V.vppo_loss(lp, ns["old"], ns["adv_after_block_3"], mask, ns["keep"]).loss.backward()
    torch.testing.assert_close(ns["grad_after_block_3"], lp.grad, rtol=1e-5, atol=1e-7)
    # Block 4: TAS over the process group = one process's TAS on the whole batch, this rank's rows
    # (of the advantages block 1 shaped on each rank alone).
    local = []
    for r in range(WORLD):
        b = shard(full, rank_rows(r))
        dep = V.visual_dependency(b["logits_img"], b["logits_noimg"], b["response_mask"])
        adv = V.grpo_advantages(b["rewards"], b["group_ids"])
        local.append(V.shape_advantages(adv, dep, b["response_mask"], beta_min=0.9))
    dep = V.visual_dependency(full["logits_img"], full["logits_noimg"], full["response_mask"])
    whole = V.shape_advantages(torch.cat(local), dep, full["response_mask"], group_ids=full["group_ids"])
    torch.testing.assert_close(ns["adv"], whole[rows], rtol=1e-5, atol=1e-6)
    # Block 4: global counts over ranks, divided by the world size to undo DDP's gradient average.
    assert ns["den"].num_tokens.item() == full["response_mask"].sum().item() / WORLD
    assert ns["logged"] and set(ns["logged"][0]) == {"clip_frac", "kept_frac"}
    assert all(v.dim() == 0 and not v.requires_grad for v in ns["logged"][0].values())


def _family_names(ns: dict[str, Any]) -> None:
    """The PAPO fragment's names: logits with gradient, the masked view, gamma, a count, a policy loss."""
    ns["logits_img"] = ns["logits_img"].clone().requires_grad_()
    ns["logits_masked"] = ns["logits_noimg"]
    ns["gamma"], ns["n"] = 0.02, ns["response_mask"].sum()
    adv = V.grpo_advantages(ns["rewards"], ns["group_ids"])
    ns["policy"] = V.vppo_loss(ns["logprobs"], ns["old_logprobs"], adv, ns["response_mask"])


def _family_checks(ns: dict[str, Any], full: dict[str, Any], rows: slice) -> None:
    # The threshold is pooled over ranks: the same tokens as one process on the whole batch.
    entropy = V.token_entropy(full["old_logits"], full["response_mask"])
    adv = V.grpo_advantages(full["rewards"], full["group_ids"])
    whole = V.recipes.high_entropy_rollout(adv, entropy, full["response_mask"])
    assert torch.equal(ns["batch"].token_mask, whole.token_mask[rows])
    assert ns["den"].num_kept_tokens.item() == whole.token_mask.sum().item() / WORLD  # DDP averages
    grad = ns["logprobs"].grad
    assert grad is not None and torch.isfinite(grad).all() and (grad[~ns["batch"].token_mask] == 0).all()
    # the PAPO fragment: the KL and both entropies from one kernel, with gradient to the logits
    mask = ns["response_mask"]
    kl = V.visual_dependency(ns["logits_img"].detach(), ns["logits_masked"], mask)
    torch.testing.assert_close(ns["terms"].dependency, kl, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(ns["loss"])
    (g,) = torch.autograd.grad(ns["loss"], ns["logits_img"])
    assert torch.isfinite(g).all() and (g[~mask] == 0).all() and (g[mask] != 0).any()


def _record_block_3(ns: dict[str, Any]) -> None:
    """Keep what usage.md's block 3 produced, before block 4 rebinds ``adv``."""
    ns["adv_after_block_3"], ns["grad_after_block_3"] = ns["adv"], ns["lp"].grad.clone()
    ns["lp"].grad = None


def _world_worker(rank: int, world: int, init_file: str, page: str) -> None:
    with gloo_group(rank, world, init_file):
        full, rows = toy_batch(), rank_rows(rank)
        ns = loop_names(shard(full, rows))
        if page == "docs/usage.md":
            ns["batch_lp"] = ns["lp"].detach().clone()
            run_blocks(page, ns, after={3: _record_block_3})
            _usage_checks(ns, full, rows)
        else:
            _family_names(ns)
            run_blocks(page, ns)
            _family_checks(ns, full, rows)


@pytest.mark.slow
@pytest.mark.parametrize("page", ["docs/usage.md", "docs/family.md"])
def test_process_group_pages_on_two_ranks(page, tmp_path):
    assert 'process_group="world"' in "".join(python_blocks(page))
    mp.spawn(_world_worker, args=(WORLD, str(tmp_path / "init"), page), nprocs=WORLD, join=True)


# --- docs/analysis.md: statistics, figures, logging -------------------------------------------------


class _FakeSummaryWriter:
    """TensorBoard's ``SummaryWriter`` calls used by the page, with ``add_histogram_raw``'s length check."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir, self.scalars, self.histograms = log_dir, {}, []

    def add_scalar(self, tag: str, value: float, global_step: int | None = None) -> None:
        self.scalars[tag] = float(value)

    def add_histogram_raw(self, tag, min, max, num, sum, sum_squares, bucket_limits, bucket_counts, global_step=None):
        if len(bucket_limits) != len(bucket_counts):
            raise ValueError("len(bucket_limits) != len(bucket_counts)")
        self.histograms.append(dict(tag=tag, min=min, max=max, num=num, sum=sum, sum_squares=sum_squares,
                                    bucket_limits=bucket_limits, bucket_counts=bucket_counts))  # fmt: skip


class _FakeWandbHistogram:
    def __init__(self, sequence=None, np_histogram=None, num_bins: int = 64) -> None:
        counts, bins = np_histogram
        if len(bins) != len(counts) + 1:
            raise ValueError("len(bins) must be len(histogram) + 1")
        if len(counts) > 512:
            raise ValueError("The maximum length of a histogram is 512")
        self.histogram, self.bins = list(counts), list(bins)


def _stand_ins(monkeypatch) -> dict[str, Any]:
    """Stand-ins for TensorBoard and W&B (installed or not), and the records of what was logged."""
    record: dict[str, Any] = {"writers": [], "wandb": []}
    tensorboard = types.ModuleType("torch.utils.tensorboard")

    def writer(log_dir: str) -> _FakeSummaryWriter:
        record["writers"].append(_FakeSummaryWriter(log_dir))
        return record["writers"][-1]

    tensorboard.SummaryWriter = writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tensorboard)
    wandb = types.ModuleType("wandb")
    wandb.Histogram = _FakeWandbHistogram
    wandb.log = lambda data, step=None: record["wandb"].append((data, step))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    return record


@pytest.mark.slow
def test_analysis_page(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    record = _stand_ins(monkeypatch)
    ns = run_blocks("docs/analysis.md", {})  # block 1 asserts that the top-40% share is what TGF keeps
    for name in ("token_dependency.png", "trajectory_dependency.png", "strip.png", "dependency.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    stats, mask = ns["stats"], ns["response_mask"]
    assert stats["dependency/token/count"] == 3 * int(mask.sum())  # three updates of the same batch
    rows = (tmp_path / "dependency.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[0].split(",")[0] == "step"
    # the stand-ins recorded what the page logged
    (writer,) = record["writers"]
    assert writer.scalars.keys() == stats.keys()
    (hist,) = writer.histograms
    assert sum(hist["bucket_counts"]) == hist["num"] == stats["dependency/token/count"]
    values = ns["dependency"][mask].double().repeat(3)
    assert math.isclose(hist["sum"], values.sum().item(), rel_tol=1e-9)
    assert math.isclose(hist["sum_squares"], values.square().sum().item(), rel_tol=1e-9)
    assert hist["bucket_limits"] == sorted(hist["bucket_limits"])
    ((data, step),) = record["wandb"]
    assert step == 2 and sum(data["dependency/token/histogram"].histogram) == stats["dependency/token/count"]


# --- docs/integration.md and docs/trainers.md: tiny Hugging Face models -----------------------------


@pytest.mark.slow
def test_integration_page(monkeypatch):
    from .helpers import require_transformers

    require_transformers()
    pytest.importorskip("PIL")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    ns = run_blocks("docs/integration.md", {})  # self-contained: it builds its own model and batch
    model, mask = ns["model"], ns["response_mask"]
    assert torch.isfinite(ns["out"].loss)
    assert ns["old"].dependency.shape == mask.shape and (ns["old"].dependency[~mask] == 0).all()
    assert_tgf_counts(ns["keep"], mask, 0.4)
    steps = [s["step"] for s in ns["optimizer"].state.values()]
    assert steps and all(int(s) == 1 for s in steps)  # one AdamW step on the parameters
    assert all(p.grad is None for p in model.parameters())  # zero_grad() ran last


@pytest.mark.slow
def test_trainers_page(tmp_path, monkeypatch):
    from .helpers import require_transformers

    require_transformers()
    trl = pytest.importorskip("trl")
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    example = runpy.run_path(str(ROOT / "examples" / "trl_vppo.py"), run_name="trl_vppo_example")
    from vppo_core.integrations.tiny_vlm import tiny_processor, tiny_qwen_vl

    if not torch.cuda.is_available():  # TRL's defaults ask for bf16 on a GPU
        config = trl.GRPOConfig

        def cpu_config(**kwargs: Any) -> Any:
            return config(**kwargs, bf16=False, use_cpu=True, **example["no_activation_checkpointing"]())

        monkeypatch.setattr(trl, "GRPOConfig", cpu_config)
    torch.manual_seed(0)
    processor = tiny_processor("qwen2_vl")
    ns = {
        "processor": processor,
        "model": tiny_qwen_vl("qwen2_vl", processor.tokenizer),
        "accuracy_reward": example["colour_reward"],
        "dataset": example["tiny_dataset"](1),
    }
    ns = run_blocks("docs/trainers.md", ns)
    trainer = ns["trainer"]
    assert trainer.state.global_step > 0
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {"vppo/kept_frac", "vppo/tas_factor_min", "vppo/nll"} <= logged
    kept = [entry["vppo/kept_frac"] for entry in trainer.state.log_history if "vppo/kept_frac" in entry]
    assert all(0.4 <= f < 0.6 for f in kept)  # ceil(0.4 n) of each completion's n tokens


def test_quickstart_example_runs(capsys):
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "TAS factors: min 0.900" in out and "mean 1.000" in out
    assert re.search(r"TGF kept 4\d\.\d% of valid tokens", out)
