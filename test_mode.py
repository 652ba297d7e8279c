"""The specification of Mixture-of-Depths-and-Experts (mode.py): experts with expert-choice routing, staged and
integrated MoDE, causal sampling with a KV cache, FLOPs, one compiled graph. Tiny models, CPU, seconds."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mod
from mod import Block, MoDConfig, MoDGPT, tokens_routed
from mode import ExpertBlock, Experts, StagedMoDEBlock
from test_mod import HostSyncs, reference_generate


def tiny(mode="integrated", **overrides):
    """4 blocks, blocks 1 and 3 routed (MoD and/or experts), 3 experts each taking a quarter of the tokens."""
    fields = dict(block_size=32, vocab_size=50, n_layer=4, n_head=2, n_embd=32, capacity=0.25, n_experts=3,
                  expert_capacity=0.25, mode=mode)
    fields.update(overrides)
    torch.manual_seed(0)
    return MoDGPT(MoDConfig(**fields)).eval()


def expert_layers(model):
    return [m for m in model.modules() if isinstance(m, Experts)]


def capture_experts(model):
    """Collect each Experts module's (input, output) on every forward pass."""
    seen = []
    for experts in expert_layers(model):
        experts.register_forward_hook(lambda m, args, out: seen.append((m, args[0], out)))
    return seen


MODES = ["", "staged", "integrated"]


# -----------------------------------------------------------------------------
# 1. one expert at capacity 1 with weight 1 is the dense MLP


def test_one_expert_at_full_capacity_is_the_dense_mlp_exactly():
    model = tiny(mode="", n_experts=1, expert_capacity=1.0)  # softmax over one expert: weight exactly 1
    dense = tiny(mode="", n_experts=0, mod_every=0)
    state = {k.replace(".mlp.experts.0.", ".mlp.").replace(".block.", "."): v for k, v in model.state_dict().items()
             if ".gate." not in k and ".predictors." not in k}
    dense.load_state_dict(state)
    idx = torch.randint(0, 50, (2, 19))
    assert torch.equal(model(idx)[0], dense(idx)[0])
    assert all(info.processed.all() for info in model.last_infos)


# -----------------------------------------------------------------------------
# 2. expert choice: each expert processes exactly its k tokens per row; the others get no MLP update


@pytest.mark.parametrize("mode", MODES)
def test_each_expert_processes_exactly_its_k_tokens_per_row(mode):
    model = tiny(mode)
    seen = capture_experts(model)
    model(torch.randint(0, 50, (3, 29)))
    for experts, x, _ in seen:
        t = x.size(1)  # 29, or the k tokens MoD routed into a staged block
        assert t == (tokens_routed(0.25, 29) if mode == "staged" else 29)
        for e, info in enumerate(experts.last_infos):
            assert (info.processed.sum(1) == tokens_routed(0.25, t)).all()
            assert torch.equal(info.processed, info.topk)
            assert torch.equal((experts.last_choice >> e) & 1, info.processed.long())


@pytest.mark.parametrize("mode", ["", "integrated"])
def test_tokens_no_expert_takes_get_no_mlp_update(mode):
    model = tiny(mode, expert_capacity=0.125)
    seen = capture_experts(model)
    model(torch.randint(0, 50, (3, 32)))
    for experts, x, y in seen:
        taken = experts.last_choice > 0  # (B, T)
        assert (~taken).any() and torch.equal(y[~taken], torch.zeros_like(y[~taken]))  # exactly 0: x + 0 is x
        # each taken token's update is the sum of weight * expert over the experts that took it
        gates = torch.softmax(experts.gate(x), -1)
        want = sum(gates[..., e, None] * expert(x) * ((experts.last_choice >> e) & 1)[..., None]
                   for e, expert in enumerate(experts.experts))
        assert torch.allclose(y, want, atol=1e-6)


def test_integrated_gate_has_a_no_op_slot_and_the_control_has_none():
    integrated, control = tiny("integrated"), tiny("")
    assert [m.gate.out_features for m in expert_layers(integrated)] == [4, 4]  # 3 experts + no-op
    assert [m.gate.out_features for m in expert_layers(control)] == [3, 3]
    assert sum(p.numel() for p in integrated.parameters()) - sum(p.numel() for p in control.parameters()) == 2 * 32


@pytest.mark.parametrize("routing", ["topk", "predictor"])
def test_staged_tokens_mod_routes_around_skip_the_block_bit_identically(routing):
    model = tiny("staged")
    seen = []
    for block in model.transformer.h:
        if isinstance(block, StagedMoDEBlock):
            block.register_forward_hook(lambda m, args, out: seen.append((args[0], out[0], out[1][0])))
    model(torch.randint(0, 50, (3, 32)), routing=routing)
    for x, out, info in seen:
        skipped = ~info.processed
        assert skipped.any() and torch.equal(out[skipped], x[skipped])
    codes = model.last_routing[1]
    assert torch.equal(codes > 0, model.last_infos[0].processed)  # bit 3: went through the block, 0: skipped


def test_integrated_attention_and_kv_cache_stay_dense():
    model = tiny("integrated")
    cache = model.new_cache(2)
    model(torch.randint(0, 50, (2, 9)), routing="predictor", cache=cache)
    model(torch.randint(0, 50, (2, 1)), routing="predictor", cache=cache)
    assert all(layer.lengths.tolist() == [10, 10] for layer in cache.layers)  # every block stored every token


# -----------------------------------------------------------------------------
# 3. gradients: the gate learns from the LM loss; predictors learn only from their BCE


@pytest.mark.parametrize("mode", MODES)
def test_gate_learns_from_lm_loss_and_predictors_get_no_trunk_gradient(mode):
    model = tiny(mode).train()
    idx = torch.randint(0, 50, (2, 32))
    logits, _ = model(idx)
    torch.nn.functional.cross_entropy(logits.reshape(-1, 50), idx.reshape(-1)).backward()  # the LM loss alone
    for experts in expert_layers(model):
        assert experts.gate.weight.grad is not None and experts.gate.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in experts.predictors.parameters())  # the LM loss never reaches them
    model.zero_grad(set_to_none=True)
    model(idx)
    sum(torch.nn.functional.binary_cross_entropy_with_logits(i.predictor_logits, i.topk.float())
        for i in model.last_infos).backward()  # the predictors' BCE alone
    trunk = [p for n, p in model.named_parameters() if "predictor" not in n]
    assert all(p.grad is None for p in trunk)  # the stop-gradient: the predictors' BCE changes no other weight
    assert all(p.grad is not None for m in expert_layers(model) for p in m.predictors.parameters())


# -----------------------------------------------------------------------------
# 4. causality: the experts' top-k looks ahead, predictor routing does not


@pytest.mark.parametrize("mode", MODES)
def test_predictor_routing_is_causal_and_topk_is_not(mode):
    model = tiny(mode)
    idx = torch.randint(0, 50, (2, 32))
    changed = idx.clone()
    changed[:, 20:] = torch.randint(0, 50, (2, 12))  # a different future after position 20
    def choices(x, routing):
        model(x, routing=routing)
        return [c[:, :20] for c in model.last_routing if c is not None]
    assert all(torch.equal(a, b) for a, b in zip(choices(idx, "predictor"), choices(changed, "predictor")))
    assert not all(torch.equal(a, b) for a, b in zip(choices(idx, "topk"), choices(changed, "topk")))


# -----------------------------------------------------------------------------
# 5. generation: the cache equals the full forward; one sync per routed decision per token


@pytest.mark.parametrize("mode", MODES)
def test_greedy_generate_with_cache_equals_full_forward_past_block_size(mode):
    model = tiny(mode)
    prompt = torch.randint(0, 50, (3, 7))
    step_logits = []
    hook = model.register_forward_hook(lambda m, args, out: step_logits.append(out[0][:, -1]))
    out = model.generate(prompt, 45, temperature=0)  # 52 tokens, block_size 32: re-prefill too
    hook.remove()
    seen = model.last_routing
    expected, expected_logits, start = reference_generate(model, prompt, 45, "predictor")
    assert torch.equal(out, expected)
    for got, want in zip(step_logits, expected_logits):
        assert torch.allclose(got, want, atol=1e-5)
    model(out[:, start:-1], routing="predictor")  # the expert codes on the final window match the full forward
    for codes, full in zip(seen, model.last_routing):
        assert (codes is None and full is None) or torch.equal(codes[:, start:-1], full)


@pytest.mark.parametrize("mode", MODES)
def test_generation_syncs_once_per_routed_decision_per_token(mode, monkeypatch):
    model = tiny(mode)
    calls = []
    real_to_host = mod.to_host
    monkeypatch.setattr(mod, "to_host", lambda t: calls.append(t.shape) or real_to_host(t))
    seen = capture_experts(model)
    with HostSyncs() as syncs:
        model.generate(torch.randint(0, 50, (3, 5)), 20, temperature=0.8, top_k=10)
    assert syncs.ops == ["aten._local_scalar_dense.default"] * 2  # the prompt's ids, read once to check them
    # per forward pass (the prompt, then 19 tokens) and per routed block: one to_host per expert, plus MoD's
    # in a staged block, whose experts run (and sync) only in the steps where MoD routes some token in
    expert_runs = len(seen)
    assert len(calls) == 3 * expert_runs + (2 * 20 if mode == "staged" else 0)
    assert expert_runs == 2 * 20 or (mode == "staged" and expert_runs <= 2 * 20)
    with HostSyncs() as syncs:  # the training forward syncs nowhere
        model.train()(torch.randint(0, 50, (3, 32)), torch.randint(0, 50, (3, 32)), check_input=False)[1].backward()
    assert syncs.ops == []


# -----------------------------------------------------------------------------
# 6. FLOPs, and one compiled graph


@pytest.mark.parametrize("mode", MODES)
def test_estimate_flops_matches_flop_counter(mode):
    model = tiny(mode, block_size=64, n_embd=64, n_head=4, capacity=0.125)
    T = 64
    est = model.estimate_flops(T)
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 50, (1, T)))
    # CPU FlopCounterMode counts matrix multiplies but not the attention kernel (as test_mod.py)
    assert counter.get_total_flops() == est["blocks_linear"] + est["routing"] + est["head"]


def test_flops_of_the_experiment_configurations():
    C, T, k = 64, 64, tokens_routed(0.25, 64)
    dense = tiny("", n_experts=0, mod_every=0, n_embd=C, block_size=T).estimate_flops(T)
    moe = tiny("", n_experts=4, n_embd=C, block_size=T).estimate_flops(T)
    # 4 experts at capacity 1/4: the routed blocks' MLPs cost what a dense MLP does (plus the routing)
    assert moe["blocks_linear"] == dense["blocks_linear"] and 4 * k == T
    reduced = tiny("integrated", n_experts=4, expert_capacity=0.125, n_embd=C, block_size=T).estimate_flops(T)
    assert dense["blocks_linear"] - reduced["blocks_linear"] == 2 * (T // 2) * 2 * 8 * C * C  # half of 2 MLPs


@pytest.mark.parametrize("mode", MODES)
def test_training_forward_compiles_to_one_graph(mode):
    torch._dynamo.reset()
    model = tiny(mode).train()
    x, y = torch.randint(0, 50, (2, 32)), torch.randint(0, 50, (2, 32))
    explained = torch._dynamo.explain(model)(x, y, check_input=False)  # the call train.py makes
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


# -----------------------------------------------------------------------------
# 7. configuration


def test_config_checks_and_block_types():
    assert [type(b) for b in tiny("").transformer.h] == [Block, ExpertBlock, Block, ExpertBlock]
    assert [type(b) for b in tiny("staged").transformer.h] == [Block, StagedMoDEBlock, Block, StagedMoDEBlock]
    with pytest.raises(ValueError, match="needs experts"):
        MoDConfig(mode="staged")
    with pytest.raises(ValueError, match="mode must be"):
        MoDConfig(n_experts=2, mode="both")
    with pytest.raises(ValueError, match="expert_capacity must be in"):
        MoDConfig(n_experts=2, expert_capacity=0.0)
    with pytest.raises(ValueError, match="set mod_every >= 1"):
        MoDConfig(n_experts=2, mod_every=0)


# -----------------------------------------------------------------------------
# 8. the experiment of docs/mode.md, at a tiny size


def test_the_experiment_runs_at_a_tiny_size(tmp_path):
    from data.prepare import prepare
    path = Path(__file__).parent / "experiments" / "mode_experiment.py"
    spec = importlib.util.spec_from_file_location("mode_experiment", path)
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    (tmp_path / "input.txt").write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 300)
    prepare("shakespeare_char", input_path=str(tmp_path / "input.txt"), out_dir=str(tmp_path / "data"))
    rows = experiment.run(out_dir=str(tmp_path / "runs"), max_iters=2, seeds=2, n_layer=2, n_head=2, n_embd=16,
                          block_size=16, batch_size=2, eval_iters=1, data_dir=str(tmp_path / "data"),
                          plot=importlib.util.find_spec("matplotlib") is not None, predictor_hidden=8)
    names = [r["model"] for r in rows]
    assert names == ["dense", "MoE", "MoD", "staged MoDE", "integrated MoDE", "integrated MoDE", "control", "control"]
    flops = {r["model"]: r["flops"] for r in rows}
    assert flops["MoD"] < flops["dense"] and flops["staged MoDE"] < flops["MoE"]
    assert flops["integrated MoDE"] - flops["control"] == 2 * 16 * 16  # only the no-op's gate column differs
    assert rows[0]["val_causal"] is None and all(r["val_causal"] is not None for r in rows[1:])
    assert (tmp_path / "runs" / "results.json").exists()


def test_show_routing_marks_the_expert_each_token_took():
    from sample import mark, render_routing
    # bit e: expert e; bit 3 (n_experts): went through a staged block; a MoD block's bools keep their '^'
    assert [mark(v, 3) for v in (0, 1, 2, 4, 5, 8, 8 + 2, True, False)] == [" ", "0", "1", "2", "+", ".", "1", "^", " "]
    assert render_routing(["a", "b", "c"], [[0, 2, 5]], [1], color=False, n_experts=3).splitlines() == [
        "         abc", "block 1   1+"]
