"""A small transformer text decoder over the image features: the reasoning head that writes the chain.

Designed after CoCa's multimodal text decoder (open_clip): pre-norm blocks of causal self-attention,
cross-attention to the image and an MLP, with the output layer tied to the token embedding. The image is
seen as ``memory_tokens`` tokens projected from the backbone's pooled features (as ClipCap prefixes do), so
the decoder trains on cached features exactly as on photos, and its gradient reaches the backbone when that
is trained.

The output layer is **class-factored** (Goodman, 2001): the caption vocabulary comes in contiguous groups
(the template's words, then the values of each part: the 4,609 admin-1 regions, the 6,000 places, ...), and
``p(token) = p(group) * p(token | group)``. Training then scores each position against its target's group
only (a few dozen logits for a word, a few thousand for the one admin-1 position of a text) instead of all
11,000 tokens, which is most of a full softmax's cost; generation still computes the exact joint distribution.

Attention is written out (``softmax(q k^T / sqrt(d)) v``) rather than through the fused kernel: sequences
are under 50 tokens, the explicit form is what TorchScript and ONNX export as is, and on CPUs its bf16
backward is the faster one (:mod:`geoloc.precision`).

:meth:`TextDecoder.generate` decodes greedily with a key/value cache (TorchScript-compatible, so the
exported model can write its chain); :meth:`TextDecoder.beam_search` keeps ``beams`` hypotheses (eager).
Both return each generated token's probability under the decoder: what a parsed claim carries.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

Cache = list[tuple[torch.Tensor, torch.Tensor]]


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    b, t, d = x.shape
    return x.view(b, t, n, d // n).transpose(1, 2)  # [B, H, T, Dh]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        t, s = q.shape[-2], k.shape[-2]
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
        att = att.masked_fill(~mask, float("-inf"))
    return att.softmax(-1) @ v


class DecoderBlock(nn.Module):
    """Causal self-attention (with an optional cache), cross-attention to the image memory, MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.ln_self, self.qkv = nn.LayerNorm(width), nn.Linear(width, 3 * width)
        self.proj_self = nn.Linear(width, width)
        self.ln_cross, self.q, self.kv = nn.LayerNorm(width), nn.Linear(width, width), nn.Linear(width, 2 * width)
        self.proj_cross = nn.Linear(width, width)
        self.ln_mlp = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.drop = nn.Dropout(dropout)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-attention keys and values of the image memory ``[B, M, W]`` (computed once per text)."""
        k, v = self.kv(memory).chunk(2, dim=-1)
        return _heads(k, self.heads), _heads(v, self.heads)

    def forward(self, x: torch.Tensor, memory: tuple[torch.Tensor, torch.Tensor],
                past: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Args: x ``[B, T, W]`` (new positions), memory (:meth:`memory_kv`), past ``(k, v)`` of the earlier
        positions (``T0 = 0`` for none). Returns ``(x, (k, v))`` with the cache extended by ``T``."""
        q, k, v = self.qkv(self.ln_self(x)).chunk(3, dim=-1)
        k = torch.cat([past[0], _heads(k, self.heads)], dim=2)
        v = torch.cat([past[1], _heads(v, self.heads)], dim=2)
        a = _attend(_heads(q, self.heads), k, v, causal=x.shape[1] > 1)
        x = x + self.drop(self.proj_self(a.transpose(1, 2).flatten(2)))
        c = _attend(_heads(self.q(self.ln_cross(x)), self.heads), memory[0], memory[1], causal=False)
        x = x + self.drop(self.proj_cross(c.transpose(1, 2).flatten(2)))
        x = x + self.drop(self.mlp(self.ln_mlp(x)))
        return x, (k, v)


class TextDecoder(nn.Module):
    """Image features -> token probabilities.

    Args:
        in_features: the backbone's feature size.
        vocab_size: tokens (:class:`geoloc.evidence.captions.CaptionVocab`).
        vocab_fingerprint: the vocabulary's hash, kept as an attribute so that loading and export can check it.
        width, layers, heads, mlp_ratio, dropout: the transformer.
        memory_tokens: image tokens projected from the pooled features.
        max_tokens: longest text (positions).
        bos_id, eos_id, pad_id: special tokens.
        groups: ``[(start, end)]`` contiguous token-id ranges that cover the vocabulary (the factored output
            layer's groups); None: one group, a plain softmax.
    """

    def __init__(self, in_features: int, vocab_size: int, vocab_fingerprint: str = "", width: int = 256,
                 layers: int = 3, heads: int = 4, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 memory_tokens: int = 8, max_tokens: int = 48, bos_id: int = 1, eos_id: int = 2, pad_id: int = 0,
                 groups: list[tuple[int, int]] | None = None):
        super().__init__()
        if width % heads:
            raise ValueError(f"text decoder width {width} is not a multiple of its {heads} heads")
        self.vocab_fingerprint = str(vocab_fingerprint)
        self.width, self.memory_tokens, self.max_tokens = int(width), int(memory_tokens), int(max_tokens)
        self.bos_id, self.eos_id, self.pad_id = int(bos_id), int(eos_id), int(pad_id)
        self.memory = nn.Sequential(nn.Linear(in_features, memory_tokens * width))
        self.ln_memory = nn.LayerNorm(width)
        self.embed = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.zeros(max_tokens, width))
        self.blocks = nn.ModuleList([DecoderBlock(width, heads, mlp_ratio, dropout) for _ in range(layers)])
        self.ln_out = nn.LayerNorm(width)
        groups = [(int(a), int(b)) for a, b in (groups or [(0, vocab_size)])]
        if groups[0][0] != 0 or groups[-1][1] != vocab_size or any(groups[k][1] != groups[k + 1][0]
                                                                   for k in range(len(groups) - 1)):
            raise ValueError(f"text decoder groups must be contiguous ranges covering 0..{vocab_size}, got {groups}")
        self.groups: list[tuple[int, int]] = groups
        self.group_head = nn.Linear(width, len(groups))
        token_group = torch.zeros(vocab_size, dtype=torch.long)
        for k, (a, b) in enumerate(groups):
            token_group[a:b] = k
        self.register_buffer("token_group", token_group, persistent=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.01)

    @property
    def vocab_size(self) -> int:
        return self.embed.num_embeddings

    def _memory(self, features: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        m = self.ln_memory(self.memory(features).view(features.shape[0], self.memory_tokens, self.width))
        return [blk.memory_kv(m) for blk in self.blocks]

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """Joint log-probabilities ``[..., V]`` of the next token from hidden states ``[..., W]`` (after
        ``ln_out``): ``log p(group) + log p(token | group)``, float32."""
        h = h.float()
        lg = self.group_head(h).log_softmax(-1)
        w = self.embed.weight.float()  # tied output layer
        parts = [(h @ w[a:b].t()).log_softmax(-1) + lg[..., k:k + 1] for k, (a, b) in enumerate(self.groups)]
        return torch.cat(parts, -1)

    def _empty_cache(self, b: int, like: torch.Tensor) -> Cache:
        h = self.blocks[0].heads
        e = like.new_zeros((b, h, 0, self.width // h))
        return [(e, e) for _ in range(len(self.blocks))]

    def hidden(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced hidden states ``[B, T, W]`` (after ``ln_out``) of ``tokens [B, T]`` (``<bos>`` first,
        ``T <= max_tokens``) over the image ``features [B, D]``."""
        memory = self._memory(features)
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        cache = self._empty_cache(tokens.shape[0], x)
        for i, blk in enumerate(self.blocks):
            x, _ = blk(x, memory[i], cache[i])
        return self.ln_out(x)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced ``[B, T, V]`` log-probabilities of each next token (see :meth:`hidden`)."""
        return self.log_probs(self.hidden(features, tokens))

    def loss(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token negative log-likelihood over the real (non-pad) targets of ``tokens [B, T]``,
        each scored within its own group (the factored output layer)."""
        h = self.hidden(features, tokens[:, :-1])
        target = tokens[:, 1:]
        keep = target != self.pad_id
        h, target = h[keep], target[keep]
        group = self.token_group[target]
        total = F.cross_entropy(self.group_head(h).float(), group, reduction="sum")
        # positions sorted by group and split (views), the output layer split by group: each group's logits
        # from its own rows and weights, with no per-group masks or full-size gradient buffers
        order = torch.argsort(group)
        counts = torch.bincount(group, minlength=len(self.groups)).tolist()
        hs, ts = torch.split(h[order], counts), torch.split(target[order], counts)
        ws = torch.split(self.embed.weight, [b - a for a, b in self.groups])
        for k, (a, _) in enumerate(self.groups):
            if counts[k]:
                total = total + F.cross_entropy(F.linear(hs[k], ws[k]).float(), ts[k] - a, reduction="sum")
        return total / max(1, len(target))

    def _step(self, tok: torch.Tensor, t: int, memory: list[tuple[torch.Tensor, torch.Tensor]],
              cache: Cache) -> tuple[torch.Tensor, Cache]:
        x = self.embed(tok) + self.pos[t]
        new: Cache = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, memory[i], cache[i])
            new.append(kv)
        return self.log_probs(self.ln_out(x[:, -1])), new

    def _padded(self, tokens: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows stopped before ``max_tokens`` padded with ``<pad>`` (probability 1)."""
        pad = self.max_tokens - tokens.shape[1]
        if pad > 0:
            tokens = torch.cat([tokens, tokens.new_full((tokens.shape[0], pad), self.pad_id)], 1)
            probs = torch.cat([probs, probs.new_ones((probs.shape[0], pad))], 1)
        return tokens, probs

    @torch.jit.export
    def generate(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy decoding.

        Returns:
            ``tokens [B, max_tokens]`` (``<bos>`` first, ``<pad>`` after ``<eos>``) and ``probs [B, max_tokens]``
            (the decoder's probability of each token given the ones before; 1 for ``<bos>`` and padding).
        """
        with torch.no_grad():
            return self._greedy(features)

    def _greedy(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = features.shape[0]
        memory = self._memory(features)
        tok = torch.full((b, 1), self.bos_id, dtype=torch.long, device=features.device)
        tokens, probs = [tok[:, 0]], [torch.ones(b, device=features.device)]
        done = torch.zeros(b, dtype=torch.bool, device=features.device)
        cache = self._empty_cache(b, memory[0][0])
        for t in range(self.max_tokens - 1):
            logp, cache = self._step(tok, t, memory, cache)
            lp, nxt = logp.max(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            p = torch.where(done, torch.ones_like(lp), lp.exp())
            tokens.append(nxt)
            probs.append(p)
            done = done | (nxt == self.eos_id)
            tok = nxt[:, None]
            if bool(done.all()):
                break
        out_t, out_p = torch.stack(tokens, 1), torch.stack(probs, 1)
        return self._padded(out_t, out_p)

    @torch.no_grad()
    def beam_search(self, features: torch.Tensor, beams: int = 4,
                    length_penalty: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Beam search: the most probable text of ``beams`` hypotheses kept per photo (score: summed log
        probability divided by ``length ** length_penalty``). Returns as :meth:`generate`."""
        if beams <= 1:
            return self.generate(features)
        b, dev = features.shape[0], features.device
        memory = [(k.repeat_interleave(beams, 0), v.repeat_interleave(beams, 0)) for k, v in self._memory(features)]
        seqs = torch.full((b * beams, 1), self.bos_id, dtype=torch.long, device=dev)
        seq_lp = torch.zeros(b * beams, 1, device=dev)
        score = torch.full((b, beams), float("-inf"), device=dev)
        score[:, 0] = 0.0  # one live hypothesis at first (the others are copies)
        score = score.flatten()
        done = torch.zeros(b * beams, dtype=torch.bool, device=dev)
        cache = self._empty_cache(b * beams, memory[0][0])
        for t in range(self.max_tokens - 1):
            logp, cache = self._step(seqs[:, -1:], t, memory, cache)
            v = logp.shape[-1]
            # a finished hypothesis only continues with <pad> at no cost
            fin = torch.full_like(logp, float("-inf"))
            fin[:, self.pad_id] = 0.0
            logp = torch.where(done[:, None], fin, logp)
            cand = (score[:, None] + logp).view(b, beams * v)
            top, idx = cand.topk(beams, dim=-1)
            src = (idx // v + torch.arange(b, device=dev)[:, None] * beams).flatten()
            nxt = (idx % v).flatten()
            seqs = torch.cat([seqs[src], nxt[:, None]], 1)
            seq_lp = torch.cat([seq_lp[src], logp[src, nxt][:, None]], 1)
            score, done = top.flatten(), done[src] | (nxt == self.eos_id)
            cache = [(k[src], vv[src]) for k, vv in cache]
            if bool(done.all()):
                break
        length = ((seqs != self.pad_id) & (seqs != self.bos_id)).sum(1).clamp(min=1).float()
        final = (seq_lp.sum(1) / length ** length_penalty).view(b, beams)
        best = final.argmax(-1) + torch.arange(b, device=dev) * beams
        out_t, out_p = seqs[best], seq_lp[best].exp()
        out_p[out_t == self.pad_id] = 1.0
        return self._padded(out_t, out_p)


def build_text_decoder(in_features: int, settings: dict | None) -> TextDecoder | None:
    """The decoder ``model.text_decoder`` describes (None: no decoder), on the caption vocabulary.

    Args:
        in_features: the backbone's feature size.
        settings: ``{width, layers, heads, mlp_ratio, dropout, memory_tokens}`` (any may be left out).
    """
    if not settings:
        return None
    from geoloc.evidence.captions import MAX_TOKENS, caption_vocab

    allowed = {"width", "layers", "heads", "mlp_ratio", "dropout", "memory_tokens"}
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise ValueError(f"unknown text decoder setting(s) {unknown}; known: {sorted(allowed)}")
    vocab = caption_vocab()
    return TextDecoder(in_features, len(vocab), vocab.fingerprint, max_tokens=MAX_TOKENS, bos_id=vocab.bos_id,
                       eos_id=vocab.eos_id, pad_id=vocab.pad_id, groups=vocab.groups(), **settings)
