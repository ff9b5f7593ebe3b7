"""Run by ``tests/test_distributed.py`` under torchrun (2 gloo ranks): load a model folder the FSDP way (skeleton,
then each rank's shards) and write what each rank saw to OUT/rank-N.json.

    torchrun --nproc_per_node 2 tests/fsdp_probe.py MODEL_FOLDER OUT [bf16]

The weight files are read through a counting wrapper (test-only; dpokit has no hook for it) so the test can
check that a rank reads only its rows.
"""

import contextlib
import json
import sys
from types import SimpleNamespace

import torch
from torch.distributed.tensor import DTensor

import dpokit.models.sharded as sharded
from dpokit.config import DistributedConfig
from dpokit.data.batch import collate_responses
from dpokit.models.loading import ModelSource, load_model, load_models
from dpokit.models.logprobs import batch_logps
from dpokit.training.checkpoint import full_state_dict
from dpokit.training.distributed import setup

folder, out, bf16 = sys.argv[1], sys.argv[2], sys.argv[3:] == ["bf16"]
elements_read = [0]
real_open = sharded._open_files


@contextlib.contextmanager
def counting(files):
    with real_open(files) as read:
        def counted(name):
            rows = read(name)
            if rows is None:
                return None

            class Rows:
                def __getitem__(self, key):
                    tensor = rows[key]
                    elements_read[0] += tensor.numel()
                    return tensor
            return Rows()
        yield counted


sharded._open_files = counting
dist = setup(DistributedConfig(strategy="fsdp"))
dist.compute_dtype = torch.bfloat16 if bf16 else None
model_cfg = SimpleNamespace(name_or_path=folder, gguf_file=None, ref_name_or_path=None, ref_gguf_file=None,
                            revision=None, dtype="float32", trust_remote_code=False, attn_implementation="sdpa",
                            disable_dropout=True, lora=None)
models = load_models(model_cfg, "always", skeleton=True)
skeletons = [sharded.is_skeleton(models.policy), sharded.is_skeleton(models.reference)]
policy, reference = dist.wrap_policy(models.policy), dist.wrap_frozen(models.reference)
seen = {}
layer = models.policy.get_decoder().layers[0].self_attn.q_proj
layer.register_forward_hook(lambda module, args, output: seen.__setitem__("gathered", str(module.weight.dtype)))
batch = collate_responses([([5, 6, 7, 8], [9, 10, 11]), ([12, 13], [14, 15, 16, 17])], 0, layout="packed")
with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
    logps = policy(batch).logps
    ref_logps = reference(batch).logps


def root_gathered(model):
    """FSDP2 registers a unit's whole (plain) weights while gathered, its DTensor shards otherwise."""
    return not isinstance(model.get_input_embeddings().weight, DTensor)


# After a forward without backward: the reference's root resharded itself, the policy's waits for a backward.
roots = {"policy": root_gathered(models.policy), "reference": root_gathered(models.reference)}
dist.reshard(policy)
roots["policy_after_reshard"] = root_gathered(models.policy)
gathered_policy, gathered_reference = full_state_dict(policy), full_state_dict(reference)
plain = load_model(ModelSource("folder", folder)).eval()
plain_buffers = dict(plain.named_buffers())
result = {"elements_read": elements_read[0], "skeletons": skeletons, "gathered_dtype": seen["gathered"],
          "policy_dtype": str(next(policy.parameters()).dtype),
          "reference_dtype": str(next(reference.parameters()).dtype),
          "tied": models.policy.lm_head.weight is models.policy.get_input_embeddings().weight,
          "buffers": sorted(name for name, _ in models.policy.named_buffers()),
          "buffers_equal": all(torch.equal(b, plain_buffers[name]) for name, b in models.policy.named_buffers()),
          "logps": logps.tolist(), "ref_logps": ref_logps.tolist(), "roots_gathered": roots}
if dist.is_main:
    expected = plain.state_dict()
    for key, gathered in (("policy", gathered_policy), ("reference", gathered_reference)):
        weights = {name.removeprefix("model."): t for name, t in gathered.items()}
        result[f"{key}_names"] = sorted(weights)
        result[f"{key}_equal"] = all(torch.equal(t, expected[name].to(t.dtype)) for name, t in weights.items())
    result["parameters"] = sum(p.numel() for p in plain.parameters())
    with torch.no_grad():
        result["plain_logps"] = batch_logps(plain, batch)[0].tolist()
with open(f"{out}/rank-{dist.rank}.json", "w") as fh:
    json.dump(result, fh)
dist.close()
