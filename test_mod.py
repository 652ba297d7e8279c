"""The specification of Mixture-of-Depths: the model, its routing and its cache (mod.py). Tiny models, CPU, seconds:
`python -m pytest` runs these and test_scripts.py (data, training, sampling, the benchmark, the command lines)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import mod
from mod import Block, MoDBlock, MoDConfig, MoDGPT, tokens_routed


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



@pytest.mark.parametrize("router_weight", ["raw", "one"])
def test_random_control_weights_the_update_by_its_noise_or_by_one(router_weight):
    # "raw": the paper's control, the noise that picks the tokens is also their weight; "one" (the weight-1 control):
    # random selection without the random weight (Eq. 1 with w = 1)
    model = tiny(router="random", router_weight=router_weight)
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
        weight = noise[b, chosen, None] if router_weight == "raw" else 1.0
        assert torch.allclose(out[b, chosen], x[b, chosen] + weight * f, atol=1e-6)
    skipped = ~info.processed
    assert torch.equal(out[skipped], x[skipped])

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
    # model.last_infos holds what each routed block returned, in order: what sample.py and bench.py read
    assert len(model.last_infos) == 2 and all(a is b for (_, _, a), b in zip(seen, model.last_infos))


# -----------------------------------------------------------------------------
# 4. causality: causal modes see no future; top-k does (the reason for the predictor)


def test_predictor_scores_see_what_accuracy_hides():
    topk = torch.tensor([[True, False, False, False, False, False, False, False]])  # capacity 1/8
    nothing = mod.predictor_scores(mod.confusion(torch.zeros_like(topk), topk))
    assert nothing == dict(accuracy=7 / 8, balanced=0.5, precision=0.0, recall=0.0)  # 87.5% for routing nothing
    everything = mod.predictor_scores(mod.confusion(torch.ones_like(topk), topk))
    assert everything == dict(accuracy=1 / 8, balanced=0.5, precision=1 / 8, recall=1.0)
    decided = torch.tensor([[True, True, False, False, False, False, False, False]])
    counts = mod.confusion(decided, topk)
    assert counts.tolist() == [1, 1, 0, 6]  # both, the rule only, top-k only, neither
    assert mod.predictor_scores(counts + counts) == mod.predictor_scores(counts) == dict(  # counts add over batches
        accuracy=7 / 8, balanced=(1 + 6 / 7) / 2, precision=0.5, recall=1.0)


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


def test_tiny_and_huge_temperatures_sample_without_overflow():
    model = tiny()
    prompt = torch.randint(0, 50, (3, 5))
    greedy = model.generate(prompt, 40, temperature=0)  # past block_size 32: re-prefill too
    # 1 / temperature overflows fp32 below 1e-38 (and 5e-324 rounds to 0 in fp32): NaN probabilities, unless each
    # row's max is subtracted first. A temperature -> 0 then samples the argmax, which is greedy decoding.
    for temperature in (1e-30, 1e-40, 5e-324):
        torch.manual_seed(1)
        assert torch.equal(model.generate(prompt, 40, temperature=temperature), greedy), temperature
        assert torch.equal(model.generate(prompt, 40, temperature=temperature, top_k=5), greedy), temperature
    # a huge temperature samples (near-)uniformly: valid ids, spread over the vocabulary
    torch.manual_seed(1)
    out = model.generate(prompt, 40, temperature=1e300)
    assert out.shape == (3, 45) and torch.equal(out[:, :5], prompt) and 0 <= out.min() and out.max() < 50
    assert out[:, 5:].unique().numel() > 25  # 120 uniform draws from 50 ids hit about 45 of them; greedy, few
    # and top_k still keeps the k highest logits: every logit / 1e300 is 0 in fp32, so top_k comes first
    step_logits = []
    hook = model.register_forward_hook(lambda mod, args, out: step_logits.append(out[0][:, -1]))
    out = model.generate(prompt, 40, temperature=1e300, top_k=3)
    hook.remove()
    assert len(step_logits) == 40
    for step, logits in enumerate(step_logits):
        top3 = logits.topk(3, dim=-1).indices  # (3, 3)
        assert (top3 == out[:, 5 + step, None]).any(1).all(), step
    # a half model's logits are sampled in fp32 too: at 1e-30 (which overflows fp16 at once) each token is a max
    model = tiny().half()
    step_logits = []
    hook = model.register_forward_hook(lambda mod, args, out: step_logits.append(out[0][:, -1]))
    out = model.generate(prompt, 10, temperature=1e-30)
    hook.remove()
    for step, logits in enumerate(step_logits):  # a token whose logit is the row's max (ties allowed)
        assert torch.equal(logits.gather(1, out[:, 5 + step, None]), logits.max(1, keepdim=True).values), step


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_model_cast_to_half_runs_and_routes_in_fp32(dtype):
    model = tiny().to(dtype)  # model.half() or .to(torch.bfloat16): every weight in dtype, no autocast
    reference = tiny().to(dtype).float()  # the same rounded weights, back in fp32 (exactly)
    seen = capture_routing(model)
    idx = torch.randint(0, 50, (3, 32))
    logits, loss = model(idx, idx)
    assert logits.dtype == dtype and torch.isfinite(loss)  # the model ran in low precision...
    assert len(seen) == 2
    for (x, _, info), ref in zip(seen, routed_blocks(reference)):
        assert x.dtype == dtype
        assert info.router_logits.dtype == info.predictor_logits.dtype == torch.float32  # ...its routing in fp32
        # the scores of the fp32 router and predictor holding the same weights, on the same input, bit for bit
        r = ref.router(x.float())
        assert torch.equal(info.router_logits, r) and torch.equal(info.predictor_logits, ref.predictor(x.float()))
        # so the same tokens: exactly k = 8 per row, the fp32 router's top-k
        assert info.topk.sum(1).tolist() == [8] * 3
        assert torch.equal(info.topk, torch.zeros_like(info.topk).scatter_(1, r.topk(8, dim=1).indices, True))
    loss.backward()  # the router and the predictor learn through their fp32 copies of the weights
    for block in routed_blocks(model):
        assert block.router.proj.weight.grad.dtype == dtype and block.router.proj.weight.grad.abs().sum() > 0
        assert block.predictor.fc.weight.grad.dtype == dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # routing="router" without router_aux_loss warns: not the point here
        for routing in ("predictor", "router"):
            logits, _ = model(idx, routing=routing)
            assert logits.dtype == dtype and torch.isfinite(logits).all()
    out = model.generate(idx[:, :5], 40, temperature=0.8, top_k=10)  # past block_size 32: re-prefill too
    assert out.shape == (3, 45) and 0 <= out.min() and out.max() < 50
    assert model.last_cache_nbytes[0] == 2 * 3 * 32 * 32 * 2  # k and v, batch 3, 32 tokens, n_embd 32, 2 bytes
    assert model.generate(idx[:, :5], 40, temperature=0, routing="predictor").shape == (3, 45)


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
    (dict(router_weight="one"), "leaves a learned router without any gradient"),
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


def test_default_forward_compiles_to_one_graph_and_eager_still_checks_the_ids():
    # check_input=True (the default) reads the token ids in eager mode; under torch.compile it skips that read,
    # which would be a graph break (and a sync on a GPU), so torch.compile(model)(x, y) is one graph as well
    torch._dynamo.reset()
    model = tiny().train()
    x, y = torch.randint(0, 50, (2, 32)), torch.randint(0, 50, (2, 32))
    explained = torch._dynamo.explain(model)(x, y)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 50\)"):  # eager mode still checks them
        model(torch.full((2, 32), 50), y)
    with pytest.raises(ValueError, match=r"targets must be in \[0, 50\)"):
        model(x, torch.full((2, 32), 50))


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
