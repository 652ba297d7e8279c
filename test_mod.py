"""Tests for the Mixture-of-Depths implementation, its data preparation and training. Tiny models, CPU, seconds:
`python -m pytest`. The BPE test needs tiktoken's r50k_base: online, or TIKTOKEN_CACHE_DIR set to a cache of it."""

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import data.prepare as dp
import mod
import train
from data.prepare import DATASETS, URL, DataError, Tokenizer, load_meta, prepare, read_text
from mod import Block, MoDBlock, MoDConfig, MoDGPT, tokens_routed

REPO = Path(__file__).resolve().parent


def tiny(**overrides):
    """A model small enough to test in milliseconds: 4 blocks, blocks 1 and 3 routed."""
    fields = dict(block_size=32, vocab_size=50, n_layer=4, n_head=2, n_embd=32, capacity=0.25)
    fields.update(overrides)
    torch.manual_seed(0)
    return MoDGPT(MoDConfig(**fields)).eval()


def routed_blocks(model):
    return [b for b in model.transformer.h if isinstance(b, MoDBlock)]


def capture_routing(model):
    """Collect each routed block's (input, output, RoutingInfo) on every forward pass."""
    seen = []
    for block in routed_blocks(model):
        block.register_forward_hook(lambda mod, args, out: seen.append((args[0], out[0], out[1])))
    return seen


# -----------------------------------------------------------------------------
# 1. capacity 1.0 with weight 1 is the dense block; mod_every=0 is a plain GPT


def test_capacity_one_with_unit_weight_is_the_dense_block():
    model = tiny(capacity=1.0)
    block = routed_blocks(model)[0]
    block.weight = lambda r: torch.ones_like(r)  # Eq. 1 with w = 1: x + f(x) for every token
    x = torch.randn(3, 11, 32)
    out, info = block(x)
    assert info.processed.all()
    assert torch.equal(out, x + block.block.update(x))
    # the dense Block's forward (nanoGPT's two residual adds) is the same function, up to float rounding
    assert torch.allclose(block.block(x), x + block.block.update(x), atol=1e-6)

    # The whole model then equals a dense model holding the same weights (up to the rounding of the adds).
    for b in routed_blocks(model):
        b.weight = lambda r: torch.ones_like(r)
    dense = tiny(mod_every=0)
    state = {k.replace(".block.", "."): v for k, v in model.state_dict().items()
             if ".router." not in k and ".predictor." not in k}
    dense.load_state_dict(state)
    idx = torch.randint(0, 50, (2, 19))
    assert torch.allclose(model(idx)[0], dense(idx)[0], atol=1e-5)


def test_mod_every_zero_is_a_plain_gpt():
    model = tiny(mod_every=0)
    assert all(type(b) is Block for b in model.transformer.h)
    C, V, T, L = 32, 50, 32, 4
    assert sum(p.numel() for p in model.parameters()) == V * C + T * C + L * (12 * C * C + 2 * C) + C
    idx = torch.randint(0, V, (2, 17))
    targets = torch.randint(0, V, (2, 17))
    logits, loss = model(idx, targets)
    x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(17))
    for block in model.transformer.h:
        x = block(x)
    expected = model.lm_head(model.transformer.ln_f(x))
    assert torch.allclose(logits, expected, atol=1e-6)
    assert torch.allclose(loss, F.cross_entropy(expected.view(-1, V), targets.view(-1)), atol=1e-6)
    assert model.last_routing == [None] * 4
    assert model.last_stats["predictor_loss"] == 0 and model.last_stats["routed_frac"].numel() == 0


def test_blocks_routed_every_mod_every_first_always_dense():
    def layout(n_layer, mod_every):
        model = tiny(n_layer=n_layer, mod_every=mod_every)
        return [i for i, b in enumerate(model.transformer.h) if isinstance(b, MoDBlock)]
    assert layout(6, 2) == [1, 3, 5]
    assert layout(6, 3) == [2, 5]
    assert layout(4, 1) == [1, 2, 3]
    assert layout(4, 0) == []


# -----------------------------------------------------------------------------
# 2. top-k: exactly k tokens per sequence, in sequence order; the others bit-identical


@pytest.mark.parametrize("router_weight", ["sigmoid", "raw"])
@pytest.mark.parametrize("B,T", [(3, 21), (2, 7), (1, 1), (4, 3), (2, 32)])
def test_topk_routes_exactly_k_tokens_in_sequence_order(B, T, router_weight):
    model = tiny(router_weight=router_weight)
    seen = capture_routing(model)
    idx = torch.randint(0, 50, (B, T))
    model(idx)
    k = max(1, int(0.25 * T))  # from the actual T (< block_size), at least one token
    assert len(seen) == 2
    for block, (x, out, info), processed in zip(routed_blocks(model), seen, model.last_routing[1::2]):
        assert torch.equal(info.processed, processed)
        assert processed.sum(1).tolist() == [k] * B
        r = block.router(x)
        # reference, row by row: this row's top-k, in sequence order, through the block, Eq. 1
        for b in range(B):
            chosen = torch.topk(r[b], k).indices.sort().values
            assert torch.equal(info.processed[b].nonzero().squeeze(1), chosen)
            w = torch.sigmoid(r[b, chosen]) if router_weight == "sigmoid" else r[b, chosen]
            f = block.block.update(x[b:b + 1, chosen])[0]  # attention over the routed tokens only
            assert torch.allclose(out[b, chosen], x[b, chosen] + w[:, None] * f, atol=1e-6)
        # tokens routed around the block leave it bit-identical
        assert torch.equal(out[~info.processed], x[~info.processed])


def test_k_is_capacity_times_the_actual_length_at_least_one():
    assert [tokens_routed(0.125, T) for T in (1, 7, 8, 64, 256)] == [1, 1, 1, 8, 32]
    assert tokens_routed(0.29, 100) == 29  # 0.29 * 100 is 28.999... in floating point
    assert tokens_routed(1.0, 5) == 5


def test_random_router_control_routes_k_tokens_not_the_router_top_k():
    model = tiny(router="random")
    seen = capture_routing(model)
    torch.manual_seed(1)
    model(torch.randint(0, 50, (4, 32)))
    differs = False
    for block, (x, out, info) in zip(routed_blocks(model), seen):
        assert info.processed.sum(1).tolist() == [8] * 4
        by_router = torch.zeros_like(info.processed).scatter_(1, block.router(x).topk(8, dim=1).indices, True)
        differs |= not torch.equal(by_router, info.processed)
    assert differs



def test_random_control_weights_the_update_by_its_noise():
    model = tiny(router="random")
    block = routed_blocks(model)[0]
    x = torch.randn(3, 32, 32)
    torch.manual_seed(5)
    noise = torch.randn(3, 32)  # what the block's torch.randn_like(r) will draw after the same seed
    torch.manual_seed(5)
    out, info = block(x)
    for b in range(3):
        chosen = noise[b].topk(8).indices.sort().values
        assert torch.equal(info.processed[b].nonzero().squeeze(1), chosen)
        f = block.block.update(x[b:b + 1, chosen])[0]
        assert torch.allclose(out[b, chosen], x[b, chosen] + noise[b, chosen, None] * f, atol=1e-6)

# -----------------------------------------------------------------------------
# 3. gradients: router learns from the LM loss, predictor does not, and predictor loss stays out of the trunk


def test_router_learns_from_lm_loss_predictor_does_not():
    model = tiny().train()
    idx, targets = torch.randint(0, 50, (2, 24)), torch.randint(0, 50, (2, 24))
    logits, _ = model(idx, targets)
    F.cross_entropy(logits.view(-1, 50), targets.view(-1)).backward()  # the LM loss alone
    for block in routed_blocks(model):
        assert block.router.proj.weight.grad is not None and block.router.proj.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in block.predictor.parameters())


def test_predictor_loss_sends_no_gradient_into_the_trunk():
    model = tiny().train()
    seen = capture_routing(model)
    model(torch.randint(0, 50, (2, 24)))
    bce = sum(F.binary_cross_entropy_with_logits(info.predictor_logits, info.topk.float()) for _, _, info in seen)
    bce.backward()
    predictor_params = {id(p) for b in routed_blocks(model) for p in b.predictor.parameters()}
    for name, p in model.named_parameters():
        if id(p) in predictor_params:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, f"{name} got gradient from the predictor's loss"


def test_aux_targets_are_each_rows_own_top_k():
    model = tiny(router_aux_loss=0.5)
    seen = capture_routing(model)
    idx = torch.randint(0, 50, (3, 20))
    _, loss = model(idx, idx)
    predictor_bces, router_bces = [], []
    for block, (x, out, info) in zip(routed_blocks(model), seen):
        r = block.router(x)
        target = torch.zeros(3, 20)
        for b in range(3):  # built row by row: a flattened buffer would put every index into row 0
            target[b, torch.topk(r[b], 5).indices] = 1.0
        assert torch.equal(info.topk.float(), target)
        predictor_bces.append(F.binary_cross_entropy_with_logits(block.predictor(x), target))
        router_bces.append(F.binary_cross_entropy_with_logits(r, target))
    stats = model.last_stats
    assert torch.allclose(stats["predictor_loss"], sum(predictor_bces) / 2, atol=1e-6)
    assert torch.allclose(stats["router_loss"], sum(router_bces) / 2, atol=1e-6)
    assert torch.allclose(loss, stats["lm_loss"] + stats["predictor_loss"] + 0.5 * stats["router_loss"], atol=1e-6)
    assert stats["routed_frac"].tolist() == [0.25, 0.25]


# -----------------------------------------------------------------------------
# 4. causality: causal modes see no future; top-k does (the reason for the predictor)


def change_the_future(idx, t):
    other = idx.clone()
    other[:, t + 1:] = (idx[:, t + 1:] + 1 + torch.randint(0, 48, idx[:, t + 1:].shape)) % 50
    return other


@pytest.mark.parametrize("routing", ["predictor", "router"])
def test_causal_routing_sees_no_future(routing):
    model = tiny()
    idx = torch.randint(0, 50, (3, 32))
    for t in (0, 5, 17, 30):
        a, _ = model(idx, routing=routing)
        b, _ = model(change_the_future(idx, t), routing=routing)
        assert torch.allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-5), f"position <= {t} saw the future"
        assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


def test_topk_routing_leaks_the_future():
    model = tiny()
    idx = torch.randint(0, 50, (3, 32))
    a, _ = model(idx, routing="topk")
    leaked = False
    for t in range(0, 31, 3):
        b, _ = model(change_the_future(idx, t), routing="topk")
        leaked |= (a[:, :t + 1] - b[:, :t + 1]).abs().max().item() > 1e-4
    assert leaked, "top-k routing should let future tokens change earlier logits"


# -----------------------------------------------------------------------------
# 5. cached generation equals the full forward


def test_cached_steps_equal_the_full_forward_batch_rows_route_differently():
    model = tiny()
    idx = torch.randint(0, 50, (3, 30))
    full, _ = model(idx, routing="predictor")
    cache = model.new_cache(3)
    steps = [model(idx[:, :9], routing="predictor", cache=cache)[0]]
    for t in range(9, 30):
        steps.append(model(idx[:, t:t + 1], routing="predictor", cache=cache)[0])
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    model(idx, routing="predictor")
    for layer, processed in zip(cache.layers, model.last_routing):
        if processed is None:
            assert layer.lengths.tolist() == [30] * 3
        else:  # a routed block's cache holds exactly the tokens routed into it, per row
            assert layer.lengths.tolist() == processed.sum(1).tolist()
    routed_lengths = [layer.lengths for layer, p in zip(cache.layers, model.last_routing) if p is not None]
    assert any(len(set(lengths.tolist())) > 1 for lengths in routed_lengths), "rows should route differently"


def reference_generate(model, idx, max_new_tokens, routing):
    """Greedy decoding without a cache, on the same window as generate(): crop to block_size, and when the window
    is full keep its newer half. Returns the tokens and the last-position logits of each step."""
    window = model.config.block_size
    start = max(0, idx.size(1) - window)
    step_logits = []
    for _ in range(max_new_tokens):
        if idx.size(1) - start > window:
            start = idx.size(1) - max(1, window // 2)
        logits, _ = model(idx[:, start:], routing=routing)
        step_logits.append(logits[:, -1])
        idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx, step_logits, start


@pytest.mark.parametrize("routing", ["predictor", "router"])
def test_greedy_generate_with_cache_equals_full_forward_past_block_size(routing):
    model = tiny()
    prompt = torch.randint(0, 50, (3, 7))
    step_logits = []
    hook = model.register_forward_hook(lambda mod, args, out: step_logits.append(out[0][:, -1]))
    out = model.generate(prompt, 70, temperature=0, routing=routing)  # 77 tokens, block_size 32
    hook.remove()
    routing_seen = model.last_routing
    expected, expected_logits, start = reference_generate(model, prompt, 70, routing)
    assert torch.equal(out, expected)
    assert len(step_logits) == len(expected_logits) == 70
    for got, want in zip(step_logits, expected_logits):
        assert torch.allclose(got, want, atol=1e-5)
    # last_routing covers the whole returned sequence; on the final window it matches the full forward
    model(out[:, start:-1], routing=routing)
    for seen, full in zip(routing_seen, model.last_routing):
        if seen is None:
            assert full is None
        else:
            assert seen.shape == (3, 77)
            assert torch.equal(seen[:, start:-1], full) and not seen[:, -1].any()


def test_generate_long_prompt_is_cropped_and_batch_one_works():
    model = tiny()
    prompt = torch.randint(0, 50, (1, 45))  # longer than block_size 32
    out = model.generate(prompt, 5, temperature=0)
    expected, _, _ = reference_generate(model, prompt, 5, "predictor")
    assert torch.equal(out, expected)
    torch.manual_seed(3)
    sampled = model.generate(prompt, 5, temperature=0.8, top_k=5)
    assert sampled.shape == (1, 50) and torch.equal(sampled[:, :45], prompt)


def test_mixed_precision_training_and_generation():
    model = tiny()
    idx = torch.randint(0, 50, (2, 20))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what train.py does on a GPU (bf16 or fp16)
        logits, loss = model(idx, idx)
        loss.backward()
        out = model.generate(idx[:, :5], 40, temperature=0)  # past block_size 32: re-prefill too
    assert torch.isfinite(loss) and logits.dtype == torch.bfloat16 and out.shape == (2, 45)
    assert all(p.grad is not None for p in routed_blocks(model)[0].router.parameters())


def test_fp16_training_step_with_a_grad_scaler_and_generation():
    model = tiny().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")  # what train.py uses with float16 (Colab's T4)
    idx = torch.randint(0, 50, (2, 20))
    before = routed_blocks(model)[0].router.proj.weight.clone()
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.float16):
            logits, loss = model(idx, idx, check_input=False)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    assert torch.isfinite(loss) and logits.dtype == torch.float16 and scaler.get_scale() > 0
    assert not torch.equal(before, routed_blocks(model)[0].router.proj.weight)  # the step was taken
    with torch.autocast("cpu", dtype=torch.float16):
        out = model.eval().generate(idx[:, :5], 40, temperature=0)  # past block_size 32: re-prefill too
    assert out.shape == (2, 45)


def test_a_block_that_no_token_routes_into_is_skipped_cleanly():
    model = tiny()
    for block in routed_blocks(model):
        torch.nn.init.constant_(block.predictor.out.bias, -100.0)  # the predictor routes nothing
    idx = torch.randint(0, 50, (2, 20))
    logits, _ = model(idx, routing="predictor")
    assert torch.isfinite(logits).all()
    assert all(r is None or not r.any() for r in model.last_routing)
    out = model.generate(idx[:, :4], 10, temperature=0)
    cache = model.new_cache(2)
    model(idx, routing="predictor", cache=cache)
    assert [layer.nbytes() for layer, block in zip(cache.layers, model.transformer.h)
            if isinstance(block, MoDBlock)] == [0, 0]
    assert out.shape == (2, 14)


# -----------------------------------------------------------------------------
# 6. real savings: measured FLOPs agree with the estimate; routed caches hold only routed tokens


def measured_flops(model, T):
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(0, model.config.vocab_size, (1, T)))
    return counter.get_total_flops()


def test_measured_flops_match_the_estimate_and_the_expected_saving():
    kw = dict(block_size=64, n_embd=64, n_head=4, capacity=0.125)
    mod, dense = tiny(**kw), tiny(mod_every=0, **kw)
    T = 64
    est_mod, est_dense = mod.estimate_flops(T), dense.estimate_flops(T)
    # CPU FlopCounterMode counts matrix multiplies but not the attention kernel: compare the linear layers
    for model, est in ((mod, est_mod), (dense, est_dense)):
        assert measured_flops(model, T) == est["blocks_linear"] + est["routing"] + est["head"]
    # every other block at 12.5%: the block stack's linear layers cost (1 + 1/8) / 2 = 0.5625 of dense
    measured_stack_mod = measured_flops(mod, T) - est_mod["routing"] - est_mod["head"]
    measured_stack_dense = measured_flops(dense, T) - est_dense["head"]
    assert measured_stack_mod / measured_stack_dense == pytest.approx(0.5625)
    with_attention = ((est_mod["blocks_linear"] + est_mod["blocks_attention"])
                      / (est_dense["blocks_linear"] + est_dense["blocks_attention"]))
    assert 0.5 < with_attention < 0.58
    assert est_mod["total"] < 0.65 * est_dense["total"]


def test_routed_kv_cache_holds_only_routed_tokens():
    model = tiny(block_size=64, capacity=0.125)
    idx = torch.randint(0, 50, (2, 64))
    seen = capture_routing(model)
    model(idx)
    for block, (_, _, info) in zip(routed_blocks(model), seen):  # route ~1/8 of tokens, as a trained predictor
        torch.nn.init.constant_(block.predictor.out.bias, -info.predictor_logits.quantile(0.875).item())
    cache = model.new_cache(2)
    model(idx, routing="predictor", cache=cache)
    dense_bytes = routed_bytes = 0
    for layer, processed in zip(cache.layers, model.last_routing):
        if processed is None:
            dense_bytes = layer.nbytes()
        else:
            assert layer.lengths.tolist() == processed.sum(1).tolist()
            assert layer.k.size(1) < 64  # grown on demand, not preallocated to block_size
            routed_bytes = max(routed_bytes, layer.nbytes())
    assert routed_bytes < dense_bytes


# -----------------------------------------------------------------------------
# 7. bad input: one clear ValueError naming the fix


@pytest.mark.parametrize("overrides,message", [
    (dict(capacity=0.0), "capacity must be in"),
    (dict(capacity=1.5), "capacity must be in"),
    (dict(n_embd=30, n_head=4), "divisible by n_head"),
    (dict(router_weight="softmax"), "router_weight must be"),
    (dict(router="topk"), "router must be"),
    (dict(mod_every=-1), "mod_every must be"),
    (dict(dropout=1.0), "dropout must be"),
])
def test_bad_config_is_a_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_config_changed_after_creation_is_checked_by_the_model():
    config = MoDConfig(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=32)
    config.capacity = 2.0
    with pytest.raises(ValueError, match="capacity must be in"):
        MoDGPT(config)


def test_bad_forward_input_is_a_clear_error():
    model = tiny()
    with pytest.raises(ValueError, match="longer than block_size 32: crop it"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown routing 'causal'"):
        model(torch.zeros(1, 8, dtype=torch.long), routing="causal")
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 50\)"):
        model(torch.full((1, 8), 50))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 50\)"):
        model(torch.full((1, 8), -1))
    with pytest.raises(ValueError, match="torch.long"):
        model(torch.zeros(1, 8))
    with pytest.raises(ValueError, match="cannot generate"):
        model.generate(torch.zeros(1, 4, dtype=torch.long), 3, routing="topk")
    with pytest.raises(ValueError, match="start from a newline"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        model.generate(torch.zeros(1, 4, dtype=torch.long), 3, top_k=0)
    cache = model.new_cache(1)
    with pytest.raises(ValueError, match="cannot be used with a cache"):
        model(torch.zeros(1, 4, dtype=torch.long), routing="topk", cache=cache)
    with pytest.raises(ValueError, match="pass one or the other"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), "predictor", cache)



@pytest.mark.parametrize("call,message", [
    (lambda m: m(torch.zeros(8, dtype=torch.long)), r"idx\[None\]"),  # 1-D idx: one sequence without its batch
    (lambda m: m(torch.zeros(1, 8, dtype=torch.long), torch.full((1, 8), 50)), r"targets must be in \[0, 50\)"),
    (lambda m: m(torch.zeros(1, 8, dtype=torch.long), torch.full((1, 8), -2)), r"targets must be in \[0, 50\)"),
    (lambda m: m(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 7, dtype=torch.long)), "shape of idx"),
    (lambda m: m(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8)), "targets must be a torch.long"),
    (lambda m: m.generate(torch.zeros(1, 4, dtype=torch.long), -1), "max_new_tokens must be an integer >= 0"),
    (lambda m: m.generate(torch.zeros(1, 4, dtype=torch.long), 2.5), "max_new_tokens must be an integer >= 0"),
    (lambda m: m.generate(torch.zeros(1, 4, dtype=torch.long), 3, temperature=float("nan")), "temperature must be"),
    (lambda m: m.generate(torch.zeros(1, 4, dtype=torch.long), 3, temperature=-1), "temperature must be >= 0"),
    (lambda m: m.generate(torch.zeros(1, 4, dtype=torch.long), 3, top_k=2.5), "top_k must be >= 1, an integer"),
    (lambda m: m.generate(torch.full((1, 4), 50), 3), r"token ids must be in \[0, 50\)"),
    (lambda m: m.generate(torch.zeros(4, dtype=torch.long), 3), r"idx\[None\]"),
    (lambda m: m(torch.zeros(2, 4, dtype=torch.long), routing="predictor", cache=m.new_cache(1)),
     r"batch of 1 sequences, idx has 2: make one with model.new_cache\(2\)"),
    (lambda m: m(torch.zeros(1, 9, dtype=torch.long), routing="predictor", cache=m.new_cache(1, 8)),
     "make a larger one"),
    (lambda m: m.new_cache(1, 33), "max_len <= block_size"),
])
def test_bad_api_calls_are_one_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny())


@pytest.mark.parametrize("overrides", [dict(capacity="0.5"), dict(capacity=True), dict(n_layer=4.0),
                                       dict(dropout=float("nan")), dict(router_aux_loss="1"), dict(bias="no")])
def test_config_values_of_the_wrong_type_are_a_clear_error(overrides):
    with pytest.raises(ValueError, match="MoDConfig: .* must be"):
        tiny(**overrides)


def test_shifted_slices_work_as_idx_and_targets():
    model = tiny()
    x = torch.randint(0, 50, (2, 20))
    _, loss = model(x[:, :-1], targets=x[:, 1:])  # the natural notebook call: targets is not contiguous
    _, expected = model(x[:, :-1].contiguous(), targets=x[:, 1:].contiguous())
    assert torch.equal(loss, expected)
    targets = x[:, 1:].clone()
    targets[:, :5] = -1  # ignored positions
    assert torch.isfinite(model(x[:, :-1], targets)[1])


def test_router_routing_without_router_aux_loss_warns_once():
    model = tiny()
    with pytest.warns(UserWarning, match="router_aux_loss=0") as record:
        model.generate(torch.zeros(1, 2, dtype=torch.long), 5, routing="router")
        model(torch.zeros(1, 4, dtype=torch.long), routing="router")
    assert len([w for w in record if "router_aux_loss=0" in str(w.message)]) == 1
    trained = tiny(router_aux_loss=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model trained with router_aux_loss: no warning
        trained.generate(torch.zeros(1, 2, dtype=torch.long), 5, routing="router")


# -----------------------------------------------------------------------------
# 8. GPU-ready: one graph for the training step, syncs only where routing needs them, dtype-independent routing


def test_training_forward_compiles_to_one_graph():
    model = tiny().train()
    x, y = torch.randint(0, 50, (2, 32)), torch.randint(0, 50, (2, 32))
    explained = torch._dynamo.explain(model)(x, y, check_input=False)  # the call train.py makes
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    # the default check reads the token ids: a graph break (and a sync on a GPU), hence check_input=False
    assert torch._dynamo.explain(model)(x, y).graph_break_count > 0


class HostSyncs(TorchDispatchMode):
    """Records the operations that make the host wait for the device: reading a value (item, int, bool),
    nonzero, and boolean-mask indexing (whose output size depends on the data)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name.startswith(("aten.index.", "aten.index_put")) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or [])
        if bool_index or any(op in name for op in ("_local_scalar_dense", "nonzero", "masked_select")):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def test_sync_detector_sees_what_syncs():
    t = torch.tensor([1, 2, 3])
    with HostSyncs() as syncs:
        t.sum().item(), int(t.max()), t[t > 1], t.nonzero(), t.masked_fill(t > 1, 0)
    assert len(syncs.ops) == 4  # item, int, boolean index, nonzero (masked_fill does not sync)


def test_generation_syncs_once_per_routed_block_per_step(monkeypatch):
    model = tiny()
    calls = []
    real_to_host = mod.to_host
    monkeypatch.setattr(mod, "to_host", lambda t: calls.append(t.shape) or real_to_host(t))
    prompt = torch.randint(0, 50, (3, 5))
    with HostSyncs() as syncs:
        model.generate(prompt, 20, temperature=0.8, top_k=10)
    # the prompt's ids are read once (min and max, to check them); nothing else syncs but to_host
    assert syncs.ops == ["aten._local_scalar_dense.default"] * 2
    # one to_host per routed block for each forward pass: the prompt, then 19 fed-back tokens
    assert len(calls) == 2 * 20 and all(shape == (3,) for shape in calls)
    # the training forward syncs nowhere (top-k: k comes from T)
    with HostSyncs() as syncs:
        model.train()(prompt, prompt, check_input=False)[1].backward()
    assert syncs.ops == [] and len(calls) == 2 * 20


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_routing_is_computed_in_fp32_and_does_not_depend_on_the_dtype(dtype):
    model = tiny(block_size=64)
    seen = capture_routing(model)
    idx = torch.randint(0, 50, (8, 64))
    model(idx)
    with torch.autocast("cpu", dtype=dtype):
        logits, _ = model(idx)
    assert logits.dtype == dtype  # the model ran in low precision...
    fp32, low = seen[:2], seen[2:]
    for (_, _, a), (_, _, b) in zip(fp32, low):
        assert b.router_logits.dtype == b.predictor_logits.dtype == torch.float32  # ...its routing in fp32
        assert torch.equal(a.topk, b.topk)  # the same tokens chosen in every row of every routed block
    # given the same input, a routed block's scores are bit-identical with and without autocast
    block, x = routed_blocks(model)[0], fp32[0][0]
    r, p = block.router(x), block.predictor(x)
    with torch.autocast("cpu", dtype=dtype):
        assert torch.equal(block.router(x), r) and torch.equal(block.predictor(x), p)


def test_kv_cache_grows_geometrically_and_dense_caches_are_allocated_once():
    def sizes_while_appending(routed, n=256):
        cache, sizes = mod.KVCache(2, n, routed, "cpu"), []
        for _ in range(n):  # one token per step, each row's token real: a routed cache's worst case
            k = torch.randn(2, 1, 2, 4)
            cache.append(k, k, torch.ones(2, 1, dtype=torch.bool), [1, 1])
            if not sizes or sizes[-1] != cache.k.size(1):
                sizes.append(cache.k.size(1))
        assert cache.lengths.tolist() == cache.host_lengths == [n, n]
        return sizes
    assert sizes_while_appending(routed=False) == [256]  # dense: one allocation, for max_len tokens
    sizes = sizes_while_appending(routed=True)  # each growth adds at least a quarter: a handful of copies
    assert sizes[-1] == 256 and len(sizes) <= 12 and all(b >= 1.25 * a for a, b in zip(sizes, sizes[1:-1]))
    # in a model, a dense block's cache holds exactly the tokens generate() feeds it
    model = tiny()
    model.generate(torch.zeros(2, 3, dtype=torch.long), 10, temperature=0)
    assert model.last_cache_nbytes[0] == 2 * 2 * 12 * 32 * 4  # k and v, batch 2, 3 + 10 - 1 tokens, n_embd 32, fp32


# =============================================================================
# data/prepare.py: every test writes its own small text to tmp_path; no network


SMALL_TEXT = """First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?

All:
Resolved. resolved.

First Citizen:
First, you know Caius Marcius is chief enemy to the people.

All:
We know't, we know't.
"""


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No $SHAKESPEARE_TXT, the download cache in an empty folder, and no network. Returns the cache folder."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.delenv("SHAKESPEARE_TXT", raising=False)
    monkeypatch.setattr(dp, "CACHE_PATH", str(cache / "tinyshakespeare.txt"))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    return cache


@pytest.fixture
def small_input(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(SMALL_TEXT, encoding="utf-8")
    return path


class FakeResponse:
    """Stands in for urlopen's response: sends `body`, then fails with `error` (if any), claiming `length` bytes."""

    def __init__(self, body, length, error=None):
        self.body, self.error, self.sent = body, error, False
        self.headers = {"Content-Length": str(length)}

    def read(self, n=-1):
        if not self.sent:
            self.sent = True
            return self.body
        if self.error:
            raise self.error
        return b""  # the server closed the connection

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_prepare_char_writes_uint16_bins_that_decode_back(offline, small_input, tmp_path):
    out = tmp_path / "out"
    meta = prepare("shakespeare_char", str(small_input), str(out))
    assert meta == load_meta(str(out))  # meta.json round trip
    assert meta["tokenizer"] == "char" and meta["chars"] == "".join(sorted(set(SMALL_TEXT)))
    assert meta["vocab_size"] == len(set(SMALL_TEXT))
    n_train = int(len(SMALL_TEXT) * 0.9)  # 90/10 split by characters, one token per character
    assert os.path.getsize(out / "train.bin") == 2 * n_train  # 2 bytes per token: uint16
    assert os.path.getsize(out / "val.bin") == 2 * (len(SMALL_TEXT) - n_train)
    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    tok = Tokenizer(meta)
    assert tok.decode(train) == SMALL_TEXT[:n_train] and tok.decode(np.concatenate([train, val])) == SMALL_TEXT
    assert tok.vocab_size == meta["vocab_size"] and tok.decode([tok.newline_or_eot]) == "\n"
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]  # no temporary files left behind


def test_prepare_bpe_round_trip(offline, small_input, tmp_path):
    import tiktoken
    out = tmp_path / "out"
    meta = prepare("shakespeare", str(small_input), str(out))  # needs TIKTOKEN_CACHE_DIR offline
    assert meta == load_meta(str(out))
    assert meta["vocab_size"] == 50257 and meta["eot_token"] == 50256 and meta["encoding"] == "r50k_base"
    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    n_train = int(len(SMALL_TEXT) * 0.9)
    enc = tiktoken.get_encoding("r50k_base")
    assert train.tolist() == enc.encode_ordinary(SMALL_TEXT[:n_train])
    tok = Tokenizer(meta)
    assert tok.decode(train) + tok.decode(val) == SMALL_TEXT
    assert tok.vocab_size == 50257 and tok.newline_or_eot == 50256
    assert tok.encode("hi<|endoftext|>") == enc.encode("hi") + [50256]  # the special token in a prompt
    assert prepare("shakespeare", str(small_input), str(out))  # overwriting existing files works


def test_offline_without_a_file_says_both_ways_out_and_writes_nothing(offline, capsys):
    with pytest.raises(DataError) as e:
        read_text()
    message = str(e.value)
    assert "--input PATH" in message and "SHAKESPEARE_TXT" in message and URL in message and "internet" in message
    assert "\n" not in message
    assert list(offline.iterdir()) == []  # no empty cache file
    with pytest.raises(SystemExit) as exit_:  # the command line: one line on stderr, exit code 1
        dp.main("shakespeare_char", [])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--input PATH" in err and "Traceback" not in err


@pytest.mark.parametrize("error", [ConnectionResetError(104, "Connection reset by peer"), None])
def test_download_cut_off_midway_leaves_no_truncated_file(offline, monkeypatch, error):
    # the server sends part of the file, then resets the connection (or just closes it early)
    partial = FakeResponse(SMALL_TEXT[:50].encode(), length=1115394, error=error)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: partial)
    with pytest.raises(DataError, match="--input PATH"):
        read_text()
    assert list(offline.iterdir()) == []


def test_download_is_cached(offline, monkeypatch):
    body = SMALL_TEXT.encode()
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: FakeResponse(body, len(body)))
    assert read_text() == SMALL_TEXT
    assert (offline / "tinyshakespeare.txt").read_bytes() == body and len(list(offline.iterdir())) == 1
    monkeypatch.setattr(urllib.request, "urlopen", None)  # a second read must not download again
    assert read_text() == SMALL_TEXT


def test_bad_input_files(offline, tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match="nope.txt"):
        read_text(str(missing))
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        read_text(str(empty))
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("Speak, speak.\nRomeo\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8 text"):
        read_text(str(binary))
    with pytest.raises(DataError) as e:
        prepare("shakespeare_word", str(tmp_path / "x"))
    assert all(name in str(e.value) for name in DATASETS)


def test_shakespeare_txt_env_var_is_honoured(offline, monkeypatch, small_input, tmp_path):
    monkeypatch.setenv("SHAKESPEARE_TXT", str(small_input))
    assert read_text() == SMALL_TEXT  # no download (urlopen fails in the offline fixture)
    other = tmp_path / "other.txt"
    other.write_text("Exeunt.\n", encoding="utf-8")
    assert read_text(str(other)) == "Exeunt.\n"  # --input beats SHAKESPEARE_TXT
    monkeypatch.setenv("SHAKESPEARE_TXT", str(tmp_path / "gone.txt"))
    with pytest.raises(DataError, match="SHAKESPEARE_TXT.*gone.txt"):
        read_text()


def test_tokenizer_names_unknown_characters():
    tok = Tokenizer({"dataset": "shakespeare_char", "tokenizer": "char", "vocab_size": 4, "chars": "\nabc"})
    assert tok.encode("cab\n") == [3, 1, 2, 0] and tok.decode([3, 1, 2, 0]) == "cab\n"
    assert tok.newline_or_eot == 0
    with pytest.raises(ValueError) as e:
        tok.encode("abz€")
    message = str(e.value)
    assert "'z'" in message and "'€'" in message and "'a'" not in message and "4 characters" in message


def test_load_meta_errors(tmp_path):
    folder = tmp_path / "shakespeare_char"
    folder.mkdir()
    with pytest.raises(DataError, match="run python data/shakespeare_char/prepare.py"):
        load_meta(str(folder))
    (folder / "meta.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON"):
        load_meta(str(folder))


def test_bpe_without_tiktoken_cache_says_what_to_do(monkeypatch):
    import tiktoken

    def offline_get_encoding(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")
    monkeypatch.setattr(tiktoken, "get_encoding", offline_get_encoding)
    with pytest.raises(DataError, match="TIKTOKEN_CACHE_DIR"):
        Tokenizer({"dataset": "shakespeare", "tokenizer": "tiktoken", "encoding": "r50k_base", "vocab_size": 50257})


def test_prepare_script_runs_from_another_folder(small_input, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SHAKESPEARE_TXT"}
    script = str(REPO / "data" / "shakespeare_char" / "prepare.py")
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, script, "--input", str(small_input), "--out_dir", str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert f"vocab size: {len(set(SMALL_TEXT))}" in run.stdout
    assert load_meta(str(out))["chars"] == "".join(sorted(set(SMALL_TEXT)))
    assert os.path.getsize(out / "train.bin") == 2 * int(len(SMALL_TEXT) * 0.9)
    # a bad --input: exit code 1 and one line on stderr naming the file, no traceback
    run = subprocess.run([sys.executable, script, "--input", str(tmp_path / "missing.txt"), "--out_dir", str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "missing.txt" in run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr


# =============================================================================
# train.py (tiny models, a few iterations, CPU)

VERSES = ["First Citizen:\nBefore we proceed any further, hear me speak.\n\n",
          "All:\nSpeak, speak.\n\n",
          "First Citizen:\nYou are all resolved rather to die than to famish?\n\n",
          "MENENIUS:\nWhat work's, my countrymen, in hand? where go you\nWith bats and clubs?\n\n"]


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    """A small character dataset (about 20k characters of verse) prepared the way train.py expects."""
    root = tmp_path_factory.mktemp("char")
    text = "".join(VERSES[i % 4] if i % 7 else VERSES[(i * 3) % 4].upper() for i in range(200))
    (root / "input.txt").write_text(text)
    prepare("shakespeare_char", input_path=str(root / "input.txt"), out_dir=str(root / "data"))
    return str(root / "data")


def tiny_run(data_dir, out_dir, **overrides):
    """Settings for a training run of a few seconds on a CPU."""
    settings = dict(data_dir=data_dir, out_dir=str(out_dir), device="cpu", n_layer=2, n_head=2, n_embd=32,
                    block_size=32, batch_size=8, max_iters=6, lr_decay_iters=6, warmup_iters=0, eval_interval=3,
                    eval_iters=2, log_interval=1, learning_rate=3e-3, sample_tokens=0, predictor_hidden=16)
    settings.update(overrides)
    return settings


def test_a_few_iterations_lower_the_loss_and_report_everything(char_data, tmp_path, capsys):
    result = train.main(**tiny_run(char_data, tmp_path, max_iters=40, lr_decay_iters=40, eval_interval=40,
                                   eval_iters=4, sample_tokens=20, learning_rate=1e-2))
    out = capsys.readouterr().out
    first = float(out.split("step 0: train loss ")[1].split(",")[0])
    assert result["eval"]["train_topk"] < first - 0.5
    assert {"val_topk", "val_predictor", "predictor_acc"} <= result["eval"].keys()
    assert "iter 1: loss " in out and "tok/s" in out and "routed 12.5%" in out  # 4 of 32 tokens
    assert "(causal predictor)" in out and "predictor accuracy" in out
    assert len(result["sample"]) > 0 and os.path.exists(result["ckpt_path"])


def test_dense_baseline_trains_through_the_same_code(char_data, tmp_path, capsys):
    result = train.main(**tiny_run(char_data, tmp_path, mod_every=0))
    assert "val_predictor" not in result["eval"]
    assert "dense baseline" in capsys.readouterr().out


def test_resume_continues_exactly(char_data, tmp_path):
    settings = dict(dropout=0.1)  # dropout: the random state must continue exactly too
    straight = train.main(**tiny_run(char_data, tmp_path / "a", **settings))
    train.main(**tiny_run(char_data, tmp_path / "b", max_iters=3, **settings))
    resumed = train.main(**tiny_run(char_data, tmp_path / "b", init_from="resume", **settings))
    assert resumed["iter_num"] == straight["iter_num"] == 6
    a = torch.load(straight["ckpt_path"], weights_only=True)
    b = torch.load(resumed["ckpt_path"], weights_only=True)
    assert a["iter_num"] == b["iter_num"] == 6
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert resumed["eval"] == straight["eval"]


def test_checkpoint_is_written_atomically(char_data, tmp_path, monkeypatch):
    train.main(**tiny_run(char_data, tmp_path, max_iters=3))
    ckpt_path, best_path = tmp_path / "ckpt.pt", tmp_path / "best.pt"
    before, best_before = ckpt_path.read_bytes(), best_path.read_bytes()

    def crash(obj, path):  # the process dies in the middle of writing the checkpoint
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        train.main(**tiny_run(char_data, tmp_path, init_from="resume"))
    assert ckpt_path.read_bytes() == before  # the last good checkpoint survived
    assert best_path.read_bytes() == best_before  # and so did the best one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "ckpt.pt"]  # and no half-written file is left


def test_ctrl_c_saves_between_iterations_and_resume_is_exact(char_data, tmp_path, monkeypatch):
    settings = dict(dropout=0.1, gradient_accumulation_steps=2, max_iters=8, lr_decay_iters=8, eval_interval=4)
    usual_handler = signal.getsignal(signal.SIGINT)
    straight = train.main(**tiny_run(char_data, tmp_path / "a", **settings))
    real_for_iteration = train.Batches.for_iteration

    def ctrl_c_during_iteration_5(self, it):
        if it == 5:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, in the middle of an iteration
        return real_for_iteration(self, it)
    monkeypatch.setattr(train.Batches, "for_iteration", ctrl_c_during_iteration_5)
    stopped = train.main(**tiny_run(char_data, tmp_path / "b", **settings))
    assert stopped["interrupted"] and stopped["iter_num"] == 6  # iteration 5 was finished, then it stopped
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["iter_num"] == 6
    monkeypatch.undo()
    evaluated = train.main(**tiny_run(char_data, tmp_path / "b", init_from="resume", eval_only=True, **settings))
    assert evaluated["iter_num"] == 6 and "val_predictor" in evaluated["eval"]  # also off an eval boundary
    resumed = train.main(**tiny_run(char_data, tmp_path / "b", init_from="resume", **settings))
    a = torch.load(straight["ckpt_path"], weights_only=True)["model"]
    b = torch.load(resumed["ckpt_path"], weights_only=True)["model"]
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert signal.getsignal(signal.SIGINT) is usual_handler  # the usual Ctrl-C is back


def test_bad_checkpoints_get_a_clear_error(char_data, tmp_path):
    with pytest.raises(train.ConfigError, match="no checkpoint at .*train one first"):
        train.main(**tiny_run(char_data, tmp_path, init_from="resume"))
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(train.ConfigError, match="not a readable checkpoint"):
        train.main(**tiny_run(char_data, tmp_path, init_from="resume"))
    train.main(**tiny_run(char_data, tmp_path / "c", max_iters=3))
    with pytest.raises(train.ConfigError, match="trained with n_layer=2, not 3"):
        train.main(**tiny_run(char_data, tmp_path / "c", init_from="resume", n_layer=3))


def test_non_finite_loss_stops_without_saving_garbage(char_data, tmp_path):
    with pytest.raises(SystemExit, match="stopping: .*(non-finite|became)"):
        train.main(**tiny_run(char_data, tmp_path, learning_rate=1e6, min_lr=0.0, grad_clip=0.0, max_iters=30,
                              eval_interval=30))
    assert not (tmp_path / "ckpt.pt").exists()


def test_config_overrides_are_typed_and_checked():
    types = train.field_types()
    assert train.convert("dropout", "0", types["dropout"]) == 0.0  # nanoGPT asserts on --dropout=0
    assert train.convert("compile", "False", types["compile"]) is False
    assert train.convert("max_iters", "200", types["max_iters"]) == 200
    assert train.parse_args(["--max_iters=200", "--dataset=shakespeare"]) == {"max_iters": "200",
                                                                              "dataset": "shakespeare"}
    cfg, model = train.resolve_config({"max_iters": "7", "capacity": "0.25"}, "cpu")
    assert cfg.max_iters == 7 and model["capacity"] == 0.25 and model["n_layer"] == 4  # the CPU preset
    cfg, model = train.resolve_config({}, "cuda")
    assert model["n_layer"] == 6 and cfg.batch_size == 64  # nanoGPT's shakespeare_char on a GPU
    with pytest.raises(train.ConfigError, match=r"unknown setting --max_iter \(did you mean --max_iters\?\)"):
        train.resolve_config({"max_iter": "3"}, "cpu")
    with pytest.raises(train.ConfigError, match="--max_iters expects int, got 'ten'"):
        train.resolve_config({"max_iters": "ten"}, "cpu")
    with pytest.raises(train.ConfigError, match="--compile expects bool"):
        train.resolve_config({"compile": "maybe"}, "cpu")
    with pytest.raises(train.ConfigError, match="write settings as --key=value"):
        train.parse_args(["max_iters=3"])
    with pytest.raises(train.ConfigError, match="--device=gpu is not a device: use cpu, cuda"):
        train.pick_device("gpu")
    with pytest.raises(ValueError, match="capacity must be in"):
        train.main(device="cpu", capacity=0.0, data_dir="no/such/dir")


def test_device_setup(monkeypatch):
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.delenv("RANK", raising=False)
    assert train.setup_device("") == ("cuda", False, 0, 1) and current == []  # the current GPU, whichever it is
    assert train.setup_device("cuda:1") == ("cuda:1", False, 0, 1) and current == ["cuda:1"]
    assert train.setup_device("cpu") == ("cpu", False, 0, 1)


def test_config_objects_are_taken_whole(char_data, tmp_path):
    run = tiny_run(char_data, tmp_path, max_iters=2)
    train_fields = {k: v for k, v in run.items() if k in train.TrainConfig.__dataclass_fields__}
    model_fields = {k: v for k, v in run.items() if k in MoDConfig.__dataclass_fields__}
    result = train.main(train.TrainConfig(**train_fields), MoDConfig(**model_fields, capacity=0.5), seed=7)
    ckpt = torch.load(result["ckpt_path"], weights_only=True)
    assert ckpt["model_config"]["capacity"] == 0.5 and ckpt["model_config"]["n_embd"] == 32
    assert ckpt["model_config"]["dropout"] == 0.0 and ckpt["train_config"]["batch_size"] == 8
    assert ckpt["train_config"]["seed"] == 7  # keywords win


def test_cli_prints_one_line_errors():
    run = subprocess.run([sys.executable, "train.py", "--n_layers=3"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode != 0
    assert run.stderr.strip() == ("error: unknown setting --n_layers (did you mean --n_layer?); the settings are "
                                  "the fields of TrainConfig in train.py and MoDConfig in mod.py")


def test_ddp_two_cpu_processes(char_data, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    cmd += [f"--{k}={v}" for k, v in tiny_run(char_data, tmp_path, max_iters=3, gradient_accumulation_steps=2,
                                               eval_interval=3).items()]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "step 3: train loss" in run.stdout and (tmp_path / "ckpt.pt").exists()


# =============================================================================
# sample.py: generation from a checkpoint made here, routing display, agreement report, bad input

import sample  # noqa: E402


@pytest.fixture(scope="module")
def char_checkpoint(char_data, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("char_ckpt")
    train.main(**tiny_run(char_data, out_dir, max_iters=3))
    return str(out_dir)


def test_sample_from_a_char_checkpoint_with_routing_shown(char_checkpoint, capsys):
    report = sample.main(out_dir=char_checkpoint, start="First", num_samples=2, max_new_tokens=30,
                         show_routing=True, color="never", device="cpu")
    out = capsys.readouterr().out
    assert len(report["samples"]) == 2 and all(s.startswith("First") and len(s) == 35 for s in report["samples"])
    assert out.count("\nblock 1") >= 2  # a routing row under each line of each sample
    assert "tokens/s" in out and "KV cache at the end" in out and "agreement" in out
    assert report["tokens_per_s"] > 0 and 0 < report["kv_bytes"] < report["dense_kv_bytes"]
    assert [b["block"] for b in report["blocks"]] == [1]
    for b in report["blocks"]:
        assert 0 <= b["agreement"] <= 1 and 0 <= b["precision"] <= 1 and 0 <= b["recall"] <= 1


def test_sample_from_a_bpe_checkpoint(tmp_path, capsys):
    (tmp_path / "input.txt").write_text(SMALL_TEXT * 20, encoding="utf-8")
    prepare("shakespeare", input_path=str(tmp_path / "input.txt"), out_dir=str(tmp_path / "data"))
    train.main(**tiny_run(str(tmp_path / "data"), tmp_path / "out", dataset="shakespeare", max_iters=2,
                          block_size=16, eval_iters=1))
    report = sample.main(out_dir=str(tmp_path / "out"), start="", num_samples=1, max_new_tokens=10, device="cpu",
                         show_routing=True, color="always")
    out = capsys.readouterr().out
    assert "empty prompt: starting from <|endoftext|>" in out
    assert report["samples"][0].startswith("<|endoftext|>")
    assert "[routed blocks a token went through:" in out and "\nblock 1" not in out  # colour, not the rows


def test_routing_display_in_plain_text():
    pieces = ["a", "b", "\n", "c", "d"]
    rows = [[True, False, True, False, True], [False, True, False, False, False]]
    assert sample.render_routing(pieces, rows, [1, 3], color=False) == "\n".join([
        "         ab",
        "block 1  ^ ^",  # the newline was routed: its mark sits one past the end of the line
        "block 3   ^",
        "         cd",
        "block 1   ^",
        "block 3"])
    shaded = sample.render_routing(pieces, rows, [1, 3], color=True)
    assert shaded.startswith("\033[48;5;153ma\033[0m")  # routed through one block: the lightest shade
    assert "\033[48;5;153m\u21b5\n\033[0m" in shaded and "c" in shaded


def test_agreement_report_counts_precision_and_recall(char_checkpoint):
    model, _ = sample.load_model(char_checkpoint, "cpu")
    idx = torch.randint(0, model.config.vocab_size, (2, 32))
    block = routed_blocks(model)[0]
    torch.nn.init.constant_(block.predictor.out.bias, 100.0)  # routes every token: top-k's 4 of 32 are all found
    stats = sample.topk_agreement(model, idx, "predictor")[0]
    assert stats["recall"] == 1.0 and stats["precision"] == pytest.approx(4 / 32)
    assert stats["agreement"] == pytest.approx(4 / 32) and stats["routed"] == 1.0
    torch.nn.init.constant_(block.predictor.out.bias, -100.0)  # routes nothing
    stats = sample.topk_agreement(model, idx, "predictor")[0]
    assert stats["recall"] == 0.0 and stats["precision"] == 0.0 and stats["agreement"] == pytest.approx(28 / 32)


def test_sample_bad_input_gets_clear_messages(char_checkpoint, tmp_path, capsys):
    with pytest.raises(train.ConfigError, match="no checkpoint at .*train one with python train.py"):
        sample.main(out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="characters not in the vocabulary: '%', '€'"):
        sample.main(out_dir=char_checkpoint, start="%€", device="cpu")
    report = sample.main(out_dir=char_checkpoint, start="", num_samples=1, max_new_tokens=5, device="cpu")
    assert "empty prompt: starting from a newline" in capsys.readouterr().out
    assert report["samples"][0].startswith("\n")
    long_prompt = tmp_path / "prompt.txt"
    long_prompt.write_text("First Citizen:\n" * 10, encoding="utf-8")  # 150 characters, context 32
    report = sample.main(out_dir=char_checkpoint, start=f"FILE:{long_prompt}", num_samples=1, max_new_tokens=5,
                         device="cpu")
    assert "150 tokens, more than the model's context of 32: it sees only the last 32" in capsys.readouterr().out
    assert len(report["samples"][0]) == 37
    run = subprocess.run([sys.executable, "sample.py", f"--out_dir={tmp_path}"], cwd=REPO, capture_output=True,
                         text=True)
    assert run.returncode != 0 and run.stderr.startswith("error: no checkpoint at") and "Traceback" not in run.stderr


# =============================================================================
# bench.py: it runs and reports (what it measures is reported by it, never asserted as timings here)

import bench  # noqa: E402


def test_calibrated_predictors_route_the_capacity():
    model = bench.build(dict(n_layer=4, n_head=2, n_embd=32, block_size=64), 2, "cpu").eval()
    bench.calibrate_predictors(model, "cpu")
    idx = torch.randint(0, bench.VOCAB, (8, 64), generator=torch.Generator().manual_seed(0))
    model(idx, routing="predictor")
    for routed in model.last_routing[1::2]:
        assert routed.float().mean().item() == pytest.approx(0.125, abs=0.01)


def test_textbook_reference_computes_what_our_dense_model_computes():
    dense = tiny(mod_every=0).train()
    textbook = bench.TextbookGPT(dense)
    idx, targets = torch.randint(0, 50, (3, 32)), torch.randint(0, 50, (3, 32))
    logits, loss = dense(idx, targets)
    ref_logits, ref_loss = textbook(idx, targets)
    assert torch.allclose(logits, ref_logits, atol=1e-5) and torch.allclose(loss, ref_loss, atol=1e-6)
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(dense.parameters(), textbook.parameters()))


def test_bench_speed_reports_every_measure():
    shape = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_cpu=2, batch_gpu=2)
    text = "\n".join(bench.speed("tiny", shape, "cpu", "float32", False, repeats=1))
    for measure in ("| train step |", "| generate, batch 1 |", "| generate, batch 8 |", "forward GFLOPs, estimate",
                    "FlopCounterMode", "KV cache after generating", "| train step, textbook GPT as dense |"):
        assert measure in text
    assert "MoD/dense **0." in text  # the routed blocks' caches are smaller
