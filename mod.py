"""
Mixture-of-Depths (MoD) in one file, in the style of nanoGPT's model.py.

Raposo et al., "Mixture-of-Depths: Dynamically allocating compute in transformer-based language models",
arXiv 2404.02258 (2024). Read top to bottom:

  MoDConfig, tokens_routed          the settings; k, the number of tokens a routed block processes
  CausalSelfAttention, MLP, Block   an ordinary GPT-2 block; Block.update(x) is the block's f(x)
  Router                            r_i = w^T x_i, one scalar score per token (section 3.1)
  Predictor                         small MLP on stop-gradient(x) guessing top-k membership (section 3.5)
  RoutingInfo, MoDBlock             top-k routing around a Block, Eq. 1; causal routing for sampling
  MoDGPT                            embeddings, blocks, head, losses
  Generation                        to_host (the one host-device sync), KVCache, Cache, generate
  estimate_flops                    FLOPs of one forward pass, dense and routed blocks
  Input checks                      one clear ValueError for each bad call, MoDConfig's checks too

Shapes: B batch, T sequence length, C n_embd, k tokens a routed block processes per sequence.

The next chapter, mode.py, adds mixture-of-experts (MoDE, section 4.3) through MoDConfig's n_experts,
expert_capacity and mode, which make_block reads.
"""

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


# -----------------------------------------------------------------------------
# Configuration


@dataclass
class MoDConfig:
    block_size: int = 256  # longest sequence (context window)
    vocab_size: int = 65  # 65 characters for shakespeare_char; 50257 for GPT-2's BPE
    n_layer: int = 6  # transformer blocks
    n_head: int = 6  # attention heads per block
    n_embd: int = 384  # width of the residual stream (the embedding size)
    dropout: float = 0.0  # dropout probability while training
    bias: bool = False  # bias in Linears and LayerNorms (GPT-2: True; a bit better and faster without)
    # --- Mixture-of-Depths ---
    capacity: float = 0.125  # fraction of each sequence's tokens that a routed block processes
    mod_every: int = 2  # route every mod_every-th block (1, 3, 5, ... for 2); block 0 is always dense; 0 = plain GPT
    router_weight: str = "raw"  # what multiplies the update: "raw" r (Eq. 1), "sigmoid", "one" (random router only)
    router_aux_loss: float = 0.0  # weight of the BCE that makes the router itself causal (paper's method 1)
    router: str = "learned"  # "learned", or "random": top-k on Gaussian noise (the paper's control)
    predictor_hidden: int = 64  # hidden width of the causal Predictor MLP (the paper gives none)
    # --- Mixture-of-Depths-and-Experts (the next chapter, mode.py) ---
    n_experts: int = 0  # MLP experts in each routed block (mode.py); 0 = the MoD block with its dense MLP
    expert_capacity: float = 0.25  # fraction of the tokens reaching an expert MLP that each expert processes
    mode: str = ""  # with n_experts: "" = experts only (MoE), "staged" or "integrated" MoDE (paper section 4.3)

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raise one clear ValueError for a configuration that cannot work, saying how to fix it (the checks are
        with the other input checks, at the end of the file)."""
        check_config(self)

    def is_routed(self, i):
        """Is block i a routed (MoD) block? Every mod_every-th block is, never the first one."""
        return self.mod_every > 0 and i > 0 and (i + 1) % self.mod_every == 0

    def routed_blocks(self):
        return [i for i in range(self.n_layer) if self.is_routed(i)]


def tokens_routed(capacity, T):
    """k, the number of tokens a routed block processes in a sequence of T tokens: capacity * T, at least one.
    From the actual T, never from block_size. (The 1e-9 keeps 0.29 * 100 = 28.999... from flooring to 28.)
    At least one means that short sequences route more than the capacity: at 12.5%, every T < 8 routes one token,
    which is 100% of a one-token sequence. Training uses T = block_size, so this only matters for short inputs."""
    return max(1, int(capacity * T + 1e-9))


# -----------------------------------------------------------------------------
# The ordinary transformer block (nanoGPT)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head

    def forward(self, x, cache=None, valid=None, counts=None):
        # x: (B, t, C). Without a cache, plain causal attention over these t tokens. With a cache (generation), the
        # t new tokens also attend to the ones stored before; valid and counts say which new ones are real (KVCache).
        B, t, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (z.view(B, t, self.n_head, C // self.n_head) for z in (q, k, v))  # (B, t, nh, hs)
        if cache is None:
            q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, nh, t, hs)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.attn_dropout if self.training else 0.0)
        else:
            k, v, visible = cache.append(k, v, valid, counts)  # (B, S, nh, hs), (B, t, S)
            q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, nh, ., hs)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None])
        y = y.transpose(1, 2).contiguous().view(B, t, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """A GPT-2 block. forward is nanoGPT's, two residual adds; update is the same arithmetic written as f(x), the
    block's update on its own, which a routed block scales before adding it to the residual stream (Eq. 1)."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):  # a dense block: x + f(x) without f as a tensor of its own
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))

    def update(self, x, cache=None, valid=None, counts=None):
        # f(x) = a + m, so that x + f(x) is forward(x) up to rounding; it costs one more add than forward
        a = self.attn(self.ln_1(x), cache, valid, counts)
        m = self.mlp(self.ln_2(x + a))
        return a + m


# -----------------------------------------------------------------------------
# Mixture-of-Depths: the router (section 3.1), the predictor (section 3.5) and the routed block (Eq. 1)


class Router(nn.Module):
    """r_i = w^T x_i: one scalar per token, one router per routed block (section 3.1; no bias in the paper)."""

    def __init__(self, config):
        super().__init__()
        self.proj = nn.Linear(config.n_embd, 1, bias=False)

    def forward(self, x):  # (B, T, C) -> (B, T) router logits, in fp32
        # Top-k compares scores across the sequence. In bf16 (8 significant bits) close scores round to exact ties
        # and the chosen tokens would depend on the dtype, so the router computes in fp32 (as mixture-of-experts
        # routers do), from fp32 copies of x and of its weight: under autocast, and in a model cast with .half() or
        # .to(torch.bfloat16), whose weight is then half. It is one C -> 1 projection: the cost is negligible.
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.proj.weight.float()).squeeze(-1)


class Predictor(nn.Module):
    """Causal routing for sampling (section 3.5, method 2): a small MLP that guesses, from one token alone, whether
    the router's top-k will pick it. It reads the block input through a stop-gradient and is trained by BCE against
    the top-k mask, so it never changes what the language model learns."""

    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.predictor_hidden)
        self.gelu = nn.GELU()
        self.out = nn.Linear(config.predictor_hidden, 1)

    def forward(self, x):  # (B, T, C) -> (B, T) logits in fp32 (as the Router's); > 0 means "route this token"
        with torch.autocast(x.device.type, enabled=False):  # fp32, from fp32 copies of the weights (see Router)
            x = x.detach().float()  # detach(): the stop-gradient
            h = self.gelu(F.linear(x, self.fc.weight.float(), self.fc.bias.float()))  # (B, T, H)
            return F.linear(h, self.out.weight.float(), self.out.bias.float()).squeeze(-1)  # (B, T)


@dataclass
class RoutingInfo:
    """What a routed block decided, for the losses, the logs, model.last_routing and model.last_infos. All (B, T)."""
    router_logits: torch.Tensor
    predictor_logits: torch.Tensor
    topk: torch.Tensor  # bool: the top-k choice, target of the predictor's BCE (and the router's); None with a cache
    processed: torch.Tensor  # bool: the tokens that went through the block (== topk in "topk" mode)


class MoDBlock(nn.Module):
    """A Block that only the top-k tokens of each sequence go through; all others skip it on the residual stream.

    Eq. 1:  x_i <- x_i + w(r_i) * f_i(X~)   if token i is routed,   x_i <- x_i   otherwise,
    where X~ are the routed tokens of the sequence (attention inside the block sees only them) and f is the Block's
    update. Multiplying by w(r_i) puts the router on the gradient path: top-k itself has no gradient.
    """

    def __init__(self, config):
        super().__init__()
        self.block = Block(config)
        self.router = Router(config)
        self.predictor = Predictor(config)
        self.capacity = config.capacity
        self.random = config.router == "random"
        self.router_weight = config.router_weight

    def forward(self, x, routing="topk", cache=None):
        B, T, C = x.shape
        r = self.router(x)  # (B, T)
        p = self.predictor(x)  # (B, T)

        # The paper's control routes on "router weights sampled from a Gaussian": the noise picks the tokens and
        # is also their weight, so the control learns neither which tokens deserve the block nor how much.
        scores = torch.randn_like(r) if self.random else r  # (B, T)

        # Expert-choice top-k, per sequence: the k highest-scoring tokens of each row. It looks at the whole
        # sequence, future included, so it is the training rule and the predictor's target, never a sampling rule.
        # With a cache (generation) only the new tokens are here, so a top-k over them would mean nothing: skip it.
        topk = None
        if cache is None:
            k = tokens_routed(self.capacity, T)
            chosen = scores.topk(k, dim=1).indices  # (B, k), in score order
            topk = torch.zeros_like(r, dtype=torch.bool).scatter_(1, chosen, True)  # (B, T)

        if routing == "topk":
            processed = topk
            order = chosen.sort(dim=1).values  # (B, k) in sequence order, so the block's causal mask stays causal
            valid = counts = None  # every row routes exactly k tokens: no padding
        else:  # causal routing, for sampling: see causal_route below
            processed, order, valid, counts = self.causal_route(p if routing == "predictor" else r)
            if order is None:  # no row routes anything here: skip the block (an empty attention would be NaN)
                return x, RoutingInfo(r, p, topk, processed)

        # Gather the routed tokens of each row into a (B, k, C) tensor, run the block on them alone, and add the
        # weighted update back at their positions: Eq. 1.
        index = order.unsqueeze(-1).expand(-1, -1, C)  # (B, k, C)
        x_routed = x.gather(1, index)  # (B, k, C)
        f = self.block.update(x_routed, cache, valid, counts)  # (B, k, C): attention + MLP on the routed tokens
        w = self.weight(scores.gather(1, order)).unsqueeze(-1)  # (B, k, 1)
        delta = w * f if valid is None else torch.where(valid.unsqueeze(-1), w * f, 0.0)  # padding adds nothing
        # the residual is added exactly once: x + w * f at routed positions, x untouched everywhere else
        # (scatter_add wants one dtype: under mixed precision f is bf16/fp16 while the residual stream x stays fp32;
        # in a model cast with .half() or .to(torch.bfloat16), x and f are half while w, the router's, is fp32)
        return x.scatter_add(1, index, delta.to(x.dtype)), RoutingInfo(r, p, topk, processed)

    def weight(self, r):
        # Eq. 1 multiplies by raw r; the paper's figures show weights in [0, 1] (sigmoid). We keep raw r, which
        # measured better: over 3 seeds its predictor's balanced accuracy was 92% against sigmoid's 81%, and the
        # causal loss lower on every seed (docs/results.md). With raw r a routed token can get a negative weight.
        # "one" (no weight) is for the random control only: it separates random *selection* from a random *weight*
        # (a learned router would get no gradient, so the config checks refuse it there).
        if self.router_weight == "one":
            return torch.ones_like(r)
        return torch.sigmoid(r) if self.router_weight == "sigmoid" else r

    @staticmethod  # mode.py's experts route causally by the same rule
    def causal_route(logits):
        """Causal routing (section 3.5): each token decides alone, from its own logit (B, T): the predictor's, or
        the router's once it has been trained with router_aux_loss. Returns processed (B, T) bool, the tokens that
        go through the block; order (B, k), each row's routed positions first, padded up to k, the most any row
        routes (None when no row routes anything); valid (B, k), True for the real tokens of order; counts, each
        row's number of routed tokens, on the host."""
        processed = logits > 0  # (B, T)
        # Rows route different numbers of tokens, and the tensor shapes depend on those numbers, so Python must know
        # them: this is the one host-device sync of a routed block. It buys the saving itself: a block that no row
        # routes into is skipped, and the others run on max(counts) tokens per row instead of T.
        counts = to_host(processed.sum(1))  # (B,) on the host
        k = max(counts)
        if k == 0:
            return processed, None, None, counts
        # The routed positions of each row, first and in sequence order (a stable sort of the 0/1 mask), then
        # padding up to k with some of its other tokens: the padding sits after every real token, so no real
        # query can see it, and its result is thrown away.
        order = processed.to(torch.int8).sort(dim=1, descending=True, stable=True).indices[:, :k]  # (B, k)
        valid = processed.gather(1, order)  # (B, k) True for real tokens
        return processed, order, valid, counts


# -----------------------------------------------------------------------------
# The model


ROUTING_MODES = ("topk", "predictor", "router")  # forward's routing: training's top-k, or causal (for sampling)


def make_block(config, i):
    """Block i: dense, a MoDBlock, or (with n_experts) a block of the next chapter, mode.py."""
    if not config.is_routed(i):
        return Block(config)
    if config.n_experts == 0:
        return MoDBlock(config)
    import mode  # here, not at the top: mode.py is built from this file's pieces
    return mode.make_block(config)


class MoDGPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        config.validate()  # also catches fields changed after the config was made
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([make_block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2
        # nanoGPT's init: N(0, 0.02), residual projections scaled down by 1/sqrt(2 * n_layer) (GPT-2 paper)
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.last_routing = []  # per block: None (dense) or (B, T) bool of the tokens it processed
        self.last_infos = []  # per routed block: the RoutingInfo of the last forward pass
        self.last_stats = {}  # the parts of the last loss, detached, for logging (router_loss: with router_aux_loss)
        self.last_cache_nbytes = []  # per block: bytes of its KV cache at the end of the last generate()
        self.warned_router = False  # routing="router" without router_aux_loss warns once (see check_call)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def forward(self, idx, targets=None, routing="topk", cache=None, check_input=True):
        """idx: (B, T) token ids. Returns logits (B, T, vocab) and, with targets (B, T), the training loss:
        LM cross-entropy + the predictor's BCE + router_aux_loss * the router's BCE (parts in self.last_stats).
        Targets of -1 are ignored.

        routing: "topk" (training; looks ahead in the sequence), "predictor" or "router" (causal).
        cache: a Cache from new_cache() to continue a sequence token by token (causal routing only).
        check_input: also check that every token id (and target) is in range, with a clear error if not. In eager
        mode this reads the ids, a host-device sync on a GPU; under torch.compile the check is skipped, because
        reading values would break the graph, so the default call compiles to one graph. train.py, which checks its
        data once when it loads it, passes False, and so does generate() after checking the prompt. Shapes, dtypes,
        lengths and modes are always checked: that costs nothing (see "Input checks" at the end of the file).
        """
        check_call(self, idx, targets, routing, cache)
        if check_input and not torch.compiler.is_compiling():  # reading the ids would break a compiled graph
            check_token_ids(self.config.vocab_size, idx, targets)
        B, T = idx.shape
        start = 0 if cache is None else cache.pos
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        self.last_infos = infos = []  # one RoutingInfo per routed block
        self.last_routing = []
        for i, block in enumerate(self.transformer.h):
            layer_cache = None if cache is None else cache.layers[i]
            if isinstance(block, Block):  # dense
                x = block(x, layer_cache)
                self.last_routing.append(None)
            else:  # routed: a MoDBlock gives one RoutingInfo; a MoDE block (mode.py) a list, one per decision
                x, info = block(x, routing, layer_cache)
                infos.extend(info if isinstance(info, list) else [info])
                self.last_routing.append(block.last_choice if isinstance(info, list) else info.processed)
        if cache is not None:
            cache.pos += T
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = self._loss(logits, targets, infos)
        return logits, loss

    def _loss(self, logits, targets, infos):
        # reshape, not view: targets may be a slice such as idx[:, 1:], which is not contiguous
        lm_loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        stats = dict(lm_loss=lm_loss.detach())
        if not infos:  # a dense model has no routing
            stats.update(predictor_loss=lm_loss.new_zeros(()), predictor_counts=lm_loss.new_zeros(4),
                         routed_frac=lm_loss.new_zeros(0))
            self.last_stats = stats
            return lm_loss
        # All routed blocks at once, flattened side by side: one BCE over every decision, which is the mean of the
        # blocks' BCEs as each decides for B * T tokens (a staged MoDE's experts, mode.py, decide for fewer). Each
        # target row is the top-k mask of its own sequence (built per row in MoDBlock, never pooled across the batch).
        topk = torch.cat([i.topk.flatten() for i in infos])
        target = topk.float()
        predictor_logits = torch.cat([i.predictor_logits.flatten() for i in infos])
        predictor_loss = F.binary_cross_entropy_with_logits(predictor_logits, target)
        loss = lm_loss + predictor_loss
        if self.config.router_aux_loss > 0:  # the paper's method 1: the router's own BCE makes it causal
            router_loss = F.binary_cross_entropy_with_logits(torch.cat([i.router_logits.flatten() for i in infos]),
                                                             target)
            loss = loss + self.config.router_aux_loss * router_loss
            stats["router_loss"] = router_loss.detach()
        with torch.no_grad():  # for the log
            stats.update(predictor_loss=predictor_loss.detach(),
                         predictor_counts=confusion(predictor_logits > 0, topk),  # predictor_scores reads it
                         routed_frac=torch.stack([i.processed.float().mean() for i in infos]))  # per decision
        self.last_stats = stats
        return loss

    def new_cache(self, batch_size, max_len=None):
        """An empty Cache for batch_size sequences of up to max_len tokens (default and at most: block_size)."""
        max_len = self.config.block_size if max_len is None else max_len
        if not (_is_int(batch_size) and batch_size >= 1 and _is_int(max_len)
                and 1 <= max_len <= self.config.block_size):
            raise ValueError(f"new_cache needs batch_size >= 1 and 1 <= max_len <= block_size "
                             f"({self.config.block_size}), got {batch_size!r} and {max_len!r}")
        return Cache(self.config, batch_size, max_len, self.lm_head.weight.device)

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, routing="predictor"):
        """Sample max_new_tokens tokens after idx (B, T) with a KV cache and causal routing: see generate() below."""
        return generate(self, idx, max_new_tokens, temperature, top_k, routing)

    def estimate_flops(self, T):
        """FLOPs of one forward pass over a sequence of T tokens, in "topk" routing: see estimate_flops() below."""
        return estimate_flops(self, T)


# -----------------------------------------------------------------------------
# Generation: the one host-device sync, the KV cache, and sampling with causal routing


def to_host(t):
    """A small tensor's values as Python numbers. On a GPU this is a host-device sync: Python waits until the GPU
    has computed everything queued before it. The training step never calls it; cached generation calls it once per
    routed block per step (see MoDBlock.causal_route; a MoDE block of mode.py: once per routing decision), and the
    tests count the calls."""
    return t.tolist()


class KVCache:
    """Keys and values that one block has stored during generation, for every sequence of the batch.

    A dense block stores every token, so its rows all hold the same number of entries and its buffer is allocated
    once, for max_len tokens. A routed block stores only the tokens routed into it, so its rows hold different
    numbers of entries (row b's first lengths[b] slots are real, the rest is unused); its buffer starts small and
    grows by a quarter when full, so it holds memory for about as many tokens as its longest row, and growing it
    copies each entry only a few times in all (geometric growth), not once per new token.

    The lengths are kept twice: on the model's device, for the attention mask, and on the host, to size the buffer
    without asking the GPU (each question would be a host-device sync).
    """

    def __init__(self, batch_size, max_len, routed, device):
        self.max_len, self.routed = max_len, routed
        self.k = None  # (B, slots, n_head, head_size), allocated on the first append
        self.v = None
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.host_lengths = [0] * batch_size  # the same numbers, as Python ints

    def append(self, k, v, valid=None, counts=None):
        """Store the new keys/values; return everything the new queries may attend to.

        k, v: (B, t, nh, hs) for t new tokens per row. For a routed block, valid (B, t) bool marks the real tokens,
        which come first in each row (the rest is padding, see MoDBlock), and counts lists each row's number of real
        tokens on the host; None means all t tokens are real. Returns keys and values (B, S, nh, hs) and a mask
        (B, t, S): new token i of row b sees the row's old entries and the new ones up to itself.
        """
        B, t, nh, hs = k.shape
        counts = [t] * B if counts is None else counts
        S = max(self.host_lengths) + t  # every row writes its t new tokens right after its own entries
        if self.k is None or self.k.size(1) < S:
            # a dense block's final length is known; a routed block's buffer grows by a quarter (and 8 slots)
            slots = self.max_len if not self.routed else min(self.max_len, S + S // 4 + 8)
            # zeros (not empty): a masked slot still enters attention as 0 * value, and 0 * NaN garbage is NaN
            k_buf, v_buf = (k.new_zeros(B, slots, nh, hs) for _ in range(2))
            if self.k is not None:
                old = self.k.size(1)
                k_buf[:, :old], v_buf[:, :old] = self.k, self.v
            self.k, self.v = k_buf, v_buf
        # Write all t tokens of row b to slots lengths[b], lengths[b] + 1, ... The real ones land where they belong;
        # the padding lands past the row's new end, where no query can see it and the row's next real token will
        # overwrite it. Writing it beats picking out the real tokens, which would need their positions on the host.
        slot = self.lengths[:, None] + torch.arange(t, device=k.device)  # (B, t) where each new token goes
        row = torch.arange(B, device=k.device)[:, None]  # (B, 1)
        self.k[row, slot] = k
        self.v[row, slot] = v
        self.lengths = self.lengths + (t if valid is None else valid.sum(1))
        self.host_lengths = [n + c for n, c in zip(self.host_lengths, counts)]
        visible = torch.arange(S, device=k.device)[None, None, :] <= slot[:, :, None]  # (B, t, S)
        return self.k[:, :S], self.v[:, :S], visible

    def nbytes(self):
        """Bytes of memory this cache holds (its buffers, including the unused slots)."""
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes


class Cache:
    """Generation state: one KVCache per block and `pos`, the number of tokens the cache has seen so far (at most
    max_len)."""

    def __init__(self, config, batch_size, max_len, device):
        self.batch_size, self.max_len = batch_size, max_len
        self.layers = [KVCache(batch_size, max_len, config.is_routed(i), device) for i in range(config.n_layer)]
        self.pos = 0


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, routing="predictor"):
    """Sample max_new_tokens tokens after idx (B, T) with a KV cache and causal routing.

    At a routed block only the tokens routed there compute anything and store keys/values. The prompt is routed
    with the same causal rule. temperature=0 is greedy. Past block_size the context is cropped: when the window
    is full, the older half is dropped and the newer half is run again (re-prefilled) into fresh caches, so the
    logits are always those of model(window) for the current window.
    After the call, model.last_routing covers the returned sequence (for tokens processed more than once, the
    latest decision); the last sampled token has not been through the model and reads False.
    model.last_cache_nbytes holds the bytes of each block's KV cache at the end.
    """
    check_generate(model, idx, max_new_tokens, temperature, top_k, routing)  # reads the prompt's ids once
    B, T0 = idx.shape
    window = model.config.block_size
    # per routed block (B, T0 + max_new_tokens): bool for a MoDBlock, a MoDE block's expert codes (mode.py)
    seen = [None if isinstance(b, Block) else torch.zeros(B, T0 + max_new_tokens, device=idx.device,
                                                          dtype=torch.long if hasattr(b, "last_choice") else torch.bool)
            for b in model.transformer.h]

    def run(start, end, cache):  # feed idx[:, start:end] and record which tokens each routed block processed
        logits, _ = model(idx[:, start:end], routing=routing, cache=cache, check_input=False)
        for record, processed in zip(seen, model.last_routing):
            if record is not None:
                record[:, start:end] = processed
        return logits[:, -1, :]

    start = max(0, T0 - window)  # a prompt longer than the window: keep its last block_size tokens
    max_len = min(window, T0 - start + max_new_tokens - 1)  # the most tokens a cache will hold
    cache = model.new_cache(B, max(1, max_len))
    logits = run(start, T0, cache) if max_new_tokens > 0 else None
    for step in range(max_new_tokens):
        if temperature == 0:
            next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        else:
            # Sampling, in fp32 (a half model's logits too). logits / temperature overflows for a tiny temperature
            # (in fp32 below 1e-38, where 1 / temperature is inf; sooner in fp16 or for large logits), and softmax's
            # inf - inf is NaN. So each row's max is subtracted first: the argmax is 0 and stays 0, every other logit
            # is < 0 and only grows more negative (to -inf at worst), and softmax is exact. As temperature -> 0 this
            # samples the argmax, as greedy does; a huge temperature (1e300) samples uniformly.
            logits = logits.float()
            logits = logits - logits.max(dim=-1, keepdim=True).values  # (B, V), <= 0, the argmax exactly 0
            if top_k is not None:  # before the temperature, which keeps the order but may round logits into ties
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits = logits.masked_fill(logits < v[:, [-1]], -float("inf"))  # (a boolean index would sync)
            # In fp32 the temperature must stay between the smallest normal number, 1.2e-38, and its reciprocal,
            # 8.5e37: 5e-324 would round to 0 (0 / 0 is NaN), 1e300 to inf (-inf / inf is NaN). Both bounds lie far
            # past any real logits' scale: at 1.2e-38 a logit 1e-35 below the max is divided to -850, probability
            # 0; at 8.5e37 every logit less than 1e29 below the max gets the max's probability.
            tiny = torch.finfo(torch.float32).tiny
            logits = logits / min(max(temperature, tiny), 1 / tiny)
            next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
        idx = torch.cat((idx, next_id), dim=1)
        if step == max_new_tokens - 1:
            break  # the last token is returned, not fed back
        end = idx.size(1)
        if end - start > window:  # window full: keep its newer half and re-prefill it into fresh caches
            start = end - max(1, window // 2)
            cache = model.new_cache(B, max_len)
            logits = run(start, end, cache)
        else:
            logits = run(end - 1, end, cache)
    model.last_routing = seen
    model.last_cache_nbytes = [layer.nbytes() for layer in cache.layers]  # per block, at the end
    return idx


# -----------------------------------------------------------------------------
# estimate_flops: the FLOPs of one forward pass


def estimate_flops(model, T):
    """FLOPs (multiply-add = 2) of one forward pass over a sequence of T tokens, in "topk" routing.

    Returns a dict: 'blocks_linear' (the Linear layers of all blocks), 'blocks_attention' (q @ k^T and
    att @ v, counted in full as torch's FlopCounterMode does), 'routing' (routers and predictors),
    'head' (lm_head), 'total'. A routed block processes k = capacity * T tokens: its linear cost scales with k,
    its attention with k^2. At capacity 0.125 on every other block, the routed half of the blocks costs 1/8 of a
    dense block's linear FLOPs and 1/64 of its attention FLOPs, so the block stack's linear FLOPs are
    (1 + 1/8) / 2 = 0.56x the dense model's (plus the routers and predictors, which are small).
    """
    cfg = model.config
    C, H = cfg.n_embd, cfg.predictor_hidden
    linear_per_token = 2 * 12 * C * C  # qkv 3C^2, attention proj C^2, MLP 8C^2 multiply-adds
    blocks_linear = blocks_attention = routing = 0
    for block in model.transformer.h:
        n = T
        if hasattr(block, "estimate_flops"):  # a MoDE block (mode.py) counts its own FLOPs
            flops = block.estimate_flops(T)
            blocks_linear, blocks_attention = blocks_linear + flops["linear"], blocks_attention + flops["attention"]
            routing += flops["routing"]
            continue
        if isinstance(block, MoDBlock):
            n = tokens_routed(cfg.capacity, T)
            routing += T * (2 * C + 2 * C * H + 2 * H)  # router C -> 1, predictor C -> H -> 1, on every token
        blocks_linear += n * linear_per_token
        blocks_attention += 2 * 2 * n * n * C  # q @ k^T and att @ v over the n tokens the block sees
    head = 2 * T * C * cfg.vocab_size
    total = blocks_linear + blocks_attention + routing + head
    return dict(blocks_linear=blocks_linear, blocks_attention=blocks_attention, routing=routing, head=head,
                total=total)


# -----------------------------------------------------------------------------
# Measuring a causal rule against top-k


def confusion(decided, topk):
    """A causal rule's decisions against top-k's (bool tensors of one shape), as counts on the device (no sync):
    (routed by both, by the rule only, by top-k only, by neither)."""
    return torch.stack([(decided & topk).sum(), (decided & ~topk).sum(), (~decided & topk).sum(),
                        (~decided & ~topk).sum()]).float()


def predictor_scores(counts):
    """How well a causal rule matches top-k, from confusion() counts (summed over batches if you like). Accuracy
    alone flatters it: at 12.5% capacity a rule that routes nothing is right on 87.5% of the tokens. Precision,
    recall and balanced accuracy look at the routed tokens: balanced accuracy is 50% for a rule that routes nothing
    (or everything), whatever the capacity. Returns a dict of floats in [0, 1]."""
    both, rule_only, topk_only, neither = counts.tolist()
    recall = both / max(1.0, both + topk_only)  # of top-k's picks, the share the rule routes
    specificity = neither / max(1.0, neither + rule_only)  # of the tokens top-k skips, the share the rule skips
    return dict(accuracy=(both + neither) / max(1.0, both + rule_only + topk_only + neither),
                balanced=(recall + specificity) / 2,
                precision=both / max(1.0, both + rule_only),  # of the tokens the rule routes, the share top-k picks
                recall=recall)


# -----------------------------------------------------------------------------
# Input checks: one clear ValueError for each bad call


def _is_int(v):
    """An int, and not a bool (True is an int in Python, but not a count)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return _is_int(v) or isinstance(v, float)


def check_call(model, idx, targets, routing, cache):
    """A forward call's shapes, dtypes, lengths and modes: metadata only, free on any device and under compile."""
    if routing not in ROUTING_MODES:
        raise ValueError(f"unknown routing {routing!r}: use one of {', '.join(ROUTING_MODES)}")
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.size(1) == 0 or idx.dtype != torch.long:
        got = f"shape {tuple(idx.shape)} and dtype {idx.dtype}" if isinstance(idx, torch.Tensor) else repr(idx)
        raise ValueError(f"idx must be a (B, T) torch.long tensor of token ids with T >= 1, got {got}: "
                         f"for one sequence use idx[None] (or idx.unsqueeze(0))")
    if targets is not None and (not isinstance(targets, torch.Tensor) or targets.shape != idx.shape
                                or targets.dtype != torch.long):
        got = (f"shape {tuple(targets.shape)} and dtype {targets.dtype}" if isinstance(targets, torch.Tensor)
               else repr(targets))
        raise ValueError(f"targets must be a torch.long tensor of the shape of idx {tuple(idx.shape)}, got {got}")
    if routing == "router" and model.config.router_aux_loss == 0 and model.config.routed_blocks():
        if not model.warned_router:  # once per model, not once per generated token
            model.warned_router = True
            warnings.warn("routing='router' on a model trained with router_aux_loss=0: its router was not "
                          "taught to be causal; routing='predictor' is the reliable choice")
    length = idx.size(1)
    if cache is not None:
        if routing == "topk":
            raise ValueError("routing='topk' looks at future tokens and cannot be used with a cache: "
                             "generate with routing='predictor' (or 'router')")
        if targets is not None:
            raise ValueError("targets are for training and a cache is for generation: pass one or the other")
        if cache.batch_size != idx.size(0):
            raise ValueError(f"the cache was made for a batch of {cache.batch_size} sequences, idx has "
                             f"{idx.size(0)}: make one with model.new_cache({idx.size(0)})")
        length += cache.pos
        if length > cache.max_len:
            raise ValueError(f"the cache holds {cache.max_len} tokens and has {cache.pos}, so it cannot take "
                             f"{idx.size(1)} more: make a larger one with new_cache(batch_size, max_len)")
    if length > model.config.block_size:
        raise ValueError(f"sequence of length {length} is longer than block_size {model.config.block_size}: "
                         f"crop it to the last {model.config.block_size} tokens or train with a larger block_size")


def check_token_ids(V, idx, targets):
    """Token ids in [0, V) and targets in [-1, V), V the vocab_size: this reads the tensors (a sync on a GPU, and a
    graph break under torch.compile)."""
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= V:
        raise ValueError(f"token ids must be in [0, {V}), got ids from {lo} to {hi}: encode with the tokenizer "
                         f"this model was trained with")
    if targets is not None:
        lo, hi = int(targets.min()), int(targets.max())
        if lo < -1 or hi >= V:
            raise ValueError(f"targets must be in [0, {V}) (or -1 to ignore a position), got {lo} to {hi}")


def check_generate(model, idx, max_new_tokens, temperature, top_k, routing):
    """generate()'s arguments and its prompt: shapes, and the ids once (the steps skip the check that reads them)."""
    if routing == "topk":
        raise ValueError("routing='topk' looks at future tokens, so it cannot generate: use 'predictor' "
                         "(or 'router' after training with router_aux_loss > 0)")
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not _is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0, a finite number (0 is greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be >= 1, an integer (or None for no limit), got {top_k!r}")
    if isinstance(idx, torch.Tensor) and idx.dim() == 2 and idx.size(1) == 0:
        raise ValueError("generate needs a (B, T) prompt with T >= 1: start from a newline or end-of-text token")
    # the prompt, once: generate's steps skip the check that reads the ids (it would be a sync per step)
    prompt = idx[:, -model.config.block_size:] if isinstance(idx, torch.Tensor) and idx.dim() == 2 else idx
    check_call(model, prompt, None, routing, None)  # its last block_size tokens: generate crops the rest
    check_token_ids(model.config.vocab_size, idx, None)


def check_config(config):
    """MoDConfig.validate: every field of a MoDConfig, one clear ValueError for the first that cannot work."""
    def need(ok, message):
        if not ok:
            raise ValueError(f"MoDConfig: {message}")
    for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "predictor_hidden"):
        value = getattr(config, name)
        need(_is_int(value) and value >= 1, f"{name} must be a positive integer, got {value!r}")
    for name in ("dropout", "capacity", "router_aux_loss", "expert_capacity"):  # "0.5" or True is no number
        value = getattr(config, name)
        need(_is_number(value) and math.isfinite(value), f"{name} must be a number, got {value!r}")
    need(isinstance(config.bias, bool), f"bias must be True or False, got {config.bias!r}")
    need(config.n_embd % config.n_head == 0,
         f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head}): change one of them")
    need(0.0 <= config.dropout < 1.0, f"dropout must be in [0, 1), got {config.dropout!r}")
    need(0.0 < config.capacity <= 1.0,
         f"capacity must be in (0, 1] (the fraction of tokens a routed block processes; "
         f"the paper's best is 0.125), got {config.capacity!r}")
    need(_is_int(config.mod_every) and config.mod_every >= 0,
         f"mod_every must be an integer >= 0 (2 routes every other block, 0 gives the dense baseline), "
         f"got {config.mod_every!r}")
    need(config.router_weight in ("sigmoid", "raw", "one"),
         f"router_weight must be 'raw', 'sigmoid' or 'one', got {config.router_weight!r}")
    need(config.router in ("learned", "random"), f"router must be 'learned' or 'random', got {config.router!r}")
    need(config.router_weight != "one" or config.router == "random",
         "router_weight='one' leaves a learned router without any gradient (the weight is how it learns): use it "
         "with router='random' (the weight-1 random control), or router_weight='raw'")
    need(config.router_aux_loss >= 0, f"router_aux_loss must be >= 0, got {config.router_aux_loss!r}")
    need(_is_int(config.n_experts) and config.n_experts >= 0, f"n_experts must be an integer >= 0, got "
         f"{config.n_experts!r}")
    need(0.0 < config.expert_capacity <= 1.0, f"expert_capacity must be in (0, 1], got {config.expert_capacity!r}")
    need(config.mode in ("", "staged", "integrated"),
         f"mode must be '', 'staged' or 'integrated', got {config.mode!r}")
    need(config.mode == "" or config.n_experts >= 1, f"mode={config.mode!r} needs experts: set n_experts >= 1")
    need(config.n_experts == 0 or config.mod_every >= 1,
         "n_experts > 0 puts experts in the routed blocks: set mod_every >= 1")
