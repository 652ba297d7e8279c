"""
Mixture-of-Depths (MoD) in one file, in the style of nanoGPT's model.py.

Raposo et al., "Mixture-of-Depths: Dynamically allocating compute in transformer-based language models",
arXiv 2404.02258 (2024). Read top to bottom:

  CausalSelfAttention, MLP, Block   an ordinary GPT-2 block; Block.update(x) is the block's f(x)
  KVCache                           keys/values of one block during generation, per sequence
  Router                            r_i = w^T x_i, one scalar score per token (section 3.1)
  Predictor                         small MLP on stop-gradient(x) guessing top-k membership (section 3.5)
  MoDBlock                          top-k routing around a Block, Eq. 1
  Cache                             one KVCache per block, for MoDGPT.generate
  MoDGPT                            embeddings, blocks, head, losses, cached generation, FLOP estimate

Shapes: B batch, T sequence length, C n_embd, k tokens a routed block processes per sequence.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

ROUTING_MODES = ("topk", "predictor", "router")


@dataclass
class MoDConfig:
    block_size: int = 256  # longest sequence (context window)
    vocab_size: int = 65  # 65 characters for shakespeare_char; 50257 for GPT-2's BPE
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False  # bias in Linears and LayerNorms (GPT-2: True; a bit better and faster without)
    # --- Mixture-of-Depths ---
    capacity: float = 0.125  # fraction of each sequence's tokens that a routed block processes
    mod_every: int = 2  # route every mod_every-th block (1, 3, 5, ... for 2); block 0 is always dense; 0 = plain GPT
    router_weight: str = "raw"  # what multiplies the block's update: "raw" -> r (Eq. 1), "sigmoid" -> sigmoid(r)
    router_aux_loss: float = 0.0  # weight of the BCE that makes the router itself causal (paper's method 1)
    router: str = "learned"  # "learned", or "random": top-k on Gaussian noise (the paper's control)
    predictor_hidden: int = 64  # hidden width of the causal Predictor MLP (the paper gives none)

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raise one clear ValueError for a configuration that cannot work, saying how to fix it."""
        def need(ok, message):
            if not ok:
                raise ValueError(f"MoDConfig: {message}")
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "predictor_hidden"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, f"{name} must be a positive integer, got {value!r}")
        need(self.n_embd % self.n_head == 0,
             f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): change one of them")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}")
        need(0.0 < self.capacity <= 1.0,
             f"capacity must be in (0, 1] (the fraction of tokens a routed block processes; "
             f"the paper's best is 0.125), got {self.capacity!r}")
        need(isinstance(self.mod_every, int) and self.mod_every >= 0,
             f"mod_every must be an integer >= 0 (2 routes every other block, 0 gives the dense baseline), "
             f"got {self.mod_every!r}")
        need(self.router_weight in ("sigmoid", "raw"),
             f"router_weight must be 'sigmoid' or 'raw', got {self.router_weight!r}")
        need(self.router in ("learned", "random"), f"router must be 'learned' or 'random', got {self.router!r}")
        need(self.router_aux_loss >= 0, f"router_aux_loss must be >= 0, got {self.router_aux_loss!r}")

    def is_routed(self, i):
        """Is block i a routed (MoD) block? Every mod_every-th block is, never the first one."""
        return self.mod_every > 0 and i > 0 and (i + 1) % self.mod_every == 0

    def routed_blocks(self):
        return [i for i in range(self.n_layer) if self.is_routed(i)]


def tokens_routed(capacity, T):
    """k, the number of tokens a routed block processes in a sequence of T tokens: capacity * T, at least one.
    From the actual T, never from block_size. (The 1e-9 keeps 0.29 * 100 = 28.999... from flooring to 28.)"""
    return max(1, int(capacity * T + 1e-9))


# -----------------------------------------------------------------------------
# The ordinary transformer block (nanoGPT), and the KV cache used while generating


class KVCache:
    """Keys and values that one block has stored during generation, for every sequence of the batch.

    A routed block stores only the tokens routed into it, so the sequences of a batch hold different numbers of
    entries: row b's first lengths[b] slots are real, the rest is unused. The buffer grows on demand, `grow` slots
    at a time, to the longest row: a routed block holds memory for max(lengths) tokens per row, not for every token.
    """

    grow = 8

    def __init__(self, batch_size, device):
        self.k = None  # (B, slots, n_head, head_size), allocated on the first append
        self.v = None
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)

    def append(self, k, v, valid):
        """Store the new keys/values of the real tokens; return everything the new queries may attend to.

        k, v: (B, t, nh, hs) for t new tokens per row; valid: (B, t) bool, True for real tokens, which come first
        in each row (the rest is padding, see MoDBlock). Returns keys and values (B, S, nh, hs) and a mask
        (B, t, S): new token i of row b sees the row's old entries and the new ones up to itself.
        """
        B, t, nh, hs = k.shape
        start = self.lengths  # (B,) where each row's new entries go
        new_lengths = start + valid.sum(1)
        S = int(new_lengths.max())
        if self.k is None or self.k.size(1) < S:  # grow the buffer to the next multiple of `grow` slots
            slots = math.ceil(S / self.grow) * self.grow
            old = 0 if self.k is None else self.k.size(1)
            # zeros (not empty) so that padding queries, whose output is thrown away, never read NaN garbage
            k_buf, v_buf = (k.new_zeros(B, slots, nh, hs) for _ in range(2))
            if old:
                k_buf[:, :old], v_buf[:, :old] = self.k, self.v
            self.k, self.v = k_buf, v_buf
        rows, i = valid.nonzero(as_tuple=True)  # write only the real tokens: skipped ones leave no trace
        self.k[rows, start[rows] + i] = k[rows, i]
        self.v[rows, start[rows] + i] = v[rows, i]
        self.lengths = new_lengths
        query_pos = start[:, None] + torch.arange(t, device=k.device)  # (B, t) slot of each new token
        visible = torch.arange(S, device=k.device)[None, None, :] <= query_pos[:, :, None]  # (B, t, S)
        return self.k[:, :S], self.v[:, :S], visible

    def nbytes(self):
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head

    def forward(self, x, cache=None, valid=None):
        # x: (B, t, C). Without a cache, plain causal attention over these t tokens. With a cache (generation),
        # the t new tokens also attend to the ones stored before; valid (B, t) says which new tokens are real.
        B, t, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (z.view(B, t, self.n_head, C // self.n_head) for z in (q, k, v))  # (B, t, nh, hs)
        if cache is None:
            q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, nh, t, hs)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.attn_dropout if self.training else 0.0)
        else:
            if valid is None:
                valid = torch.ones(B, t, dtype=torch.bool, device=x.device)
            k, v, visible = cache.append(k, v, valid)  # (B, S, nh, hs), (B, t, S)
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
    """A GPT-2 block. Written as x + f(x) so that MoD can scale f, the block's update, on its own (Eq. 1)."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def update(self, x, cache=None, valid=None):
        # f(x) = a + m: the same arithmetic as nanoGPT's x = x + attn(..); x = x + mlp(..), minus the input
        a = self.attn(self.ln_1(x), cache, valid)
        m = self.mlp(self.ln_2(x + a))
        return a + m

    def forward(self, x, cache=None):
        return x + self.update(x, cache)


# -----------------------------------------------------------------------------
# Mixture-of-Depths


class Router(nn.Module):
    """r_i = w^T x_i: one scalar per token, one router per routed block (section 3.1; no bias in the paper)."""

    def __init__(self, config):
        super().__init__()
        self.proj = nn.Linear(config.n_embd, 1, bias=False)

    def forward(self, x):  # (B, T, C) -> (B, T) router logits
        return self.proj(x).squeeze(-1)


class Predictor(nn.Module):
    """Causal routing for sampling (section 3.5, method 2): a small MLP that guesses, from one token alone, whether
    the router's top-k will pick it. It reads the block input through a stop-gradient and is trained by BCE against
    the top-k mask, so it never changes what the language model learns."""

    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.predictor_hidden)
        self.gelu = nn.GELU()
        self.out = nn.Linear(config.predictor_hidden, 1)

    def forward(self, x):  # (B, T, C) -> (B, T) logits; > 0 means "route this token"
        return self.out(self.gelu(self.fc(x.detach()))).squeeze(-1)  # detach(): the stop-gradient


@dataclass
class RoutingInfo:
    """What a routed block decided, for the losses, the logs and model.last_routing. All (B, T)."""
    router_logits: torch.Tensor
    predictor_logits: torch.Tensor
    topk: torch.Tensor  # bool: the top-k choice, the target of the predictor (and of the router's aux loss);
    #                     None when generating with a cache
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

    def weight(self, r):
        # Eq. 1 multiplies by raw r; the paper's figures show weights in [0, 1] (sigmoid). We keep raw r, which
        # measured better: the causal-vs-top-k loss gap was 0.02-0.24% with raw r and 0.7-1.5% with sigmoid over
        # 3 seeds (README). With raw r a routed token can get a negative weight.
        return torch.sigmoid(r) if self.router_weight == "sigmoid" else r

    def forward(self, x, routing="topk", cache=None):
        B, T, C = x.shape
        r = self.router(x)  # (B, T)
        p = self.predictor(x)  # (B, T)

        # Expert-choice top-k, per sequence: the k highest-scoring tokens of each row. It looks at the whole
        # sequence, future included, so it is the training rule and the predictor's target, never a sampling rule.
        # With a cache (generation) only the new tokens are here, so a top-k over them would mean nothing: skip it.
        k = tokens_routed(self.capacity, T)
        topk = None
        if cache is None:
            scores = torch.randn_like(r) if self.random else r  # the paper's control routes on Gaussian noise
            topk = torch.zeros_like(r, dtype=torch.bool).scatter_(1, scores.topk(k, dim=1).indices, True)  # (B, T)

        if routing == "topk":
            processed = topk
        elif routing == "predictor":  # causal: each token decides alone, from its own predictor logit
            processed = p > 0
            k = int(processed.sum(1).max())  # rows route different numbers of tokens; shorter rows get padding
        else:  # "router": causal once the router has been trained with router_aux_loss
            processed = r > 0
            k = int(processed.sum(1).max())
        info = RoutingInfo(r, p, topk, processed)
        if k == 0:
            return x, info  # no row routes anything here: skip the block (an empty attention would be NaN)

        # Gather the routed tokens of each row into a (B, k, C) tensor, in sequence order (a stable sort puts the
        # routed positions first, in their original order), so the causal mask inside the block stays causal.
        # In the causal modes a row that routes fewer than k tokens is padded with some of its other tokens; the
        # padding sits after every real token, so no real query can see it, and its result is thrown away.
        order = processed.to(torch.int8).sort(dim=1, descending=True, stable=True).indices[:, :k]  # (B, k)
        valid = processed.gather(1, order)  # (B, k) True for real tokens
        index = order.unsqueeze(-1).expand(B, k, C)
        x_routed = x.gather(1, index)  # (B, k, C)
        f = self.block.update(x_routed, cache, valid)  # (B, k, C): attention + MLP on the routed tokens only
        w = self.weight(r.gather(1, order)).unsqueeze(-1)  # (B, k, 1)
        delta = torch.where(valid.unsqueeze(-1), w * f, 0.0)  # padding adds nothing
        # the residual is added exactly once: x + w * f at routed positions, x untouched everywhere else
        # (under mixed precision f is bf16/fp16 while the residual stream x stays fp32: scatter_add wants one dtype)
        return x.scatter_add(1, index, delta.to(x.dtype)), info


# -----------------------------------------------------------------------------
# The model


class Cache:
    """Generation state: one KVCache per block and `pos`, the number of tokens the cache has seen so far."""

    def __init__(self, n_layer, batch_size, device):
        self.layers = [KVCache(batch_size, device) for _ in range(n_layer)]
        self.pos = 0


class MoDGPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        config.validate()  # also catches fields changed after the config was made
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([MoDBlock(config) if config.is_routed(i) else Block(config)
                             for i in range(config.n_layer)]),
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
        self.last_stats = {}  # the parts of the last loss, detached, for logging
        self.last_cache_nbytes = []  # per block: bytes of its KV cache at the end of the last generate()

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

    def new_cache(self, batch_size):
        return Cache(self.config.n_layer, batch_size, self.lm_head.weight.device)

    def forward(self, idx, targets=None, routing="topk", cache=None):
        """idx: (B, T) token ids. Returns logits (B, T, vocab) and, with targets, the training loss:
        LM cross-entropy + the predictor's BCE + router_aux_loss * the router's BCE (parts in self.last_stats).

        routing: "topk" (training; looks ahead in the sequence), "predictor" or "router" (causal).
        cache: a Cache from new_cache() to continue a sequence token by token (causal routing only).
        """
        B, T = idx.shape
        start = 0 if cache is None else cache.pos
        self._check_input(idx, targets, routing, start + T, cache)
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        infos = []  # one RoutingInfo per routed block
        self.last_routing = []
        for i, block in enumerate(self.transformer.h):
            layer_cache = None if cache is None else cache.layers[i]
            if isinstance(block, MoDBlock):
                x, info = block(x, routing, layer_cache)
                infos.append(info)
                self.last_routing.append(info.processed)
            else:
                x = block(x, layer_cache)
                self.last_routing.append(None)
        if cache is not None:
            cache.pos += T
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = self._loss(logits, targets, infos)
        return logits, loss

    def _loss(self, logits, targets, infos):
        if targets.shape != logits.shape[:2]:
            raise ValueError(f"targets must have the shape of idx {tuple(logits.shape[:2])}, "
                             f"got {tuple(targets.shape)}")
        lm_loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        predictor_loss = router_loss = predictor_acc = lm_loss.new_zeros(())  # a dense model has no routing
        routed_frac = lm_loss.new_zeros(0)
        if infos:
            # Each target row is the top-k mask of its own sequence (built per row in MoDBlock, never pooled)
            predictor_loss = torch.stack([F.binary_cross_entropy_with_logits(i.predictor_logits, i.topk.float())
                                          for i in infos]).mean()
            router_loss = torch.stack([F.binary_cross_entropy_with_logits(i.router_logits, i.topk.float())
                                       for i in infos]).mean()
            predictor_acc = torch.stack([((i.predictor_logits > 0) == i.topk).float().mean()
                                         for i in infos]).mean()
            routed_frac = torch.stack([i.processed.float().mean() for i in infos])  # one entry per routed block
        loss = lm_loss + predictor_loss + self.config.router_aux_loss * router_loss
        self.last_stats = dict(
            lm_loss=lm_loss.detach(), predictor_loss=predictor_loss.detach(), router_loss=router_loss.detach(),
            predictor_acc=predictor_acc.detach(), routed_frac=routed_frac.detach(),
        )
        return loss

    def _check_input(self, idx, targets, routing, length, cache):
        if routing not in ROUTING_MODES:
            raise ValueError(f"unknown routing {routing!r}: use one of {', '.join(ROUTING_MODES)}")
        if cache is not None and routing == "topk":
            raise ValueError("routing='topk' looks at future tokens and cannot be used with a cache: "
                             "generate with routing='predictor' (or 'router')")
        if cache is not None and targets is not None:
            raise ValueError("targets are for training and a cache is for generation: pass one or the other")
        if idx.dim() != 2 or idx.size(1) == 0 or idx.dtype != torch.long:
            raise ValueError(f"idx must be a (B, T) torch.long tensor of token ids with T >= 1, "
                             f"got shape {tuple(idx.shape)} and dtype {idx.dtype}")
        if length > self.config.block_size:
            raise ValueError(f"sequence of length {length} is longer than block_size {self.config.block_size}: "
                             f"crop it to the last {self.config.block_size} tokens or train with a larger block_size")
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got ids from {int(idx.min())} "
                             f"to {int(idx.max())}: encode with the tokenizer this model was trained with")

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, routing="predictor"):
        """Sample max_new_tokens tokens after idx (B, T) with a KV cache and causal routing.

        At a routed block only the tokens routed there compute anything and store keys/values. The prompt is routed
        with the same causal rule. temperature=0 is greedy. Past block_size the context is cropped: when the window
        is full, the older half is dropped and the newer half is run again (re-prefilled) into fresh caches, so the
        logits are always those of model(window) for the current window.
        After the call, self.last_routing covers the returned sequence (for tokens processed more than once, the
        latest decision); the last sampled token has not been through the model and reads False.
        self.last_cache_nbytes holds the bytes of each block's KV cache at the end.
        """
        if routing == "topk":
            raise ValueError("routing='topk' looks at future tokens, so it cannot generate: use 'predictor' "
                             "(or 'router' after training with router_aux_loss > 0)")
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError("generate needs a (B, T) prompt with T >= 1: start from a newline or end-of-text token")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or None for no limit), got {top_k}")
        B, T0 = idx.shape
        window = self.config.block_size
        routed = [isinstance(b, MoDBlock) for b in self.transformer.h]
        seen = [torch.zeros(B, T0 + max_new_tokens, dtype=torch.bool, device=idx.device) if r else None
                for r in routed]

        def run(start, end, cache):  # feed idx[:, start:end] and record which tokens each routed block processed
            logits, _ = self(idx[:, start:end], routing=routing, cache=cache)
            for record, processed in zip(seen, self.last_routing):
                if record is not None:
                    record[:, start:end] = processed
            return logits[:, -1, :]

        start = max(0, T0 - window)  # a prompt longer than the window: keep its last block_size tokens
        cache = self.new_cache(B)
        logits = run(start, T0, cache) if max_new_tokens > 0 else None
        for step in range(max_new_tokens):
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
            idx = torch.cat((idx, next_id), dim=1)
            if step == max_new_tokens - 1:
                break  # the last token is returned, not fed back
            end = idx.size(1)
            if end - start > window:  # window full: keep its newer half and re-prefill it into fresh caches
                start = end - max(1, window // 2)
                cache = self.new_cache(B)
                logits = run(start, end, cache)
            else:
                logits = run(end - 1, end, cache)
        self.last_routing = seen
        self.last_cache_nbytes = [layer.nbytes() for layer in cache.layers]  # per block, at the end
        return idx

    def estimate_flops(self, T):
        """FLOPs (multiply-add = 2) of one forward pass over a sequence of T tokens, in "topk" routing.

        Returns a dict: 'blocks_linear' (the Linear layers of all blocks), 'blocks_attention' (q @ k^T and
        att @ v, counted in full as torch's FlopCounterMode does), 'routing' (routers and predictors),
        'head' (lm_head), 'total'. A routed block processes k = capacity * T tokens: its linear cost scales with k,
        its attention with k^2 (section 4 of MOD_NOTES: ~0.56x of the dense block stack at 12.5% every other block).
        """
        cfg = self.config
        C, H = cfg.n_embd, cfg.predictor_hidden
        linear_per_token = 2 * 12 * C * C  # qkv 3C^2, attention proj C^2, MLP 8C^2 multiply-adds
        blocks_linear = blocks_attention = routing = 0
        for block in self.transformer.h:
            n = T
            if isinstance(block, MoDBlock):
                n = tokens_routed(cfg.capacity, T)
                routing += T * (2 * C + 2 * C * H + 2 * H)  # router C -> 1, predictor C -> H -> 1, on every token
            blocks_linear += n * linear_per_token
            blocks_attention += 2 * 2 * n * n * C  # q @ k^T and att @ v over the n tokens the block sees
        head = 2 * T * C * cfg.vocab_size
        total = blocks_linear + blocks_attention + routing + head
        return dict(blocks_linear=blocks_linear, blocks_attention=blocks_attention, routing=routing, head=head,
                    total=total)
