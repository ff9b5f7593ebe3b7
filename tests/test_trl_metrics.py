"""dpokit's step-1 pair metrics against fp64 arithmetic and against TRL 1.16's DPOTrainer: on the same tiny model,
pairs and batch (fp32, the reference model online, padded rows: TRL's own settings), dpokit's ``logps/*`` and
``logits/*`` equal the exact (fp64) values, and ``logits/*`` mean what TRL's mean: the logit averaged over the
vocabulary and over every chosen (rejected) response token of the step. Runs where TRL is installed (CI installs
it)."""

import sys

import pytest
import torch

from conftest import ROOT

pytest.importorskip("trl")

BATCH = 4
TRL_TOL = 0.025
"""|dpokit - TRL| allowed on ``logits/*`` (derived at its use)."""


def shifted_model(vocab: int):
    """The tiny model with its output embedding untied from the input one and one random vector v added to every
    row: every logit of a position moves by the same h . v, so the log-probs keep their shape while the mean logit
    becomes of order 1 and differs from position to position (a random model's mean logit is ~1e-3, too close to 0
    to tell one definition from another)."""
    from dpokit.models.loading import tiny_model

    model = tiny_model(vocab, seed=0)
    embed = model.get_input_embeddings().weight
    shift = torch.randn(embed.shape[1], generator=torch.Generator().manual_seed(1))
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(embed.detach().clone() + shift)
    return model


def exact(model, tok, rows):
    """fp64 per response: summed log-probs and the mean logit of every response token (its predicting
    position's logits averaged over the vocabulary)."""
    model = model.double().eval()
    out = {"chosen": ([], []), "rejected": ([], [])}
    for row in rows:
        prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        for side in ("chosen", "rejected"):
            response = tok(row[side], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + response])).logits[0]
            at = logits[len(prompt) - 1:len(prompt) + len(response) - 1]  # the positions predicting the response
            out[side][0].append(float(torch.log_softmax(at, -1)[torch.arange(len(response)), response].sum()))
            out[side][1].append(at.mean(-1))
    return out


def test_first_step_logps_and_logits_are_exact_and_mean_what_trls_mean(tmp_path):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    import dpokit
    from dpokit.models.loading import tiny_tokenizer
    from dpokit.training.metrics import read_metrics

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import make_pairs, write_jsonl

    folder, data = tmp_path / "model", tmp_path / "pairs.jsonl"
    tok = tiny_tokenizer()
    model = shifted_model(len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    rows = make_pairs(tok, BATCH, seed=0)  # responses open with a space: the same token ids in both systems
    write_jsonl(rows, data)

    run = dpokit.train({"model": {"name_or_path": str(folder)},
                        "data": {"train": str(data), "max_length": 128, "max_prompt_length": 64,
                                 "cache_dir": str(tmp_path / "cache")},
                        "loss": {"name": "sigmoid", "beta": 0.1}, "reference": {"mode": "model"},
                        "train": {"lr": 1e-3, "batch_size": BATCH, "max_steps": 1, "shuffle": False,
                                  "layout": "padded", "precision": "fp32", "progress": False}},
                       run_dir=str(tmp_path / "dpokit"))
    ours = next(r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train")

    truth = exact(model, tok, rows)
    for side in ("chosen", "rejected"):
        sums, means = truth[side]
        token_mean = float(torch.cat(means).mean())
        # fp32 sums of ~40 log-softmaxes over 512 logits (|logp| ~ 6) against fp64: tolerances.LOGP_TOL's bound
        # (a few ulps of |sum| ~ 200, ~1e-5 absolute); 1e-6 relative leaves room for the sums' own round-off.
        assert abs(ours[f"logps/{side}"] - sum(sums) / BATCH) <= 1e-6 * abs(sum(sums) / BATCH), side
        # Each mean logit is h . mean(W) in fp32, |h . mean W| <~ 30 here: a 64-term fp32 dot product of it
        # rounds to ~64 * 6e-8 * 30 = 1e-4 at worst, and averaging over the tokens does not add to it.
        assert abs(ours[f"logits/{side}"] - token_mean) <= 1e-4, (side, ours[f"logits/{side}"], token_mean)
        # What the comparison with TRL can tell apart: the mean over pairs of per-pair means (a definition that
        # weighs a short response like a long one) differs by more than 4x the bound used against TRL below.
        assert abs(float(torch.stack([m.mean() for m in means]).mean()) - token_mean) > 4 * TRL_TOL

    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=BATCH, max_steps=1,
                     learning_rate=1e-3, lr_scheduler_type="constant", loss_type=["sigmoid"], beta=0.1,
                     max_length=128, report_to="none", logging_steps=1, save_strategy="no", use_cpu=True,
                     dataloader_num_workers=0, train_sampling_strategy="sequential", disable_tqdm=True, seed=0)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), args=args,
                         train_dataset=load_dataset("json", data_files=str(data), split="train",
                                                    cache_dir=str(tmp_path / "hf")),
                         processing_class=AutoTokenizer.from_pretrained(folder))
    trainer.train()
    theirs = next(row for row in trainer.state.log_history if "logits/chosen" in row)
    for side in ("chosen", "rejected"):
        # TRL's own fp32 values are off the fp64 ones on this model (measured: log-probs by 3.4e-4 relative,
        # 0.07 nats a response, where dpokit's are within 1e-7; mean logits by <= 0.0064, 1e-3 of their spread,
        # std 7.5), so the comparison is as tight as TRL allows: TRL_TOL is 4x its error on the mean logits,
        # and 1e-3 relative 3x its error on the log-probs.
        assert abs(ours[f"logits/{side}"] - theirs[f"logits/{side}"]) <= TRL_TOL, (side, ours, theirs)
        assert abs(ours[f"logps/{side}"] - theirs[f"logps/{side}"]) <= 1e-3 * abs(theirs[f"logps/{side}"])
