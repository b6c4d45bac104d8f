"""Apple's recurrent drafter (ReDrafter), in the layout TensorRT-LLM's ReDrafter converter reads.

The drafter sees the base model's last-layer hidden state h of the last accepted token and reuses the
base's token embedding table E. With the base's own next token g0:

    s_1 = SiLU(rnn_w(E(g0)) + rnn_u(s_0)),  s_0 = 0      (rnn=False: s_j = E(g) + s_{j-1})
    d_1 = argmax lm_head([h ; s_1]);  s_2 = SiLU(rnn_w(E(d_1)) + rnn_u(s_1));  d_2 = ...

lm_head = ResBlock x num_draft_layers, then Linear(exit_dim, vocab, bias=False), with
ResBlock(x) = x + SiLU(Linear(x)). Tensor names (`lm_head.{i}.linear.*`, `lm_head.{N}.weight`, `rnn_u.*`,
`rnn_w.weight`, optional `input_proj.*`) are the ones examples/redrafter/convert_checkpoint.py looks for
(reference trtllm_redrafter.md §3, §6).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mathforge.errors import UserError

MODEL_TYPE = "recurrent_drafting_drafter"


@dataclass
class DrafterConfig:
    hidden_size: int  # the base model's hidden size
    vocab_size: int  # the base model's vocabulary
    exit_dim: int  # width of the ResBlocks; 2 * hidden_size unless an input_proj maps to it
    num_draft_layers: int = 2
    rnn: bool = True

    @classmethod
    def for_base(cls, base_config, num_draft_layers: int = 2, rnn: bool = True) -> DrafterConfig:
        h = base_config.hidden_size
        return cls(h, base_config.vocab_size, 2 * h, num_draft_layers, rnn)

    def to_json(self) -> dict:
        return {"model_type": MODEL_TYPE, **asdict(self), "num_lookback_tokens": -1}

    @classmethod
    def from_json(cls, d: dict) -> DrafterConfig:
        missing = [
            k for k in ("hidden_size", "vocab_size", "exit_dim", "num_draft_layers", "rnn") if k not in d
        ]
        if missing:
            raise UserError(f"drafter config.json lacks {', '.join(missing)}: not a ReDrafter directory")
        return cls(
            int(d["hidden_size"]),
            int(d["vocab_size"]),
            int(d["exit_dim"]),
            int(d["num_draft_layers"]),
            bool(d["rnn"]),
        )


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=True)
        nn.init.zeros_(self.linear.weight)  # starts close to the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class Drafter(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        c = self.config = config
        h2 = 2 * c.hidden_size
        self.input_proj = nn.Linear(h2, c.exit_dim, bias=True) if h2 != c.exit_dim else None
        self.lm_head = nn.Sequential(
            *(ResBlock(c.exit_dim) for _ in range(c.num_draft_layers)),
            nn.Linear(c.exit_dim, c.vocab_size, bias=False),
        )
        if c.rnn:
            self.rnn_u = nn.Linear(c.hidden_size, c.hidden_size, bias=True)
            self.rnn_w = nn.Linear(c.hidden_size, c.hidden_size, bias=False)

    def next_state(self, state: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """One RNN update: s_j from s_{j-1} and the embedding of the token before the one to draft."""
        if self.config.rnn:
            return F.silu(self.rnn_w(emb) + self.rnn_u(state))
        return emb + state

    def head(self, hidden: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Logits of the next draft token from the base hidden state h and the RNN state s."""
        x = torch.cat([hidden, state], dim=-1)
        if self.input_proj is not None:
            x = self.input_proj(x)
        return self.lm_head(x)

    def forward(self, hidden: torch.Tensor, next_embs: torch.Tensor, n: int) -> torch.Tensor:
        """Teacher-forced training: hidden [B, T, H] of the frozen base, next_embs[:, t] = E(ids[:, t+1]).

        Returns logits [n, B, T, V]; logits[i, :, t] predicts ids[:, t + i + 2] (Apple's drafter_loss)."""
        state = torch.zeros_like(hidden)
        embs = next_embs
        out = []
        for i in range(n):
            if i:
                embs = torch.roll(
                    embs, -1, dims=1
                )  # E(ids[t + 1 + i]) at t; the wrapped tail is never scored
            state = self.next_state(state, embs)
            out.append(self.head(hidden, state))
        return torch.stack(out)

    @torch.no_grad()
    def draft(self, hidden: torch.Tensor, token: torch.Tensor, embed: nn.Module, k: int) -> torch.Tensor:
        """Greedy single-beam drafting: hidden [B, H] at the last accepted position, token [B] the base's
        next token g0 (not yet verified) -> draft tokens [B, k] for the positions after g0."""
        state = torch.zeros_like(hidden)
        tok, drafts = token, []
        for _ in range(k):
            state = self.next_state(state, embed(tok).to(hidden.dtype))
            tok = self.head(hidden, state).argmax(-1)
            drafts.append(tok)
        return torch.stack(drafts, dim=1)

    # ------------------------------------------------------------------ Apple layout
    def save_pretrained(self, out: str | Path, dtype: torch.dtype = torch.bfloat16) -> None:
        """config.json + one model.safetensors (TensorRT-LLM's converter reads no shards), in `dtype`."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(self.config.to_json(), indent=2) + "\n")
        sd = {k: v.detach().to(dtype).contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16
    ) -> Drafter:
        path = Path(path)
        cfg_file, weights = path / "config.json", path / "model.safetensors"
        if not cfg_file.is_file() or not weights.is_file():
            raise UserError(
                f"{path} is not a ReDrafter directory: it needs config.json and model.safetensors"
            )
        config = DrafterConfig.from_json(json.loads(cfg_file.read_text()))
        model = cls(config)
        missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
        if missing or unexpected:
            raise UserError(
                f"{weights} does not match its config.json: missing {missing[:4]}, unexpected {unexpected[:4]}"
            )
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
