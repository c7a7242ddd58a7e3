"""The engine on real tiny checkpoints, with transformers' generate() as the oracle.

Covers greedy equality per architecture, continuous batching (chunked prefill, requests joining
and leaving, preemption) giving the same tokens as each prompt alone, seeded sampling independent
of the batch, the stop conditions with their finish reasons and usage, validation, and abort.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from moeray.cluster.config import EngineConfig
from moeray.workers import LLM, FinishReason, SamplingParams
from moeray.workers.engine import LLMEngine

from tests.checkpoints import ARCHS, make_tiny_checkpoint

PROMPTS = [[5, 17, 99, 3], [200, 11, 45, 46, 47, 60, 61, 62, 63, 70, 71, 300, 301], [42]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    cache: dict[tuple[str, tuple[tuple[str, object], ...]], Path] = {}

    def get(arch: str, **overrides: object) -> Path:
        key = (arch, tuple(sorted(overrides.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(arch)
            cache[key] = make_tiny_checkpoint(d, arch, **overrides)
        return cache[key]

    return get


def hf_greedy(path: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy continuation (stops at the checkpoint's EOS like moeray)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(arch: str, checkpoint: Callable[..., Path]) -> None:
    path = checkpoint(arch)
    llm = LLM(model=path, block_size=4)
    outs = llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == hf_greedy(path, prompt, GREEDY.max_tokens), (arch, prompt)
        assert out.prompt_token_ids == prompt
        assert out.usage.prompt_tokens == len(prompt)
        assert out.usage.completion_tokens == len(out.token_ids)


def test_continuous_batching_with_chunks_and_preemption_equals_alone(
    checkpoint: Callable[..., Path],
) -> None:
    path = checkpoint("qwen2_moe")
    prompts = [list(range(3, 3 + n)) for n in (3, 17, 40, 9, 25, 2)]
    params = [SamplingParams(temperature=0.0, max_tokens=m) for m in (10, 6, 12, 3, 8, 9)]
    single = LLM(model=path)
    alone = [single.generate(p, sp)[0].token_ids for p, sp in zip(prompts, params)]
    llm = LLM(
        model=path,
        block_size=4,
        num_kv_blocks=16,  # 64 tokens for ~150 of context in flight: preemption must happen
        max_num_seqs=3,  # 6 requests: later ones join as earlier ones leave
        max_num_batched_tokens=8,
        prefill_chunk_size=5,  # the 40-token prompt takes 8 chunked steps
    )
    batched = llm.generate(prompts, params)
    assert [o.token_ids for o in batched] == alone
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_free_blocks == 16


def test_seeded_sampling_is_reproducible_across_batch_compositions(
    checkpoint: Callable[..., Path],
) -> None:
    path = checkpoint("mixtral")
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=12)
    prompt = PROMPTS[1]
    alone = LLM(model=path).generate(prompt, seeded)[0].token_ids
    llm = LLM(model=path, max_num_batched_tokens=6, prefill_chunk_size=4, block_size=4)
    others = [SamplingParams(temperature=1.0, max_tokens=7), SamplingParams(seed=5, top_k=3)]
    outs = llm.generate([PROMPTS[0], prompt, PROMPTS[2]], [others[0], seeded, others[1]])
    assert outs[1].token_ids == alone
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, seed=99, max_tokens=12)
    assert llm.generate(prompt, other_seed)[0].token_ids != alone


def test_logprobs_equal_transformers_log_softmax(checkpoint: Callable[..., Path]) -> None:
    """Each generated token's logprob and the k likeliest are log_softmax of transformers'
    logits at that position (raw: a sampled request at temperature 1.3 reports the model's
    distribution, not the tempered one); streaming deltas add up to the whole."""
    import transformers

    path = checkpoint("mixtral")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    llm = LLM(model=path, block_size=4)
    params = [SamplingParams(temperature=0.0, max_tokens=6, logprobs=3),
              SamplingParams(temperature=1.3, seed=3, max_tokens=5, logprobs=0),
              SamplingParams(temperature=0.0, max_tokens=4)]  # fmt: skip
    outs = llm.generate(PROMPTS, params)
    assert outs[2].logprobs is None
    for prompt, out, sp in zip(PROMPTS, outs[:2], params):
        assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + out.token_ids])).logits[0].float()
        expected = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)  # [N, V]
        for pos, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
            assert entry.token_id == tok
            assert entry.text == llm.tokenizer.decode([tok], skip_special_tokens=False)
            assert abs(entry.logprob - expected[pos, tok].item()) < 1e-4
            top = expected[pos].topk(3)
            assert [t.token_id for t in entry.top] == top.indices.tolist()[: sp.logprobs]
            for t, v in zip(entry.top, top.values.tolist()):
                assert abs(t.logprob - v) < 1e-4
        if sp.temperature == 0.0:  # greedy: the token taken is the likeliest
            assert all(e.top[0].token_id == e.token_id for e in out.logprobs)
    with pytest.raises(ValueError, match="logprobs"):
        llm.generate(PROMPTS[0], SamplingParams(logprobs=21))
    two = SamplingParams(temperature=0.0, max_tokens=6, logprobs=2)
    whole = llm.generate(PROMPTS[1], two)[0].logprobs
    engine = llm.engine
    engine.add_request("s", PROMPTS[1], two, stream=True)
    deltas: list = []
    while engine.has_unfinished():
        for o in engine.step():
            deltas += o.delta_logprobs or []
    assert whole is not None and len(whole) == 6 and deltas == whole


def test_prompt_logprobs_equal_transformers_log_softmax(checkpoint: Callable[..., Path]) -> None:
    """prompt_logprobs: each prompt token's log-probability given the tokens before it (None
    for the first) and the k likeliest, log_softmax of transformers' logits; the same when the
    prompt is prefilled in chunks beside other requests, when it was cached by an earlier request
    (such a request computes its whole prompt) and after preemption (recorded once)."""
    import transformers

    path = checkpoint("mixtral")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompt = list(range(3, 43))  # 40 tokens
    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)  # [P, V]

    def check(entries: list, k: int) -> None:
        assert len(entries) == len(prompt) and entries[0] is None
        for p, e in enumerate(entries[1:]):
            assert e.token_id == prompt[p + 1]
            assert abs(e.logprob - lp[p, prompt[p + 1]].item()) < 1e-4
            top = lp[p].topk(k)
            assert [t.token_id for t in e.top] == top.indices.tolist()
            assert all(abs(t.logprob - v) < 1e-4 for t, v in zip(e.top, top.values.tolist()))

    llm = LLM(model=path, block_size=4, max_num_batched_tokens=8, prefill_chunk_size=5,
              num_kv_blocks=24, max_num_seqs=3)  # fmt: skip
    asked = SamplingParams(temperature=0.0, max_tokens=6, prompt_logprobs=3)
    plain = SamplingParams(temperature=0.0, max_tokens=6)
    first = llm.generate(prompt, plain)[0]  # caches the prompt's blocks
    assert llm.engine.block_manager.num_cached_blocks > 0
    outs = llm.generate([prompt, list(range(50, 80)), prompt], [asked, plain, asked])
    for out in (outs[0], outs[2]):
        check(out.prompt_logprobs, 3)
        assert out.token_ids == first.token_ids
    assert outs[1].prompt_logprobs is None and first.prompt_logprobs is None
    assert llm.engine.scheduler.num_preemptions > 0
    with pytest.raises(ValueError, match="prompt_logprobs"):
        llm.generate(prompt, SamplingParams(prompt_logprobs=21))


def test_penalties_equal_transformers(checkpoint: Callable[..., Path]) -> None:
    """repetition_penalty as transformers' generate() applies it (prompt and output tokens);
    presence and frequency penalties (output tokens) as a greedy loop over transformers' own
    logits computes them."""
    import transformers

    path = checkpoint("mixtral")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    llm = LLM(model=path, block_size=4)
    prompt = PROMPTS[1]
    plain = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    rep = SamplingParams(temperature=0.0, max_tokens=12, repetition_penalty=1.8)
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                       repetition_penalty=1.8)[0, len(prompt):].tolist()  # fmt: skip
    assert llm.generate(prompt, rep)[0].token_ids == want
    assert want != llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12))[0].token_ids
    ids, expected = list(prompt), []
    with torch.no_grad():
        for _ in range(12):
            logits = hf(torch.tensor([ids])).logits[0, -1].float()
            if expected:
                counts = torch.bincount(torch.tensor(expected), minlength=logits.shape[0]).float()
                logits = logits - 0.7 * counts - 0.5 * (counts > 0).float()
            expected.append(int(logits.argmax()))
            ids.append(expected[-1])
    penalized = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                               frequency_penalty=0.7, presence_penalty=0.5)  # fmt: skip
    got = llm.generate(prompt, penalized)[0].token_ids
    assert got == expected
    assert got != plain[0].token_ids  # the penalties changed what greedy picks
    # logit_bias as transformers' sequence_bias on single tokens.
    favoured = plain[0].token_ids[0] + 1
    bias = SamplingParams(temperature=0.0, max_tokens=12, logit_bias={favoured: 3.0})
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                       sequence_bias={(favoured,): 3.0})[0, len(prompt):].tolist()  # fmt: skip
    assert llm.generate(prompt, bias)[0].token_ids == want and favoured in want
    for bad, field in ((dict(logit_bias={favoured: 100.5}), "logit_bias"),
                       (dict(logit_bias={10**7: 1.0}), "logit_bias"),
                       (dict(repetition_penalty=0.0), "repetition_penalty"),
                       (dict(presence_penalty=2.5), "presence_penalty"),
                       (dict(frequency_penalty=float("nan")), "frequency_penalty")):  # fmt: skip
        with pytest.raises(ValueError, match=field):
            llm.generate(prompt, SamplingParams(**bad))  # type: ignore[arg-type]


def test_min_tokens_holds_back_stops_like_transformers(checkpoint: Callable[..., Path]) -> None:
    """min_tokens as transformers' min_new_tokens: the stop tokens (EOS and stop_token_ids)
    cannot be sampled until that many tokens are out; stop strings are not looked for until
    then either (vLLM)."""
    import transformers

    path = checkpoint("mixtral")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    llm = LLM(model=path, block_size=4)
    prompt = PROMPTS[1]
    full = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    stop_id = full[0].token_ids[1]
    plain = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12,
                                                stop_token_ids=[stop_id]))[0]  # fmt: skip
    assert plain.finish_reason is FinishReason.STOP and len(plain.token_ids) <= 2
    held = SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_id], min_tokens=5)
    got = llm.generate(prompt, held)[0]
    stops = sorted(llm.engine.eos_token_ids | {stop_id})
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                       min_new_tokens=5, eos_token_id=stops)[0, len(prompt):].tolist()  # fmt: skip
    assert got.token_ids == want
    assert len(want) > 5 and not set(want[:5]) & set(stops)
    # Stop strings: the first token's text ends generation at once, but not within min_tokens.
    tok = llm.tokenizer
    first = tok.decode(full[0].token_ids[:1])
    assert first and "\ufffd" not in first
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                              stop=[first]))[0]  # fmt: skip
    assert (out.finish_reason, out.text) == (FinishReason.STOP, "")
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True,
                                              stop=[first], min_tokens=3))[0]  # fmt: skip
    assert out.finish_reason is FinishReason.LENGTH
    assert (out.token_ids, out.text) == (full[0].token_ids[:3], tok.decode(full[0].token_ids[:3]))
    for bad in (-1, 13, True, 2.5):
        with pytest.raises(ValueError, match="min_tokens"):
            llm.generate(prompt, SamplingParams(max_tokens=12, min_tokens=bad))  # type: ignore[arg-type]


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok", "n"],
          "properties": {"ok": {"type": "boolean"},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99}}}  # fmt: skip


def test_json_schema_output_equals_a_reference_loop_and_parses(
    checkpoint: Callable[..., Path],
) -> None:
    """Structured output: greedy under a JSON Schema gives the tokens of a loop over
    transformers' logits with llguidance's allowed tokens (bits decoded here, independently;
    JSON written with ", " and ": " and no other whitespace), and every output, greedy or
    sampled, is JSON that follows the schema."""
    import llguidance
    import transformers

    path = checkpoint("mixtral")
    llm = LLM(model=path, block_size=4)
    text = json.dumps(SCHEMA)
    out = llm.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=60,
                                                  json_schema=text))[0]  # fmt: skip
    assert out.finish_reason is FinishReason.STOP
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    vocab, eos = llm.engine.vocab_size, sorted(llm.engine.eos_token_ids)
    tok = llguidance.LLTokenizer(llm.tokenizer.to_json(), n_vocab=vocab, eos_token=eos)
    options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults=options)  # type: ignore[arg-type]
    matcher = llguidance.LLMatcher(tok, grammar)
    ids, expected = list(PROMPTS[1]), []
    with torch.no_grad():
        for _ in range(60):
            logits = hf(torch.tensor([ids])).logits[0, -1].float()
            bits = matcher.compute_bitmask()
            allowed = torch.tensor([bits[i // 8] >> (i % 8) & 1 for i in range(vocab)])
            t = int(logits.masked_fill(allowed == 0, float("-inf")).argmax())
            expected.append(t)
            if t in eos:
                break
            matcher.consume_token(t)
            ids.append(t)
            if matcher.is_stopped():  # the JSON value is complete: nothing more to sample
                break
    assert out.token_ids == expected and expected[-1] not in eos
    outs = [out, *llm.generate(["a", "b", "c", "d"], [
        SamplingParams(temperature=1.0, seed=s, max_tokens=60, json_schema=text)
        for s in range(4)])]  # fmt: skip
    for o in outs:
        value = json.loads(o.text)
        assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool)
        assert isinstance(value["n"], int) and 0 <= value["n"] <= 99
    free = llm.generate("x", SamplingParams(temperature=1.0, seed=0, max_tokens=30))[0]
    with pytest.raises(json.JSONDecodeError):  # without the schema the model writes noise
        json.loads(free.text)
    for bad in ("{", '{"type": "nonsense"}', "[1]", 5):
        with pytest.raises(ValueError, match="json_schema"):
            llm.generate("x", SamplingParams(json_schema=bad))  # type: ignore[arg-type]


def test_stop_token_ids_and_max_tokens(checkpoint: Callable[..., Path]) -> None:
    path = checkpoint("mixtral")
    llm = LLM(model=path)
    full = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=12))[0]
    assert full.finish_reason is FinishReason.LENGTH and len(full.token_ids) == 12
    stop_id = full.token_ids[4]
    cut = full.token_ids.index(stop_id)
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, stop_token_ids=[stop_id]))[0]
    assert out.finish_reason is FinishReason.STOP
    assert out.token_ids == full.token_ids[: cut + 1]  # the stop token is reported ...
    assert out.text == llm.tokenizer.decode(full.token_ids[:cut])  # ... but not in the text
    assert out.usage.completion_tokens == cut + 1


def test_eos_stops_like_transformers_unless_ignore_eos(checkpoint: Callable[..., Path]) -> None:
    base = LLM(model=checkpoint("mixtral")).generate(PROMPTS[1], GREEDY)[0].token_ids
    eos = base[3]  # same weights (same seed), but this token is now the EOS
    path = checkpoint("mixtral", eos_token_id=eos)
    llm = LLM(model=path)
    out = llm.generate(PROMPTS[1], GREEDY)[0]
    assert out.finish_reason is FinishReason.STOP
    assert out.token_ids == hf_greedy(path, PROMPTS[1], GREEDY.max_tokens)
    assert out.token_ids[-1] == eos and len(out.token_ids) <= 4
    ignoring = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    out = llm.generate(PROMPTS[1], ignoring)[0]
    assert out.finish_reason is FinishReason.LENGTH and out.token_ids == base


def test_stop_strings_across_tokens_are_cut_from_the_text(checkpoint: Callable[..., Path]) -> None:
    llm = LLM(model=checkpoint("mixtral"))
    tok = llm.tokenizer
    prompt = tok.encode("def add(a, b):")
    full = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=20))[0]
    pieces = [tok.decode([t]) for t in full.token_ids]
    j = next(
        j
        for j in range(len(pieces) - 1)
        if pieces[j] and pieces[j + 1] and "\ufffd" not in pieces[j] + pieces[j + 1]
    )
    stop = pieces[j][-1] + pieces[j + 1][0]  # spans the boundary between tokens j and j+1
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=20, stop=[stop]))[0]
    assert out.finish_reason is FinishReason.STOP
    assert out.text == full.text[: full.text.index(stop)]
    assert full.token_ids[: len(out.token_ids)] == out.token_ids
    assert len(out.token_ids) <= j + 2


def test_context_limit_finishes_with_length(checkpoint: Callable[..., Path]) -> None:
    prompt = PROMPTS[1]
    llm = LLM(model=checkpoint("mixtral"), max_model_len=len(prompt) + 3)
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=50))[0]
    assert out.finish_reason is FinishReason.LENGTH and len(out.token_ids) == 3


def test_bad_input_raises_value_errors_naming_the_field(checkpoint: Callable[..., Path]) -> None:
    llm = LLM(model=checkpoint("mixtral"), max_model_len=32)
    cases = {
        "prompt must not be empty": "",
        "prompts must be": [],
        "prompt_token_ids": [1, 2, 320],
        "max_model_len": list(range(1, 40)),
        r"prompts\[1\]": ["ok", 3],
    }
    for match, prompt in cases.items():
        with pytest.raises(ValueError, match=match):
            llm.generate(prompt, GREEDY)
    with pytest.raises(ValueError, match="params must be one SamplingParams or one per prompt"):
        llm.generate(["a", "b"], [GREEDY])
    with pytest.raises(ValueError, match="max_tokens must be at most"):
        llm.generate("a", SamplingParams(max_tokens=100_000))
    with pytest.raises(ValueError, match="num_kv_blocks"):
        LLM(model=checkpoint("mixtral"), num_kv_blocks=0)
    assert not llm.engine.has_unfinished()  # a rejected batch leaves nothing behind


def test_abort_frees_blocks_and_streaming_deltas_add_up(checkpoint: Callable[..., Path]) -> None:
    path = checkpoint("olmoe")
    engine = LLMEngine(path, EngineConfig(block_size=4))
    total = engine.block_manager.num_blocks
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, params)
    deltas: dict[str, list[int]] = {"0": [], "1": [], "2": []}
    text = ""
    for _ in range(5):
        for out in engine.step():
            deltas[out.request_id] += out.delta_token_ids
            if out.request_id == "1":
                text += out.delta_text
                assert out.token_ids == deltas["1"]
    assert engine.block_manager.num_free_blocks < total
    final = engine.abort("1")
    assert final is not None and final.finish_reason is FinishReason.ABORT
    assert final.token_ids == deltas["1"] and final.text.startswith(text)
    assert engine.abort("1") is None  # unknown now
    for rid in ("0", "2"):
        engine.abort(rid)
    assert engine.block_manager.num_free_blocks == total and not engine.has_unfinished()
