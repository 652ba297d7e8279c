"""
Mixture-of-Depths-and-Experts (MoDE): the chapter after mod.py, built from its pieces.

Raposo et al., arXiv 2404.02258, section 4.3 and Fig. 7: MoD composes with mixture-of-experts (MoE) two ways.
  staged      a MoD block (router, top-k, Eq. 1) whose MLP is a mixture of experts: MoD decides which tokens enter
              the block, then the experts choose among those tokens
  integrated  one routing operation at the MLP sends tokens to one of the experts or to a "no-op" expert; attention
              stays dense. The paper found it better than lowering the experts' capacity and relying on token
              dropping, the control here (mode="", the same experts and capacity without the no-op slot).
Read top to bottom:

  Experts            expert-choice MoE in place of a Block's MLP: a softmax gate, each expert takes its top-k tokens
  ExpertBlock        a Block with Experts for its MLP, dense attention: MoE (mode="") or integrated MoDE
  StagedMoDEBlock    a MoDBlock with Experts for its MLP: staged MoDE
  make_block         what mod.MoDGPT builds at a routed position when n_experts > 0

Use it through mod.MoDConfig's fields: MoDGPT(MoDConfig(n_experts=4, expert_capacity=0.125, mode="integrated")), or
`python train.py --n_experts=4 --mode=integrated`. The experts sit where MoD's routed blocks sit (every mod_every-th
block, never block 0); the other blocks stay dense.

What the paper specifies: the two compositions, the no-op expert of integrated MoDE, and (for MoD, section 3.3)
expert-choice top-k routing. What it does not, and we chose: the MoE's routing is expert choice too (Zhou et al.
2022: softmax over the experts per token, each expert takes the top k = expert_capacity x t tokens of each sequence
by its softmax weight), so shapes are static and the training forward is one graph; no balance loss (expert choice
balances by construction); each expert is a full-size MLP (mod.MLP); the no-op is one more softmax column with no
compute behind it, so a token can put its weight there and become less likely to be taken by any expert; the
expert count and capacity are settings; sampling uses one Predictor per expert (as MoD's, section 3.5), trained by
BCE against that expert's top-k mask.

Sampling (mod.generate) works as for MoD: at most one host sync (mod.to_host) per routed decision per forward step,
so n_experts per ExpertBlock and 1 + n_experts per StagedMoDEBlock (1 when MoD routes no token in: its experts do
not run). An expert that no row routes a token to is skipped.

Shapes: B batch, t tokens reaching the MLP (T, or a staged block's k), C n_embd, E n_experts, k_e tokens per expert.
"""

import torch
import torch.nn as nn
from torch.nn import functional as F

from mod import MLP, Block, MoDBlock, Predictor, RoutingInfo, tokens_routed


class Experts(nn.Module):
    """Expert-choice mixture of experts, in place of a Block's MLP. For every token a gate gives a softmax over the
    E experts (and, with no_op, one more slot that computes nothing). Each expert takes the k_e tokens of each
    sequence with the highest weight for it and adds weight * expert(token) to the output: the weight puts the gate
    on the gradient path of the LM loss (as w(r) does in Eq. 1). A token no expert takes gets no MLP update."""

    def __init__(self, config, no_op):
        super().__init__()
        self.experts = nn.ModuleList([MLP(config) for _ in range(config.n_experts)])
        self.gate = nn.Linear(config.n_embd, config.n_experts + int(no_op), bias=False)  # last column: the no-op
        self.predictors = nn.ModuleList([Predictor(config) for _ in range(config.n_experts)])  # causal, per expert
        self.capacity = config.expert_capacity
        self.prepare("topk", cached=False)

    def prepare(self, routing, cached):
        # Block.update calls its MLP with x alone, so the block that owns these experts says how to route first.
        self.routing, self.cached = routing, cached
        self.last_infos, self.last_choice = [], None  # one RoutingInfo per expert; (B, t) codes (bit e: expert e)

    def forward(self, x):  # (B, t, C) -> (B, t, C)
        B, t, C = x.shape
        with torch.autocast(x.device.type, enabled=False):  # fp32, as mod.Router: top-k compares the weights
            logits = F.linear(x.float(), self.gate.weight.float())  # (B, t, E) or (B, t, E + 1)
        gates = logits.softmax(-1)  # (B, t, .) each token's weights, summing to 1 over the experts (and no-op)
        y = torch.zeros_like(x)
        choice = torch.zeros(B, t, dtype=torch.long, device=x.device)
        for e, (expert, predictor) in enumerate(zip(self.experts, self.predictors)):
            g, p = gates[..., e], predictor(x)  # (B, t) expert e's weights; its predictor's logits
            topk = None  # the expert's choice: k_e tokens per row, by weight; it looks ahead, as MoD's top-k does
            if not self.cached:
                chosen = g.topk(tokens_routed(self.capacity, t), dim=1).indices  # (B, k_e)
                topk = torch.zeros_like(g, dtype=torch.bool).scatter_(1, chosen, True)  # (B, t)
            if self.routing == "topk":
                processed, order, valid = topk, chosen.sort(dim=1).values, None
            else:  # causal: the predictor's logit > 0 (routing="router": the gate's logit), one to_host each
                processed, order, valid, _ = MoDBlock.causal_route(p if self.routing == "predictor" else logits[..., e])
            self.last_infos.append(RoutingInfo(logits[..., e], p, topk, processed))
            choice = choice + processed.long() * 2 ** e
            if order is None:  # this expert takes no token here
                continue
            index = order.unsqueeze(-1).expand(-1, -1, C)  # (B, k_e, C)
            f = expert(x.gather(1, index))  # (B, k_e, C)
            delta = g.gather(1, order).unsqueeze(-1) * f  # (B, k_e, C) weighted by the gate
            if valid is not None:
                delta = torch.where(valid.unsqueeze(-1), delta, 0.0)  # causal padding adds nothing
            y = y.scatter_add(1, index, delta.to(y.dtype))
        self.last_choice = choice
        return y

    def estimate_flops(self, t):
        """FLOPs of the experts and of their routing for t tokens (topk routing), as mod.estimate_flops counts."""
        C, H, E = self.gate.in_features, self.predictors[0].fc.out_features, len(self.experts)
        linear = E * tokens_routed(self.capacity, t) * 2 * 8 * C * C  # each expert: an MLP (8C^2) on its k_e tokens
        routing = t * 2 * C * self.gate.out_features + E * t * (2 * C * H + 2 * H)  # the gate, the E predictors
        return linear, routing


class ExpertBlock(nn.Module):
    """A Block whose MLP is Experts. Attention stays dense: every token goes through it and stores keys/values in
    the KV cache. Without no_op this is a plain expert-choice MoE block (the paper's control at reduced capacity);
    with it, integrated MoDE: the gate's one routing decides between the experts and doing nothing."""

    def __init__(self, config, no_op):
        super().__init__()
        self.block = Block(config)
        self.block.mlp = Experts(config, no_op)
        self.last_choice = None  # (B, T): bit e set where expert e took the token, 0 for no expert (mod.generate)

    def forward(self, x, routing="topk", cache=None):  # (B, T, C) -> (B, T, C), one RoutingInfo per expert
        experts = self.block.mlp
        experts.prepare(routing, cache is not None)
        x = self.block(x, cache)  # nanoGPT's x + attn, then x + experts
        self.last_choice = experts.last_choice
        return x, experts.last_infos

    def estimate_flops(self, T):
        C = self.block.ln_1.normalized_shape[0]
        linear, routing = self.block.mlp.estimate_flops(T)
        return dict(linear=T * 2 * 4 * C * C + linear, attention=2 * 2 * T * T * C, routing=routing)


class StagedMoDEBlock(MoDBlock):
    """Staged MoDE: a MoDBlock (mod.py, Eq. 1) whose MLP is Experts. MoD's router picks the block's k tokens; inside,
    the experts choose among those k only. Tokens MoD routes around the block skip it bit-identically, as in MoD."""

    def __init__(self, config):
        super().__init__(config)
        self.block.mlp = Experts(config, no_op=False)
        self.n_experts = config.n_experts
        self.last_choice = None  # (B, T): bit e for expert e, bit E for "went through the block", 0 for skipped it

    def forward(self, x, routing="topk", cache=None):  # -> x, [MoD's RoutingInfo, then one per expert]
        experts = self.block.mlp
        experts.prepare(routing, cache is not None)
        x, info = super().forward(x, routing, cache)
        # The experts' codes are over the block's routed tokens, which MoDBlock gathered in sequence order (then
        # padding): put them back at those positions. Nothing was routed: the experts did not run.
        processed = info.processed  # (B, T)
        k = experts.last_choice.size(1) if experts.last_choice is not None else 0
        order = processed.to(torch.int8).sort(dim=1, descending=True, stable=True).indices[:, :k]  # (B, k)
        codes = torch.where(processed.gather(1, order), experts.last_choice + 2 ** self.n_experts, 0) if k else order
        self.last_choice = torch.zeros_like(processed, dtype=torch.long).scatter(1, order, codes)
        return x, [info] + experts.last_infos

    def estimate_flops(self, T):
        C, H = self.block.ln_1.normalized_shape[0], self.predictor.fc.out_features
        n = tokens_routed(self.capacity, T)  # the tokens MoD routes into the block
        linear, routing = self.block.mlp.estimate_flops(n)
        return dict(linear=n * 2 * 4 * C * C + linear, attention=2 * 2 * n * n * C,
                    routing=T * (2 * C + 2 * C * H + 2 * H) + routing)  # MoD's router and predictor, then the experts'


def make_block(config):
    """The block at a routed position when config.n_experts > 0 (called by mod.make_block)."""
    if config.mode == "staged":
        return StagedMoDEBlock(config)
    return ExpertBlock(config, no_op=config.mode == "integrated")  # mode "": MoE, the no-op-free control
