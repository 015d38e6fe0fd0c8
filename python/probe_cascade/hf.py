"""A transformers hook: concepts per generated token during `model.generate(...)`.

    import probe_cascade
    from probe_cascade import hf

    rt = probe_cascade.Runtime("pack/", config="realtime")
    with hf.monitor(model, rt, layer="last") as mon:
        out = model.generate(**enc, max_new_tokens=20)
    for token_id, text, report in mon.steps(out, tokenizer)[0]:
        print(repr(text), [d.name for d in report.top[:3]])

At every forward pass of the model the monitor reads the chosen layer's output at the last
position of each sequence: the hidden state that produces the next token. So report k of a
sequence belongs to its k-th generated token. A batch gets one session per sequence and one
`Runtime.observe_batch` per decode step; a sequence that has produced an end-of-sequence token
is no longer observed (generate keeps padding it), so its reports stop with that token.

`runtime` may also be a `probe_cascade.Client` of a `probe-cascade serve` in another process:
each decode step is then one ObserveBatch call.

A pack of lenses over several model layers (headspace's `<Concept>@L<m>.pt`) reads model
layer m as the output of decoder layer m (transformers' `hidden_states[m + 1]`):
`hf.monitor(model, rt, layers=[4, 7])` hooks those decoder layers in the same forward pass and
observes each token with one hidden state per layer.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ._native import ProbeCascadeError, Report, Runtime, Session

Layer = Union[int, str]


def _decoder(model: Any) -> Any:
    """The decoder stack of a causal LM (`model.model` for Llama-like models)."""
    get = getattr(model, "get_decoder", None)
    dec = get() if callable(get) else None
    if dec is None:
        dec = getattr(model, "model", model)
    return dec


def _layer_module(model: Any, layer: Layer) -> torch.nn.Module:
    dec = _decoder(model)
    if layer == "last":
        norm = getattr(dec, "norm", None) or getattr(dec, "final_layernorm", None) or getattr(dec, "ln_f", None)
        if norm is None:
            raise ProbeCascadeError(f"{type(model).__name__} has no final norm (norm, final_layernorm, ln_f) to hook")
        return norm
    layers = getattr(dec, "layers", None) or getattr(dec, "h", None)
    if layers is None:
        raise ProbeCascadeError(f"{type(model).__name__} has no decoder layer list (layers, h) to hook")
    if not isinstance(layer, int):
        raise ProbeCascadeError(f"layer must be an int or 'last', not {layer!r}")
    n = len(layers)
    if not -n <= layer < n:
        raise ProbeCascadeError(f"layer {layer} is out of range: the model has {n} decoder layers")
    return layers[layer]


def _eos_ids(model: Any) -> set:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


@dataclass
class Generation:
    """One `generate` call: its sessions and reports, per sequence."""

    sessions: List[Session]
    prompt_len: int
    #: reports[i][k]: sequence i's k-th generated token.
    reports: List[List[Report]]
    #: prompt_reports[i]: sequence i's prompt positions (observe_prompt=True), padding skipped.
    prompt_reports: List[List[Report]]
    finished: List[bool] = field(default_factory=list)
    #: texts[i][k]: with a tokenizer, the text of the token at reports[i][k]'s position (the
    #: token the model read there), else None. prompt_texts likewise for prompt_reports.
    texts: List[List[Optional[str]]] = field(default_factory=list)
    prompt_texts: List[List[Optional[str]]] = field(default_factory=list)
    steps: int = 0


class Monitor:
    """Hooks a model; see `monitor`."""

    def __init__(
        self,
        model: Any,
        runtime: Union[Runtime, Any],
        layer: Layer = -1,
        *,
        layers: Optional[Sequence[int]] = None,
        observe_prompt: bool = False,
        session_options: Optional[Dict[str, Any]] = None,
        tokenizer: Any = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.runtime = runtime
        self.layer = layer
        self.observe_prompt = observe_prompt
        self.session_options = dict(session_options or {})
        self.generations: List[Generation] = []
        if layers is not None:
            if not layers or any(not isinstance(m, int) or m < 0 for m in layers) or len(set(layers)) != len(layers):
                raise ProbeCascadeError(f"layers must be distinct model layer numbers (ints >= 0), not {layers!r}")
            self.layers: Optional[List[int]] = sorted(layers)
            self._modules = [_layer_module(model, m) for m in self.layers]
        else:
            self.layers = None
            self._modules = [_layer_module(model, layer)]
        # The hooked outputs of the forward pass under way, by position in `_modules`.
        self._captured: Dict[int, torch.Tensor] = {}
        self._eos = _eos_ids(model)
        self._handles: List[Any] = []
        self._inputs: Dict[str, Any] = {}
        self._prompt = False

    # -- results ---------------------------------------------------------------------------

    @property
    def reports(self) -> List[List[Report]]:
        """The latest generation's reports: reports[i][k] for sequence i's k-th new token."""
        return self.generations[-1].reports if self.generations else []

    @property
    def prompt_reports(self) -> List[List[Report]]:
        return self.generations[-1].prompt_reports if self.generations else []

    def steps(self, output_ids: torch.Tensor, tokenizer: Any = None) -> List[List[Tuple[int, str, Report]]]:
        """The latest generation's reports aligned with the tokens `generate` returned: for
        each sequence, (token id, token text or "", report) per generated token."""
        g = self.generations[-1]
        out = []
        for i, reps in enumerate(g.reports):
            new = output_ids[i, g.prompt_len :].tolist()
            row = []
            for k, rep in enumerate(reps):
                tid = int(new[k])
                text = tokenizer.decode([tid]) if tokenizer is not None else ""
                row.append((tid, text, rep))
            out.append(row)
        return out

    # -- looking at it ---------------------------------------------------------------------

    def _streams(self) -> Tuple[Dict[str, List[Any]], Dict[str, List[Optional[str]]]]:
        reports: Dict[str, List[Any]] = {}
        texts: Dict[str, List[Optional[str]]] = {}
        for gi, g in enumerate(self.generations):
            for i in range(len(g.sessions)):
                label = f"generation {gi} · sequence {i}"
                reports[label] = list(g.prompt_reports[i]) + list(g.reports[i])
                texts[label] = list(g.prompt_texts[i]) + list(g.texts[i])
        return reports, texts

    def to_html(self, path: Any, title: Optional[str] = None) -> str:
        """Writes every generation's streams (prompt positions first, where observed) as one
        self-contained HTML page: the viewer `probe-cascade serve` shows live, with each
        token's text where the monitor has a tokenizer. Returns the path."""
        from . import viewer

        reports, texts = self._streams()
        return viewer.to_html(path, reports, texts=texts, runtime=self.runtime, title=title)

    def _repr_html_(self) -> str:
        from . import viewer

        reports, texts = self._streams()
        return viewer.iframe(viewer.page(reports, texts=texts, runtime=self.runtime, title="probe-cascade monitor"))

    # -- hooks -----------------------------------------------------------------------------

    def _attach(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._before, with_kwargs=True))
        for i, module in enumerate(self._modules):
            self._handles.append(module.register_forward_hook(self._hook(i)))

    def _hook(self, i: int) -> Any:
        def after(_module: Any, _args: tuple, output: Any) -> None:
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
                raise ProbeCascadeError(
                    f"the hooked module returned {type(hidden).__name__}, not a [batch, positions, D] tensor"
                )
            self._captured[i] = hidden
            # The forward pass has reached every hooked layer: observe its token.
            if len(self._captured) == len(self._modules):
                captured = [self._captured[k] for k in range(len(self._modules))]
                self._captured = {}
                self._after(captured)

        return after

    def _states(self, hiddens: List[torch.Tensor], pick: Any) -> Any:
        """What observe_batch takes for the rows `pick` selects of each hooked output: the rows
        themselves for one layer, {model layer: rows} for several."""
        if self.layers is None:
            return pick(hiddens[0])
        return {m: pick(h) for m, h in zip(self.layers, hiddens)}

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._close_sessions()

    def _close_sessions(self) -> None:
        if self.generations:
            for s in self.generations[-1].sessions:
                s.close()

    def _before(self, _module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        self._inputs = {
            "input_ids": ids,
            "attention_mask": kwargs.get("attention_mask"),
            "past_key_values": kwargs.get("past_key_values"),
            "cache": kwargs.get("cache"),
            "cache_position": kwargs.get("cache_position"),
        }
        # Decided before the forward runs: by the time the hooked layer returns, the cache
        # already holds this forward's positions.
        self._prompt = self._is_prompt()

    def _is_prompt(self) -> bool:
        """Is this forward a new generation's prompt (an empty cache)?"""
        # transformers 5 passes the cache as `cache`, 4.x as `past_key_values`.
        past = self._inputs.get("past_key_values")
        if past is None:
            past = self._inputs.get("cache")
        if past is not None and hasattr(past, "get_seq_length"):
            return int(past.get_seq_length()) == 0
        pos = self._inputs.get("cache_position")
        if pos is not None:
            return int(pos[0]) == 0
        ids, mask = self._inputs.get("input_ids"), self._inputs.get("attention_mask")
        if ids is not None and mask is not None and mask.dim() == 2:
            # A decode step's mask also covers the cached positions.
            return mask.shape[1] == ids.shape[1]
        return not self.generations

    def _after(self, hiddens: List[torch.Tensor]) -> None:
        hidden = hiddens[0]
        ids = self._inputs.get("input_ids")
        mask = self._inputs.get("attention_mask")
        b, t, _ = hidden.shape
        prompt = self._prompt
        if prompt:
            self._start(b, t, hiddens, mask)
        elif not self.generations:
            return
        else:
            g = self.generations[-1]
            if ids is not None and self._eos:
                # The token fed in now is the one generated last step: an end-of-sequence
                # token finishes its sequence (its own report is already in).
                for i, tok in enumerate(ids[:, -1].tolist()):
                    if tok in self._eos:
                        g.finished[i] = True
        g = self.generations[-1]
        if prompt:
            last = self._last_positions(b, t, mask)
        else:
            last = [t - 1] * b
        live = [i for i in range(b) if not g.finished[i]]
        if not live:
            return
        if len(live) == b and all(p == t - 1 for p in last):
            rows = self._states(hiddens, lambda h: h[:, -1, :])  # [B, D] views: rows read in place
        else:
            rows = self._states(hiddens, lambda h: [h[i, last[i]] for i in live])
        texts = self._texts(ids, [(i, last[i]) for i in live])
        reports = self._observe([g.sessions[i] for i in live], rows, texts)
        for k, (i, rep) in enumerate(zip(live, reports)):
            g.reports[i].append(rep)
            g.texts[i].append(None if texts is None else texts[k])
        g.steps += 1

    def _texts(self, ids: Optional[torch.Tensor], at: List[Tuple[int, int]]) -> Optional[List[str]]:
        """With a tokenizer, the decoded token at each (sequence, position) of `ids`."""
        if self.tokenizer is None or ids is None or ids.dim() != 2:
            return None
        return [self.tokenizer.decode([int(ids[i, p])]) for i, p in at]

    def _observe(self, sessions: List[Any], rows: Any, texts: Optional[List[str]]) -> List[Report]:
        """One observe_batch; a Client also gets the tokens' texts, for the server's viewers."""
        if texts is not None and not isinstance(self.runtime, Runtime):
            return self.runtime.observe_batch(sessions, rows, texts=texts)
        return self.runtime.observe_batch(sessions, rows)

    @staticmethod
    def _last_positions(b: int, t: int, mask: Optional[torch.Tensor]) -> List[int]:
        if mask is None or mask.dim() != 2:
            return [t - 1] * b
        # Left padding (what decoder-only generation wants): the last position is real.
        # Right padding: the last real one.
        pos = []
        for i in range(b):
            real = torch.nonzero(mask[i]).flatten()
            pos.append(int(real[-1]) if real.numel() else t - 1)
        return pos

    def _start(self, b: int, t: int, hiddens: List[torch.Tensor], mask: Optional[torch.Tensor]) -> None:
        self._close_sessions()
        sessions = [self.runtime.session(**self.session_options) for _ in range(b)]
        g = Generation(
            sessions=sessions,
            prompt_len=t,
            reports=[[] for _ in range(b)],
            prompt_reports=[[] for _ in range(b)],
            finished=[False] * b,
            texts=[[] for _ in range(b)],
            prompt_texts=[[] for _ in range(b)],
        )
        self.generations.append(g)
        if self.observe_prompt:
            last = self._last_positions(b, t, mask)
            for p in range(t):
                live = [
                    i for i in range(b) if p < last[i] and (mask is None or mask.dim() != 2 or bool(mask[i, p]))
                ]
                if not live:
                    continue
                rows = self._states(hiddens, lambda h: [h[i, p] for i in live])
                texts = self._texts(self._inputs.get("input_ids"), [(i, p) for i in live])
                reports = self._observe([sessions[i] for i in live], rows, texts)
                for k, (i, rep) in enumerate(zip(live, reports)):
                    g.prompt_reports[i].append(rep)
                    g.prompt_texts[i].append(None if texts is None else texts[k])


@contextmanager
def monitor(
    model: Any,
    runtime: Union[Runtime, Any],
    layer: Layer = -1,
    *,
    layers: Optional[Sequence[int]] = None,
    observe_prompt: bool = False,
    session_options: Optional[Dict[str, Any]] = None,
    tokenizer: Any = None,
) -> Iterator[Monitor]:
    """Observes `model`'s hidden states at every decode step of `generate` inside the block.

    layer: a decoder layer index (-1: the last decoder layer's output) or "last" for the final
    norm's output, which is what HatCat's probes read. layers: for a pack of lenses over
    several model layers, the model layers it reads (decoder layers' outputs, hooked in the same
    forward pass), instead of `layer`. runtime: an in-process Runtime, or a
    `probe_cascade.Client` (the same calls, over gRPC). observe_prompt: also score every prompt
    position (padding skipped) into `prompt_reports`. session_options: keyword overrides for
    each sequence's session (see `Runtime.session`). tokenizer: decodes the token at each
    observed position (the token the model read there, so a stream's texts read as the text
    itself) into `Generation.texts`; a Client sends each to the server with its hidden state,
    for its live viewers. `mon.to_html(path)` writes the generations as one HTML page, and a
    monitor renders in Jupyter. Hooks are removed and sessions closed when the block ends.
    """
    mon = Monitor(
        model,
        runtime,
        layer,
        layers=layers,
        observe_prompt=observe_prompt,
        session_options=session_options,
        tokenizer=tokenizer,
    )
    mon._attach()
    try:
        yield mon
    finally:
        mon._detach()
