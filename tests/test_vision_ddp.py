"""DDP on vision-language models where a pass leaves trainable weights unused: the whole vision encoder trained
(``model.freeze_vision: false``, where LLaVA never reads CLIP's last layer norm), and rows without images (a
pass that never runs the encoder or the projector). 2 gloo ranks train as 1 process does, and the weights no
forward used are named."""

import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

import dpokit
from conftest import ROOT
from dpokit.models.vision import tiny_vision
from test_vision import (
    COLOURS,
    FAMILIES,
    LR,
    colour_pairs,
    png,
    train_rows,
    trl_row,
    vision_config,
    weights,
    write_rows,
)
from tolerances import assert_same_metrics, assert_same_weights_after_adamw

pytestmark = [pytest.mark.equivalence,
              pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                 reason="needs torch.distributed with gloo")]

UNUSED = "model: 2 trainable tensor(s) got no gradient in step 1"
NAMES = ("model.vision_tower.post_layernorm.weight", "model.vision_tower.post_layernorm.bias")
"""LLaVA takes CLIP's hidden states of ``vision_feature_layer`` (-1: the last layer's output, before this norm,
which serves only CLIP's pooled output); ``LAYER_NORM`` as ``final/`` names them."""
LAYER_NORM = tuple(name.removeprefix("model.") for name in NAMES)


def two_ranks(tmp_path, cfg: dict, name: str = "two") -> subprocess.CompletedProcess:
    cfg = {**cfg, "distributed": {"strategy": "ddp", "timeout_s": 60}}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "dpokit", "train", "--nproc", "2", str(tmp_path / f"{name}.yaml"),
                           f"run_dir={tmp_path / name}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def same_training(one, two, steps: int) -> None:
    rows_one, rows_two = train_rows(one), train_rows(two)
    assert len(rows_one) == steps and [r["tokens"] for r in rows_one] == [r["tokens"] for r in rows_two]
    # gloo adds the ranks' partial sums: another summation order of the same fp32 terms (tolerances.py).
    assert_same_metrics(rows_one, rows_two, ("loss", "grad_norm", "rewards/margins", "logps/chosen"))
    assert_same_weights_after_adamw(weights(one), weights(two), LR, steps)


@pytest.mark.parametrize("family", FAMILIES)
def test_two_ranks_equal_one_with_the_vision_encoder_trained(tmp_path, capsys, family):
    """2 ranks x batch 2 == 1 rank x batch 4, 7 pairs (an uneven last step), ``model.freeze_vision: false``.
    Before DDP looked for unused parameters, LLaVA's run failed at its second forward on both ranks
    ("Expected to have finished reduction in the prior iteration ...")."""
    path = colour_pairs(tmp_path, 7)

    def cfg(batch_size: int) -> dict:
        config = vision_config(path, family, batch_size=batch_size, max_steps=None, epochs=1)
        config["model"]["freeze_vision"] = False
        return config

    one = dpokit.train(cfg(4), run_dir=str(tmp_path / "one"))
    said_one = capsys.readouterr().err
    proc = two_ranks(tmp_path, cfg(2))
    same_training(one, tmp_path / "two", steps=2)
    tiny_vision(family)[0].save_pretrained(tmp_path / "start")  # the starting weights under final/'s names
    start, trained = load_file(str(tmp_path / "start" / "model.safetensors")), weights(one)
    encoder = [k for k in trained if "vision_tower." in k or "vision_model." in k]
    if family == "tiny-random-llava":
        for said in (said_one, proc.stderr):  # the same note in one process and from rank 0, once
            (line,) = [line for line in said.splitlines() if UNUSED in line]
            assert line.endswith(": " + ", ".join(NAMES))
        # No gradient ever: AdamW skips them, so they are the loaded values to the bit, on both runs.
        for run in (one, tmp_path / "two"):
            assert all(torch.equal(weights(run)[k], start[k]) for k in LAYER_NORM)
    else:  # Idefics3 reads its encoder's last norm: every weight is used
        assert "got no gradient in step 1" not in said_one + proc.stderr
    moved = [k for k in encoder if k not in LAYER_NORM and not torch.equal(trained[k], start[k])]
    assert len(moved) == len(encoder) - (len(LAYER_NORM) if family == "tiny-random-llava" else 0)  # all trained


def test_two_ranks_equal_one_when_a_rank_has_no_image(tmp_path):
    """Rows without images beside image rows (the encoder frozen, the projector trained): a rank whose pass has
    no image never runs the vision encoder or the projector, and in step 2 no rank does. Before DDP looked for
    unused parameters, the ranks' collectives stopped matching (a gloo abort on a size mismatch)."""
    (tmp_path / "red.png").write_bytes(png(COLOURS[0]))
    image = [trl_row("red.png", f"Colour {i}?", "It is red.", "It is blue.") for i in range(2)]
    text = [{"images": [], "prompt": [{"role": "user", "content": [{"type": "text", "text": f"Say hello {i}."}]}],
             "chosen": "Hello.", "rejected": "No."} for i in range(4)]
    # Unshuffled, 2 pairs a step: (image, text), (text, text), (image, text); rank 1 never sees an image.
    path = write_rows(tmp_path, [image[0], text[0], text[1], text[2], image[1], text[3]])
    one = dpokit.train(vision_config(path, batch_size=2, max_steps=None, epochs=1, shuffle=False),
                       run_dir=str(tmp_path / "one"))
    two_ranks(tmp_path, vision_config(path, batch_size=1, max_steps=None, epochs=1, shuffle=False))
    same_training(one, tmp_path / "two", steps=3)
