"""torchrun on 2 CPU processes (gloo): 2 ranks x batch 4 train exactly like 1 rank x batch 8 (DDP and FSDP, uneven
last steps included, a rank with no pair at all included), metrics cover every pair once, a killed or failing
rank stops every rank within a minute, and a 2-rank run killed mid-run resumes bit-identically. Under FSDP each
rank reads only its rows of the weight files, bf16 gathers its weights from fp32 masters and tracks fp32 within
the rounding bound, and CPU offload with activation checkpointing gives bit-identical weights.

Each launch starts two Python processes that import torch and transformers: the tests share launches through
module-scoped fixtures to stay within a couple of minutes on two cores.
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import dpokit
from conftest import write_pairs
from dpokit.errors import ConfigError
from dpokit.training.checkpoint import verify_checkpoint
from dpokit.training.distributed import Dist
from dpokit.training.metrics import read_metrics
from tolerances import EPS32, METRIC_REL, assert_same_weights_after_adamw

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
       "OMP_NUM_THREADS": "1"}
LR = 1e-3  # every run here: 3 AdamW steps at this constant rate


def make_config(folder: Path, n_pairs: int, **sections) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"model": {"name_or_path": "tiny-random-llama"},
           "data": {"train": str(write_pairs(folder / f"pairs-{n_pairs}.jsonl", n_pairs)), "max_length": 64,
                    "max_prompt_length": 32},
           "loss": {"name": "sigmoid", "beta": 0.1},
           "train": {"lr": LR, "epochs": 1, "seed": 3, "progress": False, "save_every": 1},
           "distributed": {"timeout_s": 60}}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(target: str, *args: str) -> list[str]:
    """2 processes on this machine; ``target`` is ``-m dpokit`` or a script path."""
    head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port())]
    return head + (["-m", "dpokit"] if target == "dpokit" else [target]) + list(args)


def run(command: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_same_training(one: Path, two: Path) -> None:
    rows_one, rows_two = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    # Each step (and evaluation) once: rank 0 alone writes.
    assert [(r["split"], r["step"]) for r in rows_one] == [(r["split"], r["step"]) for r in rows_two]
    for a, b in zip(rows_one, rows_two):
        if a["split"] == "warning":
            assert a["warning"] == b["warning"]
            continue
        assert a["tokens"] == b["tokens"]  # every pair counted once over the ranks, none twice
        for key in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                    "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"):
            if key not in a:  # eval rows have no grad_norm
                continue
            # The ranks' partial sums are added by gloo (all-reduce / reduce-scatter): a different summation
            # order of the same fp32 terms; the bound is derived in tolerances.py.
            assert abs(a[key] - b[key]) <= METRIC_REL * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
    steps = sum(r["split"] == "train" for r in rows_one)
    assert_same_weights_after_adamw(weights(one), weights(two), LR, steps)  # |dw| <= 2 lr/step, most < lr/100


def test_share_splits_every_step_once_with_equal_micro_batch_counts():
    for n in range(1, 20):
        indices = list(range(100, 100 + n))
        shares = [Dist(rank=r, world=3).share(indices, 2) for r in range(3)]
        assert len({len(s) for s in shares}) == 1  # same number of micro-batches on every rank
        flat = sorted(i for share in shares for micro in share for i in micro)
        assert flat == indices  # every pair exactly once
        assert all(len(micro) <= 2 for share in shares for micro in share)
    one = Dist().share(list(range(7)), 3)
    assert one == [[0, 1, 2], [3, 4, 5], [6]]  # one process: consecutive micro-batches, as always
    assert Dist(rank=1, world=2).share([], 4) == []  # a step without pairs runs nothing, on every rank


# ---------------------------------------------------------------------------------------------------------- DDP

@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """17 pairs, epochs 1: global steps of 8, 8 and 1 pair (rank 1 has nothing in the last step). Reference
    log-probs from the store, precomputed by both ranks."""
    tmp = tmp_path_factory.mktemp("ddp")
    heldout = str(write_pairs(tmp / "heldout.jsonl", 5))  # the first 5 training pairs: an overlap to report
    single = dpokit.train(make_config(tmp, 17, train={"batch_size": 8}, data={"eval": heldout},
                                      reference={"mode": "store", "store_dir": str(tmp / "store-1")}),
                          run_dir=str(tmp / "single"))
    cfg = write_yaml(tmp / "ddp.yaml", make_config(tmp, 17, train={"batch_size": 4}, distributed={"strategy": "ddp"},
                                                   data={"eval": heldout},
                                                   reference={"mode": "store", "store_dir": str(tmp / "store-2")}))
    started = time.time()
    # The convenience launcher: `dpokit train --nproc 2` execs torchrun (standalone: it picks a free port).
    proc = run([sys.executable, "-m", "dpokit", "train", "--nproc", "2", str(cfg), f"run_dir={tmp / 'ddp'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"single": single, "ddp": tmp / "ddp", "proc": proc, "tmp": tmp, "cfg": cfg,
            "seconds": time.time() - started}


def test_notes_are_printed_once_not_by_every_rank(ddp_runs):
    err = ddp_runs["proc"].stderr
    assert err.count("5 of 5 eval pairs also appear in the training data") == 1, err[-2000:]
    assert err.count("precision auto -> ") == 1


@pytest.mark.equivalence
def test_ddp_two_ranks_equal_one_rank_with_uneven_last_step(ddp_runs):
    assert_same_training(ddp_runs["single"], ddp_runs["ddp"])
    rows = train_rows(ddp_runs["ddp"])
    assert len(rows) == 3 and sum(r["tokens"] for r in rows) == sum(r["tokens"] for r in train_rows(ddp_runs["single"]))
    state = json.loads((ddp_runs["ddp"] / "checkpoints" / "step-3" / "trainer_state.json").read_text())
    assert state["pairs_consumed"] == 17 and state["data_position"] == {"epoch": 0, "offset": 17}
    assert state["world_size"] == 2 and len(state["rng_other_ranks"]) == 1
    err = ddp_runs["proc"].stderr
    # The store was filled by both ranks (34 responses, each rank its own shards) and announced once.
    assert err.count("34 responses computed, 0 reused") == 1, err[-2000:]
    assert len(list((ddp_runs["tmp"] / "store-2").rglob("shard-*.safetensors"))) >= 2
    assert ddp_runs["proc"].stdout.count("run directory:") == 1
    assert verify_checkpoint(ddp_runs["ddp"] / "checkpoints" / "step-3") is None
    assert (ddp_runs["ddp"] / "checkpoints" / "step-3" / "model.safetensors").exists()  # plain format


def test_changed_world_size_is_refused_unless_forced(ddp_runs, tmp_path):
    import shutil

    cfg = yaml.safe_load(ddp_runs["cfg"].read_text())
    run_dir = shutil.copytree(ddp_runs["ddp"], tmp_path / "copy")
    with pytest.raises(ConfigError, match=r"number of processes changed since the checkpoint \(2 -> 1\)"):
        dpokit.train(cfg, run_dir=str(run_dir), resume=True)
    # Forced, the plain DDP checkpoint resumes in one process (with the same global batch: nothing left).
    dpokit.train(cfg, run_dir=str(run_dir), resume=True, force=True, train__batch_size=8)


def test_failing_rank_stops_every_rank_with_one_line(tmp_path):
    """Rank 1 raises in its second forward; every process exits non-zero quickly, rank 1 saying why in one
    line. A test-only entry point injects the failure (no hook in dpokit)."""
    script = tmp_path / "failing_rank.py"
    script.write_text(
        "import os, sys\n"
        "import dpokit\n"
        "import dpokit.methods.dpo as loop\n"
        "real, calls = loop.pair_forward, [0]\n"
        "def failing(*args, **kwargs):\n"
        "    calls[0] += 1\n"
        "    if os.environ['RANK'] == '1' and calls[0] == 2:\n"
        "        raise RuntimeError('injected failure in a bad batch')\n"
        "    return real(*args, **kwargs)\n"
        "loop.pair_forward = failing\n"
        "from dpokit.cli import main\n"
        "sys.exit(main())\n")
    cfg = write_yaml(tmp_path / "cfg.yaml", make_config(tmp_path, 16, train={"batch_size": 4, "save_every": None}))
    started = time.time()
    proc = run(torchrun(str(script), "train", str(cfg), f"run_dir={tmp_path / 'run'}"), timeout=120)
    assert proc.returncode != 0
    assert time.time() - started < 90  # startup included; the failure itself ends the run at once
    lines = [line for line in proc.stderr.splitlines() if line.startswith("dpokit: error: rank 1:")]
    assert lines == ["dpokit: error: rank 1: RuntimeError: injected failure in a bad batch"], proc.stderr[-3000:]
    assert not (tmp_path / "run" / "final").exists()


def write_unpaired(path: Path, n: int) -> Path:
    with path.open("w") as fh:
        for i in range(n):
            answer = f" happy to help {i}" if i % 3 else f" not my problem {i}"
            fh.write(json.dumps({"prompt": f"Question {i}: can you help me with task {i * 7 % 11}?",
                                 "completion": answer, "label": bool(i % 3)}) + "\n")
    return path


@pytest.mark.equivalence
def test_kto_two_fsdp_ranks_equal_one_rank(tmp_path):
    """KTO's reference point z_0 is one per step over every rank (dpokit.methods.kto.kto_prepare): 13 examples, global
    steps of 8 and 5 (batch 2 x accumulation 2 x 2 ranks; rank 1 runs a placeholder in the KL pass and the
    training passes of the last step), 5 held-out examples in batches of 2, evaluated at steps 0 and 2."""
    sections = {"data": {"eval": str(write_unpaired(tmp_path / "eval.jsonl", 5))}, "loss": {"name": "kto"},
                "eval": {"every": 2, "batch_size": 2}}
    cfg = make_config(tmp_path, 1, train={"batch_size": 8}, **sections)
    cfg["data"]["train"] = str(write_unpaired(tmp_path / "train.jsonl", 13))
    single = dpokit.train(cfg, run_dir=str(tmp_path / "single"))
    cfg["train"].update(batch_size=2, grad_accum=2)
    cfg["distributed"]["strategy"] = "fsdp"
    proc = run(torchrun("dpokit", "train", str(write_yaml(tmp_path / "fsdp.yaml", cfg)),
                        f"run_dir={tmp_path / 'fsdp'}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = train_rows(tmp_path / "fsdp")
    assert len(rows) == 2 and rows[1]["kl"] > 0  # the second step's z_0 from both ranks' examples
    assert_same_training(single, tmp_path / "fsdp")
    for a, b in zip(read_metrics(single / "metrics.jsonl"), read_metrics(tmp_path / "fsdp" / "metrics.jsonl")):
        assert abs(a.get("kl", 0) - b.get("kl", 0)) <= METRIC_REL * max(1.0, abs(a.get("kl", 0))), (a, b)


# --------------------------------------------------------------------------------------------------------- FSDP

@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """21 pairs, epochs 1, batch 2 x accumulation 2 x 2 ranks: global steps of 8, 8 and 5 pairs (3 + 2: rank 1
    runs a placeholder micro-batch), micro-batches cut into passes by ``train.pass_tokens``. Policy and
    reference both sharded. 5 held-out pairs in batches of 2 (rank
    1 again runs a placeholder), evaluated at steps 0, 2 (just before a checkpoint) and 3."""
    tmp = tmp_path_factory.mktemp("fsdp")
    held_out = {"data": {"eval": str(write_pairs(tmp / "eval.jsonl", 5))}, "eval": {"every": 2, "batch_size": 2}}
    single = dpokit.train(make_config(tmp, 21, train={"batch_size": 8}, **held_out), run_dir=str(tmp / "single"))
    # pass_tokens 95: a micro-batch of two pairs (40-55 positions each) runs as one pass or two, so the ranks'
    # pass counts differ from step to step and the shorter rank must add placeholder passes.
    cfg = write_yaml(tmp / "fsdp.yaml", make_config(tmp, 21, train={"batch_size": 2, "grad_accum": 2,
                                                                     "pass_tokens": 95},
                                                    distributed={"strategy": "fsdp"}, **held_out))
    proc = run(torchrun("dpokit", "train", str(cfg), f"run_dir={tmp / 'fsdp'}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"single": single, "fsdp": tmp / "fsdp", "cfg": cfg, "tmp": tmp, "proc": proc}


@pytest.mark.equivalence
def test_fsdp_two_ranks_equal_one_rank_with_uneven_last_step(fsdp_runs):
    assert_same_training(fsdp_runs["single"], fsdp_runs["fsdp"])
    step = fsdp_runs["fsdp"] / "checkpoints" / "step-2"
    names = {p.name for p in step.iterdir()}
    assert ".metadata" in names and "model.safetensors" not in names  # DCP shards
    manifest = json.loads((step / "manifest.json").read_text())
    assert ".metadata" in manifest and sum(name.endswith(".distcp") for name in manifest) == 2
    assert verify_checkpoint(step) is None
    # final/ is one plain Hugging Face folder, loadable without dpokit.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fsdp_runs["fsdp"] / "final")
    assert sum(p.numel() for p in model.parameters()) > 0


def rank_pids(parent: int) -> dict[int, int]:
    """RANK -> pid of the torchrun workers that are children of ``parent`` (Linux /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        ranks = [item[5:] for item in env if item.startswith(b"RANK=")]
        if ranks:
            found[int(ranks[0])] = int(entry.name)
    return found


@pytest.mark.equivalence
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks' pids through /proc")
def test_killed_rank_stops_every_rank_then_resume_is_bit_identical(fsdp_runs):
    run_dir = fsdp_runs["tmp"] / "killed"
    proc = subprocess.Popen(torchrun("dpokit", "train", str(fsdp_runs["cfg"]), f"run_dir={run_dir}"), cwd=ROOT,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        end = time.time() + 180
        while not (run_dir / "checkpoints" / "step-1").is_dir():  # renamed into place only when complete
            assert proc.poll() is None and time.time() < end, "the run ended before a rank could be killed"
            time.sleep(0.005)
        workers = rank_pids(proc.pid)
        assert sorted(workers) == [0, 1]
        os.kill(workers[1], signal.SIGKILL)
        killed_at = time.time()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode != 0
        assert time.time() - killed_at < 60
    finally:
        if proc.poll() is None:
            proc.kill()
    for pid in workers.values():  # every rank is gone, not just the launcher
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert not (run_dir / "final").exists()

    done = run(torchrun("dpokit", "train", str(fsdp_runs["cfg"]), f"run_dir={run_dir}", "--resume"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("resuming from") == 1  # rank 0 says it, once
    straight, resumed = weights(fsdp_runs["fsdp"]), weights(run_dir)
    assert straight.keys() == resumed.keys()
    # Bit-identical, on any hardware: both runs make the same operations on the same shapes with the same
    # world size on the same machine, so they round identically; resuming must restore every bit of state.
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert [r["step"] for r in train_rows(run_dir)] == [1, 2, 3]
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "eval"] == [0, 2, 3]


def test_fsdp_with_lora_is_a_config_error():
    with pytest.raises(ConfigError, match="distributed.strategy: 'fsdp' with model.lora"):
        dpokit.load_config({"model": {"lora": {"r": 4}}, "distributed": {"strategy": "fsdp"}})


# ------------------------------------------------------------------------------------ FSDP loading and precision

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The tiny model as a Hugging Face folder (safetensors, tied embeddings: no lm_head.weight stored)."""
    from dpokit.models.loading import tiny_model, tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny-folder")
    tokenizer = tiny_tokenizer()
    tiny_model(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def probe(folder: Path, out: Path, *extra: str) -> list[dict]:
    proc = run(torchrun(str(ROOT / "tests" / "fsdp_probe.py"), str(folder), str(out), *extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank-{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.equivalence
def test_fsdp_reads_only_each_ranks_rows_and_equals_a_plain_load(tiny_folder, tmp_path):
    ranks = probe(tiny_folder, tmp_path)
    total = ranks[0]["parameters"]
    # Policy and reference are each read half by each rank (every dim 0 of the tiny model is even), so a rank
    # reads `total` elements; loading whole (and copying the reference) holds 2 x total on every rank.
    assert [r["elements_read"] for r in ranks] == [total, total]
    assert all(r["skeletons"] == [True, True] for r in ranks)
    assert ranks[0]["policy_equal"] and ranks[0]["reference_equal"]  # gathered shards == the file's tensors
    assert ranks[0]["policy_names"] == ranks[0]["reference_names"] and "lm_head.weight" not in ranks[0]["policy_names"]
    assert all(r["tied"] for r in ranks)  # the head is the embedding, as in a plain load
    # Non-persistent buffers (rotary inv_freq) are not in the file: rebuilt with the skeleton, not left empty.
    assert all(r["buffers"] and r["buffers_equal"] for r in ranks)
    # A forward on gathered weights makes the plain model's operations on the same values: bit-identical.
    assert ranks[0]["logps"] == ranks[0]["ref_logps"] == ranks[0]["plain_logps"]
    # A forward without backward leaves FSDP2's root (the tied embedding) gathered unless told otherwise: the
    # reference resharded itself, the policy after evaluation is resharded by Dist.reshard.
    assert all(r["roots_gathered"] == {"policy": True, "reference": False, "policy_after_reshard": False}
               for r in ranks)


@pytest.mark.equivalence
def test_fsdp_bf16_gathers_bf16_from_fp32_masters_and_holds_the_reference_in_bf16(tiny_folder, tmp_path):
    ranks = probe(tiny_folder, tmp_path, "bf16")
    for r in ranks:
        assert r["gathered_dtype"] == "torch.bfloat16"  # MixedPrecisionPolicy: cast before the all-gather
        assert r["policy_dtype"] == "torch.float32" and r["reference_dtype"] == "torch.bfloat16"
        # The reference's stored bf16 values are the policy's fp32 masters rounded once (round to nearest),
        # exactly what the policy's gather rounds them to: at the start pi and pi_ref are the same function.
        assert r["logps"] == r["ref_logps"]
    assert ranks[0]["reference_equal"]  # the file's fp32 values rounded to bf16


def test_offloaded_shards_are_materialized_on_the_cpu_and_buffers_on_the_ranks_device(monkeypatch):
    """FSDP2's CPUOffloadPolicy refuses shards that are not on the CPU, so a skeleton's shards must be given
    CPU storage under ``distributed.offload: params`` even when the rank computes on a GPU (its buffers, which
    are not sharded, stay on the GPU). No GPU here: ``fully_shard`` is replaced and the devices asked for are
    recorded; a GPU run covers the rest."""
    from torch import nn

    import dpokit.training.distributed as distributed

    asked = []
    monkeypatch.setattr(distributed, "_fully_shard", lambda module, *args: module)
    monkeypatch.setattr(distributed, "is_skeleton", lambda model: True)
    monkeypatch.setattr(distributed, "materialize", lambda sharded, model, device, buffer_device: asked.append(
        (device, buffer_device)))
    gpu, cpu = torch.device("cuda", 1), torch.device("cpu")
    for offload in ("params", "none"):
        Dist(device=gpu, strategy="fsdp", active=True, offload=offload)._shard(nn.Linear(2, 2))
    assert asked == [(cpu, gpu), (gpu, gpu)]
    assert distributed.shard_device(cpu, offload=False) == distributed.shard_device(cpu, offload=True) == cpu


def test_materialize_puts_parameters_and_buffers_on_the_devices_asked():
    """The parameters on one device, the skeleton's buffers on another (here meta, the only second device a
    CPU machine has), the parameters' values the stored ones; no process group needed (a plain tensor is one
    whole shard)."""
    import contextlib

    from torch import nn

    from dpokit.models import sharded

    stored = {"weight": torch.arange(6.0).reshape(2, 3), "bias": torch.tensor([7.0, 8.0])}
    with sharded.parameters_on_meta():
        model = nn.Linear(3, 2)
    model.register_buffer("scale", torch.tensor([0.5]), persistent=False)
    setattr(model, sharded.ATTR, sharded.Weights(lambda: contextlib.nullcontext(stored.get), torch.float32))
    assert model.weight.device.type == "meta"
    sharded.materialize(model, model, torch.device("cpu"), torch.device("meta"))
    assert model.scale.device.type == "meta"
    assert torch.equal(model.weight, stored["weight"]) and torch.equal(model.bias, stored["bias"])


def test_streamed_weight_file_is_read_back_by_safetensors_and_split_like_save_pretrained(tmp_path):
    """The export of a sharded model writes its safetensors file tensor by tensor (gathering each in turn):
    safetensors' own reader must read back every tensor, dtype and shape exactly. Plain tensors here (no
    process group): ``gathered`` passes them through, so the file format is what is checked."""
    from dpokit.models.sharded import stream_safetensors, weight_files

    tensors = [("model.a", torch.randn(3, 4)), ("b", torch.arange(5, dtype=torch.bfloat16)),
               ("c", torch.tensor(2, dtype=torch.int64)), ("empty", torch.ones(0, 3)),
               ("mask", torch.tensor([True, False, True]))]
    stream_safetensors(tmp_path / "model.safetensors", tensors)
    back = load_file(str(tmp_path / "model.safetensors"))
    assert set(back) == {name for name, _ in tensors}
    for name, tensor in tensors:
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    stream_safetensors(None, tensors)  # another rank: gathers, writes nothing
    with pytest.raises(OSError):  # a failed write still gathers every tensor (no rank left waiting), then raises
        stream_safetensors(tmp_path / "missing" / "model.safetensors", tensors)
    # 48 + 10 + 8 + 0 + 3 bytes: one file, or split before the tensor that would pass the limit.
    assert weight_files(tensors) == {"model.safetensors": [name for name, _ in tensors]}
    assert weight_files(tensors, limit=50) == {"model-00001-of-00002.safetensors": ["model.a"],
                                               "model-00002-of-00002.safetensors": ["b", "c", "empty", "mask"]}


@pytest.mark.equivalence
def test_fsdp_offload_and_checkpointing_give_the_same_weights(fsdp_runs):
    """``distributed.offload: params`` and ``train.gradient_checkpointing`` together, else the run of
    ``fsdp_runs``: the same operations on the same values (here the shards already live on the CPU, so
    offloading moves nothing; checkpointing recomputes each layer's forward with the same kernels), so the
    weights are bit-identical on any hardware that runs both on the same machine."""
    cfg = yaml.safe_load(fsdp_runs["cfg"].read_text())
    cfg["distributed"]["offload"] = "params"
    cfg["train"]["gradient_checkpointing"] = True
    run_dir = fsdp_runs["tmp"] / "offload"
    proc = run(torchrun("dpokit", "train", str(write_yaml(fsdp_runs["tmp"] / "offload.yaml", cfg)),
                        f"run_dir={run_dir}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain, offloaded = weights(fsdp_runs["fsdp"]), weights(run_dir)
    assert plain.keys() == offloaded.keys()
    for name in plain:
        assert torch.equal(plain[name], offloaded[name]), name
    assert [r["loss"] for r in train_rows(run_dir)] == [r["loss"] for r in train_rows(fsdp_runs["fsdp"])]


def test_optimizer_offload_and_offload_without_fsdp_are_config_errors():
    with pytest.raises(ConfigError, match="distributed.offload: 'optimizer' is not supported"):
        dpokit.load_config({"distributed": {"strategy": "fsdp", "offload": "optimizer"}})
    with pytest.raises(ConfigError, match="distributed.offload: 'params' needs distributed.strategy: fsdp"):
        dpokit.load_config({"distributed": {"offload": "params"}})


BF16_U = 2.0 ** -8  # bf16's unit roundoff: 8 significant bits, round to nearest
# Roundings to bf16 on the way from the input ids to one logit of the tiny model (2 layers) with the weights
# gathered in bf16 under autocast: per layer, attention 9 (norm output, q/k/v weight, projection output,
# scores, probabilities, attention output, o weight, o output, residual sum) and MLP 7 (norm output, gate/up
# weight, their outputs, the gated product, down weight, down output, residual sum); then the final norm, the
# head weight and the logit: 2 x 16 + 3 = 35. To first order the relative errors add, each relative to the
# magnitudes that enter a product (Cauchy-Schwarz: |z_j| <= ||h|| ||W_j||), so |dz_j| <= 35 u Z with
# Z = sqrt(hidden) max|g| max_j ||W_j|| (RMSNorm output of norm sqrt(hidden) times the final norm's weight g,
# against the tied embedding's largest row).
BF16_ROUNDINGS = 35


@pytest.mark.equivalence
def test_fsdp_bf16_mixed_precision_tracks_fp32_within_the_rounding_bound(fsdp_runs):
    """``train.precision: bf16`` under FSDP2 (bf16 gathers of fp32 masters, fp32 gradient reduction) against
    the fp32 run of ``fsdp_runs``: the same steps, log-probs within the bound bf16's rounding allows, and the
    saved weights fp32 masters within AdamW's per-step reach of the fp32 run's."""
    from dpokit.models.loading import tiny_tokenizer
    from tolerances import adam_update_bound

    cfg = yaml.safe_load(fsdp_runs["cfg"].read_text())
    cfg["train"]["precision"] = "bf16"
    run_dir = fsdp_runs["tmp"] / "bf16"
    proc = run(torchrun("dpokit", "train", str(write_yaml(fsdp_runs["tmp"] / "bf16.yaml", cfg)),
                        f"run_dir={run_dir}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    fp32, bf16 = weights(fsdp_runs["fsdp"]), weights(run_dir)
    assert all(t.dtype == torch.float32 for t in bf16.values())  # the masters stay fp32
    steps = len(train_rows(run_dir))
    reach = LR * sum(adam_update_bound(t) for t in range(1, steps + 1))  # how far AdamW moves any weight
    for name in fp32:  # both runs start from the same weights: whatever the gradients, |dw| <= 2 reach
        assert (fp32[name] - bf16[name]).abs().max().item() <= 2 * reach + steps * 2 * EPS32, name
    embedding = fp32["model.embed_tokens.weight"]
    hidden = embedding.shape[1]
    # Z of the comment above, with the weights anywhere AdamW could have taken them during the run.
    g = fp32["model.norm.weight"].abs().max().item() + reach
    z = hidden ** 0.5 * g * (embedding.norm(dim=1).max().item() + hidden ** 0.5 * reach)
    tokenizer = tiny_tokenizer()
    pairs = [json.loads(line) for line in Path(cfg["data"]["train"]).read_text().splitlines()]
    n_max = max(len(tokenizer(p[k])["input_ids"]) for p in pairs for k in ("chosen", "rejected")) + 1  # + end
    # A token's log-prob z_y - logsumexp(z) moves by at most 2 max_j |dz_j|; a response sums <= n_max of them.
    bound = 2 * BF16_ROUNDINGS * BF16_U * z * n_max
    for a, b in zip(train_rows(fsdp_runs["fsdp"]), train_rows(run_dir)):
        assert a["tokens"] == b["tokens"]
        for key in ("logps/chosen", "logps/rejected"):
            assert abs(a[key] - b[key]) <= bound, (a["step"], key, a[key], b[key], bound)
    first = train_rows(run_dir)[0]
    # Step 1: pi = pi_ref, and both are computed from the same bf16 values (masters rounded at the gather,
    # the reference rounded at load), so every log-ratio is exactly 0 and the loss is ln 2 to fp32 rounding.
    assert abs(first["loss"] - math.log(2)) <= 4 * EPS32 and first["rewards/margins"] == 0
