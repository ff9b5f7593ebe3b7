"""Generation: left padding with correct positions (batched greedy == unbatched greedy == a naive loop without a
cache), seeding, EOS, temperature and top-p, prompt encoding as in training."""

import pytest
import torch

from dpokit.errors import DpokitError
from dpokit.models.generate import SamplingParams, encode_prompts, filter_logits, generate
from dpokit.models.loading import tiny_model, tiny_tokenizer

PROMPTS = ["The quick brown fox", "Question: what is the capital of France? Answer:", "I",
           "Please write a haiku about the sea."]


def sharpen(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Re-draw every matrix with a large std: a freshly initialized tiny model is near-uniform and greedy
    decoding repeats one token, which would make 'batched equals unbatched' a weak check."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model.eval()




@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama(tok):
    return sharpen(tiny_model(len(tok), seed=0))


@pytest.fixture(scope="module")
def gpt2(tok):
    # Absolute position embeddings: unlike RoPE (relative), a wrong position id changes the output, so this model
    # catches left-padding bugs that a Llama would hide.
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1,
                        eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return sharpen(GPT2LMHeadModel(config), seed=1)


def prompt_ids(tok):
    return [tok(p, add_special_tokens=False).input_ids for p in PROMPTS]


@torch.no_grad()
def naive_greedy(model, ids, n):
    """Greedy decoding the slow way: one unpadded sequence, full forward at every step, no cache."""
    seq = list(ids)
    for _ in range(n):
        logits = model(input_ids=torch.tensor([seq])).logits[0, -1]
        seq.append(int(logits.argmax()))
    return seq[len(ids):]


@pytest.mark.equivalence
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_batched_greedy_equals_unbatched_and_naive(name, tok, request):
    model = request.getfixturevalue(name)
    ids = prompt_ids(tok)
    assert len({len(p) for p in ids}) == len(ids)  # different lengths: real left padding
    params = SamplingParams(max_new_tokens=12, temperature=0, batch_size=len(ids))
    no_eos: list[int] = []
    # Token ids are compared exactly: batched, unbatched and uncached forwards differ by fp32 round-off
    # (~1e-6 in a logit), which changes an argmax only at a near-tie; sharpened logits are ~1 apart, so across
    # 2 x 4 x 12 picks a gap below 1e-5 has odds of ~1e-3 on any hardware. A wrong position or mask changes
    # the continuation outright (test_wrong_positions_would_be_caught).
    batched = generate(model, tok, ids, params, eos_ids=no_eos)
    for prompt, sample in zip(ids, batched):
        alone = generate(model, tok, [prompt], params, eos_ids=no_eos)[0]
        assert sample.response_ids == alone.response_ids
        assert sample.response_ids == naive_greedy(model, prompt, 12)
        assert len(set(sample.response_ids)) > 3  # a varied continuation, not one token repeated


def test_wrong_positions_would_be_caught(tok, gpt2, monkeypatch):
    """The check above has teeth: with positions counted from the padded start, batched output differs."""
    import dpokit.models.generate as gen

    ids = prompt_ids(tok)
    params = SamplingParams(max_new_tokens=8, temperature=0, batch_size=len(ids))
    good = [s.response_ids for s in generate(gpt2, tok, ids, params, eos_ids=[])]
    monkeypatch.setattr(gen, "position_ids_from_mask", lambda mask: torch.arange(mask.shape[1]).expand_as(mask))
    bad = [s.response_ids for s in generate(gpt2, tok, ids, params, eos_ids=[])]
    assert good != bad


def test_sampling_is_seeded(tok, llama):
    ids = prompt_ids(tok)
    draw = lambda seed: [s.response_ids for s in generate(  # noqa: E731
        llama, tok, ids, SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=seed), eos_ids=[])]
    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_stops_at_eos_and_keeps_it(tok, llama):
    ids = prompt_ids(tok)
    params = SamplingParams(max_new_tokens=12, temperature=0, batch_size=len(ids))
    free = generate(llama, tok, ids, params, eos_ids=[])
    target = free[0].response_ids
    stop = next(t for i, t in enumerate(target) if i >= 2 and t not in target[:i])
    cut = generate(llama, tok, ids, params, eos_ids=[stop])
    end = target.index(stop) + 1
    assert cut[0].response_ids == target[:end] and cut[0].finished
    for full, short in zip(free, cut):  # other rows continue until they hit the stop token themselves
        expected = full.response_ids[:full.response_ids.index(stop) + 1] if stop in full.response_ids \
            else full.response_ids
        assert short.response_ids == expected
        assert short.finished == (stop in full.response_ids)
    assert not free[0].finished and len(free[0].response_ids) == 12


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, 1.0, 0.6))[0].tolist()
    assert kept == [True, True, False, False]  # 0.5 < 0.6, so the second token is needed to reach top_p
    assert torch.isfinite(filter_logits(logits, 1.0, 0.5))[0].tolist() == [True, False, False, False]
    assert torch.isfinite(filter_logits(logits, 1.0, 1.0)).all()
    # Temperature scales the logits before the softmax. x / 0.5 and x * 2 are both exact in binary floating
    # point; assert_close's fp32 default (rtol 1.3e-6 ~ 10 ulps) only allows for an implementation that rounds
    # x * (1 / T) instead, and a missing or inverted temperature is off by a factor 2 or 4.
    torch.testing.assert_close(filter_logits(logits, 0.5, 1.0), logits * 2)


def test_tiny_top_p_and_zero_temperature_are_greedy(tok, llama):
    ids = prompt_ids(tok)
    greedy = generate(llama, tok, ids, SamplingParams(max_new_tokens=6, temperature=0), eos_ids=[])
    nucleus = generate(llama, tok, ids, SamplingParams(max_new_tokens=6, temperature=1.0, top_p=1e-6, seed=5),
                       eos_ids=[])
    assert [s.response_ids for s in greedy] == [s.response_ids for s in nucleus]


def test_chat_prompts_end_with_the_generation_prompt(tok):
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    chat, plain = encode_prompts(tok, [messages, "Hello there"], max_prompt_length=32, max_length=64)
    assert tok.decode(chat).endswith("<|im_start|>assistant\n")
    assert tok.decode(chat).startswith("<|im_start|>user\nWrite a haiku")
    assert plain == tok("Hello there", add_special_tokens=False).input_ids
    # Long prompts keep their last tokens, as in training.
    long = encode_prompts(tok, ["word " * 100], max_prompt_length=16, max_length=64)[0]
    assert len(long) == 16


def test_bad_sampling_params_are_one_line_errors():
    with pytest.raises(DpokitError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(DpokitError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(DpokitError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


def test_draw_samples_each_token_with_its_probability_and_never_a_zero_one():
    from dpokit.models.generate import draw

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]]).expand(200_000, -1)
    picks = draw(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(picks, minlength=6).double() / len(picks)
    assert freq[[0, 2, 5]].sum() == 0  # probability 0: never, not even at u = 0 or at the top of the range
    # Each frequency is a mean of 200k Bernoulli draws: standard error sqrt(p (1 - p) / n) <= 1.1e-3, so a
    # 5-sigma bound of 6e-3 fails a correct sampler with probability < 1e-6 and catches any bias above it.
    torch.testing.assert_close(freq[[1, 3, 4]], torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), atol=6e-3,
                               rtol=0)
    # Rows are independent and unnormalized probabilities work (the total scales the uniform).
    rows = draw(torch.tensor([[0.0, 2.0], [3.0, 0.0]]), torch.Generator().manual_seed(1))
    assert rows.tolist() == [1, 0]
