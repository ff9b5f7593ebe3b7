"""The HTML report from run directories written here by hand (metrics.jsonl, eval/): self-contained, escaped,
well-formed, one plot per curve, several runs on one page. (The browser check on a real run is in test_eval.)"""

import json
import re
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from dpokit.cli import main
from dpokit.errors import DpokitError
from dpokit.evaluate.report import load_run, render_report, write_report

EVIL = "<script>alert('x')</script> & \"quotes\""


def make_run(root: Path, name: str, beta: float = 0.1, steps: int = 120, with_eval: bool = True,
             with_reward: bool = True) -> Path:
    run = root / name
    (run / "eval").mkdir(parents=True)
    config = {"model": {"name_or_path": "tiny-random-llama"}, "loss": {"name": "sigmoid", "beta": beta},
              "train": {"lr": 1e-6}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rows = []
    for step in range(1, steps + 1):
        progress = step / steps
        rows.append({"step": step, "split": "train", "loss": 0.69 - 0.4 * progress + 0.05 * (step % 3),
                     "rewards/accuracies": min(1.0, 0.5 + progress / 2), "rewards/margins": 2 * progress,
                     "rewards/chosen": progress, "rewards/rejected": -progress, "logps/chosen": -50 - 3 * progress,
                     "logps/rejected": -55 - 20 * progress, "grad_norm": 3 - progress, "lr": 1e-6})
        if step % 20 == 0 or step == 1:
            rows.append({"step": step, "split": "eval", "loss": 0.69 - 0.3 * progress,
                         "rewards/accuracies": 0.5 + progress / 3, "rewards/margins": 1.5 * progress,
                         "rewards/chosen": progress, "rewards/rejected": -progress / 2,
                         "logps/chosen": -52, "logps/rejected": -60 - 10 * progress})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if not with_eval:
        (run / "eval").rmdir()
        return run
    reward = (lambda kl: round(0.2 + 0.5 * (1 - 2.718 ** (-kl / beta / 20)), 4)) if with_reward else (lambda kl: None)
    frontier = [{"checkpoint": "reference", "step": 0, "kl": 0.0, "kl_stderr": 0.0, "reward": reward(0.0),
                 "reward_stderr": 0.02}]
    for step in (40, 80, 120):
        kl = step / 40 * beta * 10
        frontier.append({"checkpoint": f"step-{step}", "step": step, "kl": kl, "kl_stderr": 0.1,
                         "reward": reward(kl), "reward_stderr": 0.02})
    temperatures = [{"temperature": t, "win_rate": 0.7 - 0.2 * t, "win_rate_ci": [0.6 - 0.2 * t, 0.8 - 0.2 * t],
                     "wins": 10, "ties": 2, "losses": 4, "malformed": 1} for t in (0.25, 0.5, 1.0)]
    result = {"run_dir": str(run), "beta": beta, "rewards/accuracies": 0.8, "rewards/margins": 1.4,
              "kl": frontier[-1]["kl"], "kl_stderr": 0.1, "reward": frontier[-1]["reward"],
              "reward_reference": frontier[0]["reward"], "win_rate": 0.5, "win_rate_ci": [0.4, 0.6],
              "reward_fn": "sentiment" if with_reward else None, "judge": "sentiment", "baseline": "reference",
              "temperatures": temperatures, "frontier": frontier}
    (run / "eval" / "eval.json").write_text(json.dumps(result))
    samples = [{"temperature": 1.0, "sample": 0, "prompt": f"Review {i}: {EVIL}", "policy": "A lovely film!",
                "reference": "It was a film.", "policy_implicit_reward": 0.4, "reference_implicit_reward": -0.1,
                "policy_reward": 0.6, "reference_reward": 0.0, "judge": ["win", "loss", "tie"][i % 3]}
               for i in range(8)]
    (run / "eval" / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return run


class Balance(HTMLParser):
    """Checks that every non-void element is closed in order (a cheap well-formedness check)."""

    VOID = {"meta", "link", "br", "img", "input", "hr", "path", "use", "stop", "rect", "circle", "line",
            "polyline", "polygon", "ellipse"}

    def __init__(self):
        super().__init__()
        self.stack, self.problems = [], []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        pass

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()


def test_single_run_report_is_self_contained(tmp_path):
    run = make_run(tmp_path, "sentiment-beta0.1")
    out = write_report([run])
    assert out == run / "report.html"
    page = out.read_text()
    assert page.count("<svg") == 8  # six training curves, the frontier, win rate vs temperature
    assert "<script" not in page.replace("&lt;script", "")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing fetched from anywhere
    assert not re.search(r"url\((?!#)", page) and "@import" not in page  # only in-page references
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page  # sample text is escaped
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))  # plots on one page never share an element id
    checker = Balance()
    checker.feed(page)
    assert checker.problems == [] and checker.stack == []
    for text in ("DPO in action", "Reward vs KL", "Win rate vs sampling temperature", "policy preferred",
                 "sentiment-beta0.1", "80.0%"):
        assert text in page, text


def test_several_runs_on_one_page(tmp_path, capsys):
    runs = [make_run(tmp_path / "a", "run", beta=0.1), make_run(tmp_path / "b", "run", beta=0.5)]
    with pytest.raises(DpokitError, match="--out: required"):
        write_report(runs)
    assert main(["report", *map(str, runs)]) == 2
    assert "--out: required" in capsys.readouterr().err
    out = tmp_path / "both.html"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    page = out.read_text()
    assert "a/run" in page and "b/run" in page  # same folder names told apart by their parents
    assert "β=0.1" in page and "β=0.5" in page  # both frontiers, labelled by beta
    assert page.count("<details") == 2  # one samples block per run


def test_run_without_eval_or_reward(tmp_path):
    plain = make_run(tmp_path, "plain", with_eval=False)
    page = render_report([load_run(plain)])
    assert "Training" in page and "Evaluation" not in page and "DPO in action" not in page
    no_reward = make_run(tmp_path, "no-reward", with_reward=False)
    page = render_report([load_run(no_reward)])
    assert "KL(π ‖ π_ref) by checkpoint" in page and "Reward vs KL" not in page


def test_crashed_run_and_bad_inputs(tmp_path):
    run = make_run(tmp_path, "crashed", with_eval=False)
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 121, "split": "tra')  # killed mid-line
    assert len(load_run(run).metrics) == Counter(r["split"] for r in load_run(run).metrics).total()
    assert write_report([run]).is_file()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:3] + ["not json"] + lines[3:]) + "\n")
    with pytest.raises(DpokitError, match=r"metrics.jsonl:4: invalid JSON"):
        load_run(run)
    with pytest.raises(DpokitError, match="no such run directory"):
        load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DpokitError, match="not a run directory"):
        load_run(tmp_path / "empty")


def test_ppo_and_reward_model_runs_get_their_own_curves(tmp_path):
    """A PPO run's page plots its reward, KL, beta, entropy, clip fractions and value head; a reward model's its
    accuracy and margin; the DPO-only panels (implicit rewards, log-probs) are left out where nothing logs them."""
    ppo, rm = tmp_path / "ppo", tmp_path / "rm"
    for run, rows in ((ppo, [{"step": s, "split": "train", "loss": 0.1, "reward": 0.1 * s, "kl": 0.2 * s,
                              "kl_coef": 0.05, "entropy": 3.0, "policy/clipfrac": 0.1, "value/clipfrac": 0.0,
                              "value/explained_variance": 0.3, "grad_norm": 1.0} for s in range(1, 6)]),
                      (rm, [{"step": s, "split": split, "loss": 0.6, "accuracy": 0.7, "margin": 0.2 * s,
                             "grad_norm": 1.0} for s in range(1, 6) for split in ("train", "eval")])):
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": "tiny-random-llama"}}))
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = render_report([load_run(ppo)])
    for title in ("Reward of the sampled responses", "KL(π‖π_ref) per response", "KL coefficient β",
                  "Clipped fraction", "Value head"):
        assert title in page, title
    assert "Implicit rewards" not in page and "Reward-model accuracy" not in page
    page = render_report([load_run(rm)])
    assert "Reward-model accuracy" in page and "Reward-model margin" in page and "Clipped fraction" not in page


def _svg_texts(svg: str) -> list[str]:
    """The text drawn in a plot (matplotlib writes each string in one <text> element, as text)."""
    import html

    return [html.unescape(t) for t in re.findall(r"<text[^>]*>([^<]*)</text>", svg)]


def test_frontier_shows_one_reference_per_estimate_and_says_why_there_are_two():
    """The demo's frontier: DPO runs evaluated on the same pi_ref samples share one pi_ref point; Best-of-4 reads
    pi_ref's own held-out samples (0.150 against 0.105), so its estimate is named and a note says why."""
    from dpokit.evaluate import plots

    def run(ref, points, beta=None):
        frontier = [{"checkpoint": "reference", "step": 0, "kl": 0.0, "reward": ref}]
        frontier += [{"checkpoint": f"step-{s}", "step": s, "kl": kl, "reward": r} for s, kl, r in points]
        return {"beta": beta, "frontier": frontier}

    dpo = [("DPO β=0.1", run(0.105, [(8, 1.0, 0.3)])), ("DPO β=1", run(0.105, [(8, 0.5, 0.2)]))]
    texts = _svg_texts(plots.frontier(dpo, beta_in_label=False))
    assert texts.count("π_ref") == 1 and "ref" not in texts  # one tag for the shared estimate
    texts = _svg_texts(plots.frontier([*dpo, ("Best-of-4", run(0.150, [(4, 0.6, 0.5)]))], beta_in_label=False))
    assert texts.count("π_ref") == 1 and "π_ref (Best-of-4)" in texts
    note = " ".join(t for t in texts if "shown 2 times" in t)
    assert "(0.105, 0.150)" in note and "different samples" in note
